"""Train a DDPM.

    python train.py --config configs/cifar.py --workdir /tmp/ddpm_cifar10
    python train.py --config configs/mnist.py --workdir /tmp/ddpm_mnist \
        --config.training.batch_size=32

Resumes from the newest good checkpoint in --workdir (a damaged newer one is named and moved
to WORKDIR/damaged_checkpoints/). SIGTERM, SIGHUP or Ctrl-C save a checkpoint and stop; a
second Ctrl-C stops at once. One training run at a time holds WORKDIR/train.lock.
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
    # The whole config is in each checkpoint's record (WORKDIR/checkpoints/N/record/metadata).
    logging.info(
        "config %s, workdir %s", config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir
    )
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, __file__)
