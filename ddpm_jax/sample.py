"""Draw samples from a trained model (its EMA parameters) and save them.

    python sample.py --config configs/mnist.py --workdir /tmp/ddpm_mnist \
        --num_samples 64 --out /tmp/mnist_samples

writes OUT.png (a grid) and OUT.npz (uint8 NHWC array 'images'). --params DIR reads
parameters written by `python -m ddpm_jax.convert` instead of a training workdir.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import checkpointing, distributed, sampling

FLAGS = flags.FLAGS
distributed.define_flags()
config_flags.DEFINE_config_file(
    "config", None, "Config file of the trained model.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
flags.DEFINE_string("params", None, "Directory of converted parameters (instead of --workdir).")
flags.DEFINE_integer("num_samples", 64, "Number of samples.", lower_bound=1)
flags.DEFINE_string("out", None, "Output path without extension: OUT.png and OUT.npz.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config", "out"])


def load_params():
    if (FLAGS.workdir is None) == (FLAGS.params is None):
        raise app.UsageError("give exactly one of --workdir and --params")
    if FLAGS.workdir is not None:
        return checkpointing.restore_params(FLAGS.workdir, FLAGS.config)[0]
    return checkpointing.restore_converted(FLAGS.params)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample_fn = sampling.make_sample_fn(FLAGS.config, progress=True)
    images = sample_fn(load_params(), jax.random.PRNGKey(FLAGS.seed), FLAGS.num_samples)
    if jax.process_index() == 0:
        np.savez_compressed(out.with_suffix(".npz"), images=images)
        sampling.save_png(out.with_suffix(".png"), sampling.image_grid(images))
        print(f"wrote {len(images)} samples to {out.with_suffix('.png')} and .npz")


if __name__ == "__main__":
    cli.run(main, __file__)
