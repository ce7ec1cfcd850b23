"""Draw samples from a trained model (its EMA parameters) and save them.

    python sample.py --config mnist --workdir /tmp/ddpm_mnist --num_samples 64 --out /tmp/s

writes OUT.png (a grid) and OUT.npz (uint8 NHWC array 'images'); OUT may be gs://...
--params DIR reads parameters written by `python -m ddpm_jax.convert` instead of a
training workdir. A class model (config.model.num_classes > 0) takes --labels 0,1,2:
--num_samples samples of each label, one row per label in the grid, with classifier-free
guidance --guidance w (default config.sampling.guidance); the npz also holds 'labels'.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

import jax
import numpy as np
from absl import app, flags

from ddpm_jax import checkpointing, config_lib, convert, fs, images, sampling, timeline

FLAGS = flags.FLAGS


def define_flags():
    cli.define_common_flags()
    flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
    flags.DEFINE_string("params", None, "Directory of converted parameters (instead of --workdir).")
    flags.DEFINE_integer("num_samples", 64, "Number of samples (of each label).", lower_bound=1)
    flags.DEFINE_list("labels", None, "Class labels of a class model, e.g. 0,1,2: a row each.")
    flags.DEFINE_float("guidance", None, "Guidance weight w (default config.sampling.guidance).")
    flags.DEFINE_string("out", None, "Output path without extension: OUT.png and OUT.npz.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.mark_flags_as_required(["config", "out"])


def load_params(setup):
    """(parameters, where they come from: a checkpoint's step or the converted folder)."""
    if (FLAGS.workdir is None) == (FLAGS.params is None):
        raise app.UsageError("give exactly one of --workdir and --params")
    if FLAGS.workdir is not None:
        params, step = checkpointing.restore_params(FLAGS.workdir, FLAGS.config)
        return params, f"the EMA weights of step {step} in {FLAGS.workdir}"
    expected = convert.expected_params(setup)
    return checkpointing.restore_converted(FLAGS.params, expected), FLAGS.params


def parse_labels(values):
    """--labels as an int array, or None."""
    if values is None:
        return None
    try:
        return np.asarray([int(v) for v in values], np.int32)
    except ValueError:
        raise app.UsageError(f"--labels must be integers, e.g. 0,1,2; got {values}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    timeline.mark("imported")
    cli.setup(FLAGS)
    out = fs.as_path(FLAGS.out)
    labels = parse_labels(FLAGS.labels)
    num = FLAGS.num_samples * (1 if labels is None else len(labels))
    labels = None if labels is None else np.repeat(labels, FLAGS.num_samples)
    setup = config_lib.build(FLAGS.config)  # chunks of samples fit any device count
    timeline.mark("built")
    params, source = load_params(setup)
    timeline.mark("restored")
    sample_fn = sampling.Sampler(setup, progress=True)
    rng = jax.random.PRNGKey(FLAGS.seed)
    samples = sample_fn(params, rng, num, labels=labels, guidance=FLAGS.guidance)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if labels is None else {"labels": labels}
        fs.save_npz(out.with_suffix(".npz"), compress=True, images=samples, **extra)
        ncols = None if labels is None else FLAGS.num_samples
        fs.save_png(out.with_suffix(".png"), images.image_grid(samples, ncols))
        print(f"wrote {len(samples)} samples of {source} to {out.with_suffix('.png')} and .npz")


def run():
    define_flags()
    cli.run(main, __file__)


if __name__ == "__main__":
    run()
