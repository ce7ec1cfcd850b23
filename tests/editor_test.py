"""editor: editing.py's operations on chunks over devices equal the plain functions, the
reading of images and masks, and sample.py's editing flags end to end."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ddpm_jax import config_lib, editing, editor, reverse, solvers
from ddpm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def setup_of(tiny_model, **sampling):
    config = tiny_model[0].copy_and_resolve_references()
    config.sampling.update(sampling)
    return config_lib.build(config)


def images_and_mask(n=6):
    x_0 = np.clip(np.random.default_rng(0).normal(size=(n, 8, 8, 1)), -1, 1).astype(np.float32)
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[:, :, :4] = 1.0  # regenerate the left half
    return x_0, mask


def test_sdedit_and_inpaint_on_devices_equal_the_plain_functions(tiny_model):
    """4 devices in chunks of 4 (6 images: two chunks) equal editing.sdedit / repaint on the
    whole batch at once; the kept half is the input, exactly."""
    params, (x_0, mask) = tiny_model[2], images_and_mask()
    setup = setup_of(tiny_model, method="unipc2", num_steps=8, batch_size=4)
    rng, tool = jax.random.PRNGKey(3), editor.Editor(setup)
    keys = reverse.example_keys(rng, 6)
    model_fn = lambda x, t: setup.model.apply({"params": params}, x, t)  # noqa: E731
    got = tool.sdedit(params, rng, x_0, 0.5, mask)
    ts = editing.strength_timesteps(solvers.spaced_timesteps(20, 8), 0.5)
    want = editing.sdedit(setup.schedule, setup.diffusion, model_fn, x_0, ts, keys, "unipc2", mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., 4:, :], x_0[..., 4:, :])
    filled = tool.inpaint(params, rng, x_0, mask, jump_length=3, jump_n_sample=2)
    sched, respaced_fn = reverse.respaced(setup.schedule, model_fn, 8)  # RePaint's own chain
    levels = editing.repaint_levels(8, 3, 2)
    want = editing.repaint(sched, setup.diffusion, respaced_fn, x_0, mask, keys, levels)
    np.testing.assert_allclose(filled, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(filled[..., 4:, :], x_0[..., 4:, :])
    with pytest.raises(UserError, match="strength must lie in"):
        tool.sdedit(params, rng, x_0, -0.1)


def test_invert_and_reconstruct_and_ancestral_sdedit(tiny_model):
    params, (x_0, mask) = tiny_model[2], images_and_mask(4)
    setup = setup_of(tiny_model, method="ancestral", num_steps=10, batch_size=4, spacing="leading")
    tool = editor.Editor(setup)
    model_fn = lambda x, t: setup.model.apply({"params": params}, x, t)  # noqa: E731
    x_T = tool.invert(params, x_0)
    ts = solvers.spaced_timesteps(20, 10, "leading")
    want = editing.invert(setup.schedule, setup.diffusion, model_fn, x_0, ts[::-1])
    np.testing.assert_allclose(x_T, want, rtol=1e-5, atol=1e-5)
    back = tool.reconstruct(params, x_T)
    want = solvers.solve(setup.schedule, setup.diffusion, model_fn, want, ts, "ddim")
    np.testing.assert_allclose(back, want, rtol=1e-5, atol=1e-5)
    # Algorithm 2 from t = strength·T on the respaced chain; strength 0 is the input.
    np.testing.assert_array_equal(tool.sdedit(params, jax.random.PRNGKey(0), x_0, 0.0), x_0)
    edited = tool.sdedit(params, jax.random.PRNGKey(0), x_0, 0.7, mask)
    np.testing.assert_array_equal(edited[..., 4:, :], x_0[..., 4:, :])
    assert np.abs(edited - x_0).max() > 0.05


def test_images_and_masks_are_read_from_folders_and_npz(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    got = editor.read_images(folder, (8, 8, 3))
    np.testing.assert_array_equal(got, rgb)
    gray = editor.read_images(folder, (8, 8, 1))  # PIL's luma, as the model has 1 channel
    want = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])[..., None]
    assert np.abs(gray.astype(int) - want).max() <= 1
    np.savez(tmp_path / "x.npz", images=rgb[..., 0])
    assert editor.read_images(tmp_path / "x.npz", (8, 8, 3)).shape == (2, 8, 8, 3)
    with pytest.raises(UserError, match="resize them"):
        editor.read_images(folder, (16, 16, 3))
    with pytest.raises(UserError, match="no array 'images'"):
        np.savez(tmp_path / "y.npz", pictures=rgb)
        editor.read_images(tmp_path / "y.npz", (8, 8, 3))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :3] = 200
    Image.fromarray(mask).save(tmp_path / "m.png")
    m = editor.read_masks(tmp_path / "m.png", (8, 8, 3), 2)
    assert m.shape == (1, 8, 8, 1) and m[0, :, :3].all() and not m[0, :, 3:].any()
    with pytest.raises(UserError, match="one per image"):
        np.savez(tmp_path / "m3.npz", masks=np.zeros((3, 8, 8), np.uint8))
        editor.read_masks(tmp_path / "m3.npz", (8, 8, 3), 2)


def sample_py(*args):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--config", "tiny", "--compilation_cache="]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_sample_py_edits_images_and_refuses_bad_flags(tmp_path, tiny_model):
    """SDEdit with a mask: a grid of inputs, masks and two rows of results, the kept half
    of every result the input's pixels; flags that do not go together fail at once."""
    params_dir = tmp_path / "params"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, tiny_model[2])
    x_0, mask = images_and_mask(3)
    pixels = np.round((x_0 + 1) * 127.5).astype(np.uint8)
    np.savez(tmp_path / "in.npz", images=pixels)
    np.savez(tmp_path / "mask.npz", masks=(mask[0] * 255).astype(np.uint8)[None])
    out = tmp_path / "edit"
    result = sample_py(
        f"--params={params_dir}", f"--init_images={tmp_path / 'in.npz'}", "--strength=0.6",
        f"--mask={tmp_path / 'mask.npz'}", "--num_samples=2", f"--out={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = np.load(out.with_suffix(".npz"))
    assert saved["images"].shape == (6, 8, 8, 1) and saved["masks"].shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(
        saved["images"][..., 4:, :], np.tile(pixels, (2, 1, 1, 1))[..., 4:, :]
    )
    assert not np.array_equal(saved["images"][:3], saved["images"][3:])  # two draws each
    assert np.asarray(Image.open(out.with_suffix(".png"))).shape[:2] == (4 * 8, 3 * 8)
    for flags, words in (
        (["--strength=0.5", "--invert"], "exactly one of"),
        (["--inpaint"], "--inpaint needs --mask"),
    ):
        bad = sample_py(
            f"--params={params_dir}", f"--init_images={tmp_path}", *flags, f"--out={out}"
        )
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr
    bad = sample_py(f"--params={params_dir}", "--strength=0.5", f"--out={out}")
    assert bad.returncode != 0 and "give it" in bad.stderr, bad.stderr


def test_the_reconstruction_error_of_invert():
    from ddpm_jax import sample

    x_0 = np.zeros((2, 4, 4, 1), np.float32)
    got = sample.reconstruction_error(x_0, x_0 + 0.1)  # pixels 128 -> 140
    assert abs(got["rmse"] - 0.1) < 1e-6
    assert abs(got["psnr"] - 10 * np.log10(255**2 / 12**2)) < 1e-4
