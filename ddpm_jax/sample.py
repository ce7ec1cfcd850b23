"""Draw samples from a trained model (its EMA parameters) and save them.

    python sample.py --config mnist --workdir /tmp/ddpm_mnist --num_samples 64 --out /tmp/s

writes OUT.png (a grid) and OUT.npz (uint8 NHWC array 'images'); OUT may be gs://...
--params DIR reads parameters written by `python -m ddpm_jax.convert` instead of a
training workdir; --pretrained FOLDER_or_HUB_ID (no --config) a diffusers pipeline
(ddpm_jax/configs/pretrained.py), e.g. --pretrained google/ddpm-ema-church-256.

A class model (config.model.num_classes > 0) takes --labels 0,1,2: --num_samples
samples of each label, one row per label in the grid, with classifier-free guidance
--guidance w (default config.sampling.guidance); the npz also holds 'labels'.

Editing given images (a folder of image files or an .npz array 'images', at the model's
size; editor.py), with the chain of config.sampling (method, num_steps, spacing):

    python sample.py ... --init_images DIR --strength 0.5 [--mask M]   # SDEdit
    python sample.py ... --init_images DIR --mask M --inpaint          # RePaint
    python sample.py ... --init_images DIR --invert    # DDIM inversion, then back

A mask (one image, a folder or an .npz array 'masks') is white where the image is
regenerated and black where it is kept. The grid has a row of inputs, one of masks and
--num_samples rows of results (1 unless given); the npz holds 'inputs', 'masks',
'images' and, after --invert, 'x_T' and the reconstruction error.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

import jax
import numpy as np
from absl import app, flags

from ddpm_jax import (
    checkpointing,
    config_lib,
    convert,
    diffusers_pipeline,
    editor,
    first_stage,
    fs,
    images,
    sampling,
    timeline,
)

FLAGS = flags.FLAGS


def define_flags():
    cli.define_common_flags()
    flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is used).")
    flags.DEFINE_string("params", None, "Directory of converted parameters (instead of --workdir).")
    flags.DEFINE_string("pretrained", None, "A diffusers pipeline folder or Hub id (no --config).")
    flags.DEFINE_integer("num_samples", 64, "Number of samples (of each label).", lower_bound=1)
    flags.DEFINE_list("labels", None, "Class labels of a class model, e.g. 0,1,2: a row each.")
    flags.DEFINE_float("guidance", None, "Guidance weight w (default config.sampling.guidance).")
    flags.DEFINE_string("out", None, "Output path without extension: OUT.png and OUT.npz.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("init_images", None, "Images to edit: a folder or an .npz ('images').")
    flags.DEFINE_string("mask", None, "Editing mask (white: regenerate): image, folder or npz.")
    flags.DEFINE_float("strength", None, "SDEdit: noise the images to t = strength·T, then back.")
    flags.DEFINE_bool("inpaint", False, "RePaint the mask's white region of --init_images.")
    flags.DEFINE_bool("invert", False, "DDIM-invert --init_images and sample them back.")
    flags.DEFINE_integer("jump_length", 10, "RePaint's jump length.", lower_bound=1)
    flags.DEFINE_integer("jump_n_sample", 10, "RePaint's resamplings per jump.", lower_bound=1)
    flags.mark_flags_as_required(["config", "out"])


def load_params(setup):
    """(parameters, where they come from: a checkpoint's step, the converted folder or the
    diffusers pipeline)."""
    pretrained = FLAGS.config.get("pretrained")
    if pretrained is not None:
        if FLAGS.workdir is not None or FLAGS.params is not None:
            raise app.UsageError("a pretrained pipeline has its weights: drop --workdir/--params")
        return diffusers_pipeline.load_params(pretrained, setup), pretrained
    if (FLAGS.workdir is None) == (FLAGS.params is None):
        raise app.UsageError("give exactly one of --workdir and --params")
    if FLAGS.workdir is not None:
        params, step = checkpointing.restore_params(FLAGS.workdir, FLAGS.config)
        params = first_stage.bundle(setup, params, FLAGS.workdir, step)
        return params, f"the EMA weights of step {step} in {FLAGS.workdir}"
    expected = convert.expected_params(setup)
    params = checkpointing.restore_converted(FLAGS.params, expected)
    return first_stage.bundle(setup, params), FLAGS.params


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
    mode = edit_mode()  # None: sampling; checked before any work
    labels = parse_labels(FLAGS.labels)
    num = FLAGS.num_samples * (1 if labels is None else len(labels))
    labels = None if labels is None else np.repeat(labels, FLAGS.num_samples)
    setup = config_lib.build(FLAGS.config)  # chunks of samples fit any device count
    if mode is not None and setup.latent is not None:
        raise app.UsageError(
            "editing (--init_images) works on pixel-space models; this is a latent model "
            "(config.autoencoder.path)"
        )
    timeline.mark("built")
    params, source = load_params(setup)
    timeline.mark("restored")
    if mode is not None:
        return edit(mode, setup, params, source, out)
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


def edit_mode():
    """'sdedit', 'inpaint' or 'invert' from the flags, which must name exactly one with
    --init_images; None without it."""
    modes = {"sdedit": FLAGS.strength is not None, "inpaint": FLAGS.inpaint, "invert": FLAGS.invert}
    chosen = [mode for mode, on in modes.items() if on]
    if FLAGS.init_images is None:
        if chosen or FLAGS.mask is not None:
            raise app.UsageError(
                "--strength, --inpaint, --invert and --mask edit --init_images: give it"
            )
        return None
    if len(chosen) != 1:
        raise app.UsageError(
            "--init_images needs exactly one of --strength S (SDEdit), --inpaint (RePaint, "
            f"with --mask) and --invert; got {chosen or 'none'}"
        )
    if FLAGS.labels is not None or FLAGS.guidance is not None:
        raise app.UsageError("editing is unconditional: drop --labels and --guidance")
    if chosen[0] == "inpaint" and FLAGS.mask is None:
        raise app.UsageError("--inpaint needs --mask (white where the image is regenerated)")
    if chosen[0] == "invert" and FLAGS.mask is not None:
        raise app.UsageError("--invert takes no --mask")
    return chosen[0]


def edit(mode, setup, params, source, out):
    """--init_images edited as `mode` (edit_mode) says; the grid and npz written to OUT."""
    shape = setup.image_shape
    inputs = editor.read_images(FLAGS.init_images, shape)
    masks = None if FLAGS.mask is None else editor.read_masks(FLAGS.mask, shape, len(inputs))
    copies = FLAGS.num_samples if FLAGS["num_samples"].present and mode != "invert" else 1
    x_0 = np.tile(inputs, (copies, 1, 1, 1)).astype(np.float32) / 127.5 - 1
    mask = None
    if masks is not None:
        mask = np.tile(np.broadcast_to(masks, (len(inputs), *shape[:2], 1)), (copies, 1, 1, 1))
    tool, rng = editor.Editor(setup), jax.random.PRNGKey(FLAGS.seed)
    extra = {}
    if mode == "sdedit":
        result = tool.sdedit(params, rng, x_0, FLAGS.strength, mask)
    elif mode == "inpaint":
        result = tool.inpaint(params, rng, x_0, mask, FLAGS.jump_length, FLAGS.jump_n_sample)
    else:
        x_T = tool.invert(params, x_0)
        result = tool.reconstruct(params, x_T)
        extra = reconstruction_error(x_0, result) | {"x_T": x_T}
    save_edits(out, inputs, masks, images.to_uint8(result), source, **extra)


def reconstruction_error(x_0, x_0_again) -> dict:
    """RMSE in [-1, 1] units and PSNR in dB of the 8-bit reconstruction, printed."""
    rmse = float(np.sqrt(np.mean((x_0 - x_0_again) ** 2)))
    pixels = images.to_uint8(x_0_again).astype(np.float64) - images.to_uint8(x_0)
    psnr = 10 * np.log10(255.0**2 / max(np.mean(pixels**2), 1e-12))
    print(f"invert then sample: reconstruction RMSE {rmse:.4g} ([-1, 1] units), PSNR {psnr:.2f} dB")
    return dict(rmse=np.float32(rmse), psnr=np.float32(psnr))


def save_edits(out, inputs, masks, results, source, **extra):
    """OUT.png (rows: inputs, masks, results) and OUT.npz, from process 0."""
    if jax.process_index() != 0:
        return
    n, h, w, c = inputs.shape
    arrays = dict(inputs=inputs, images=results)
    rows = [inputs]
    if masks is not None:
        arrays["masks"] = np.broadcast_to(masks, (n, h, w, 1)).astype(np.uint8)
        rows.append(np.repeat(arrays["masks"] * 255, c, axis=3))
    out.parent.mkdir(parents=True, exist_ok=True)
    fs.save_npz(out.with_suffix(".npz"), compress=True, **arrays, **extra)
    grid = images.image_grid(np.concatenate([*rows, results]), n)
    fs.save_png(out.with_suffix(".png"), grid)
    print(f"wrote {len(results)} edits by {source} to {out.with_suffix('.png')} and .npz")


def run():
    define_flags()
    cli.run(main, __file__)


if __name__ == "__main__":
    run()
