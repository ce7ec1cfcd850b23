"""Evaluate a trained model: the test-set bound (NLL) in bits/dim.

    python evaluate.py --config configs/cifar.py --workdir /tmp/ddpm_cifar10
    python evaluate.py --config configs/mnist.py --workdir /tmp/ddpm_mnist --max_batches 2

Uses the EMA parameters of the latest checkpoint and every example of
config.data.eval_split (or the first --max_batches batches), all T steps, the
discretized decoder and the prior term. Writes WORKDIR/eval/nll_step_N.json (mean,
standard error, prior and decoder terms), nll_step_N.npz (per-step terms, rate and
distortion for the paper's Fig. 5) and TensorBoard scalars.
"""

import json
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import checkpointing, config_lib, distributed, evaluation, unet

FLAGS = flags.FLAGS
distributed.define_flags()
config_flags.DEFINE_config_file(
    "config", None, "Config file of the trained model.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is evaluated).")
flags.DEFINE_integer("batch_size", 64, "Global evaluation batch size.", lower_bound=1)
flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    config = FLAGS.config
    model_config = config_lib.check_config(config, jax.device_count(), jax.process_count())
    config_lib.check_batch("batch_size", FLAGS.batch_size, jax.device_count(), jax.process_count())
    step = int(checkpointing.latest_step_dir(FLAGS.workdir).parent.name)
    params = checkpointing.restore_params(FLAGS.workdir)
    model, sched = unet.UNet(model_config), config_lib.make_schedule(config)
    result = evaluation.evaluate_bpd(
        config, model, sched, params, FLAGS.batch_size, max_batches=FLAGS.max_batches
    )
    summary = evaluation.summarize_bpd(result)
    if jax.process_index() != 0:
        return
    out = Path(FLAGS.workdir) / "eval"
    out.mkdir(exist_ok=True)
    arrays = {k: v for k, v in summary.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in summary.items() if k not in arrays}
    np.savez(out / f"nll_step_{step}.npz", **arrays)
    (out / f"nll_step_{step}.json").write_text(json.dumps(dict(scalars, step=step), indent=1))
    with tf.summary.create_file_writer(str(Path(FLAGS.workdir) / "tensorboard")).as_default(
        step=step
    ):
        tf.summary.scalar("eval/nll_bpd", scalars["bpd"])
    print(json.dumps(dict(scalars, step=step)))


if __name__ == "__main__":
    app.run(main)
