"""Train a DDPM.

    python train.py --config configs/cifar.py --workdir /tmp/ddpm_cifar10
    python train.py --config configs/mnist.py --workdir /tmp/ddpm_mnist \
        --config.training.batch_size=32

Resumes from the latest checkpoint in --workdir. SIGTERM saves a checkpoint and exits.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import distributed, train_lib

FLAGS = flags.FLAGS
distributed.define_flags()
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    logging.info("config:\n%s", FLAGS.config)
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, __file__)
