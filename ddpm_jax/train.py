"""Train a DDPM.

    python train.py --config cifar --workdir /tmp/ddpm_cifar10
    python -m ddpm_jax.train --config mnist --workdir /tmp/mnist --config.training.batch_size=32

--config is a packaged config's name (cifar, mnist, ...) or a config file's path. --workdir
is a local path or a bucket (gs://BUCKET/run). Resumes from the newest good checkpoint in
--workdir (a damaged newer one is named and moved to WORKDIR/damaged_checkpoints/). SIGTERM,
SIGHUP or Ctrl-C save a checkpoint and stop; a second Ctrl-C stops at once. One training run
at a time holds WORKDIR/train.lock.
"""

import atexit

from absl import app, flags, logging

from ddpm_jax import data_worker

FLAGS = flags.FLAGS
WORKER = []  # the data worker this launch started first thing (run)


def define_flags():
    from ddpm_jax import cli

    cli.define_common_flags()
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and samples (or gs://).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from ml_collections import config_flags

    from ddpm_jax import cli, timeline, training

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    timeline.mark("imported")
    cli.setup(FLAGS)
    # The whole config is in each checkpoint's record (WORKDIR/checkpoints/N/record/metadata).
    logging.info(
        "config %s, workdir %s", config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir
    )
    worker = WORKER[0] if WORKER else True
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir, data_worker=worker)


def run():
    """The data worker starts before JAX is imported: TensorFlow loads in the child while
    this process imports JAX and parses its flags."""
    worker = data_worker.DataWorker()
    atexit.register(worker.close)
    WORKER[:] = [worker]
    from ddpm_jax import cli

    cli.quiet_tensorflow()  # before anything here imports TensorFlow
    define_flags()
    cli.run(main, __file__)


if __name__ == "__main__":
    run()
