"""Draw samples from a trained model (its EMA parameters) and save them.

    python sample.py --config mnist --workdir /tmp/ddpm_mnist --num_samples 64 --out /tmp/s

writes OUT.png (a grid) and OUT.npz (uint8 NHWC array 'images'); OUT may be gs://...
--params DIR reads parameters written by `python -m ddpm_jax.convert` instead of a
training workdir.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

import jax
from absl import app, flags

from ddpm_jax import checkpointing, fs, sampling

FLAGS = flags.FLAGS


def define_flags():
    cli.define_common_flags()
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
    cli.setup(FLAGS)
    out = fs.as_path(FLAGS.out)
    sample_fn = sampling.make_sample_fn(FLAGS.config, progress=True)
    images = sample_fn(load_params(), jax.random.PRNGKey(FLAGS.seed), FLAGS.num_samples)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        fs.save_npz(out.with_suffix(".npz"), compress=True, images=images)
        fs.save_png(out.with_suffix(".png"), sampling.image_grid(images))
        print(f"wrote {len(images)} samples to {out.with_suffix('.png')} and .npz")


def run():
    define_flags()
    cli.run(main, __file__)


if __name__ == "__main__":
    run()
