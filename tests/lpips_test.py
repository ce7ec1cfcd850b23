"""LPIPS against the `lpips` package (tests/fixtures/make_lpips_references.py: random VGG16
and linear weights, the linear layers read from a legacy-format torch file), and its
properties."""

import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax import lpips, torch_pickle
from ddpm_jax.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import diffusers_weights  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def case():
    with np.load(DATA / "lpips_references.npz") as data:
        refs = {k: data[k] for k in data.files}
    keys = [str(k) for k in refs["keys"]]
    vgg = diffusers_weights.draw(keys, json.loads(str(refs["shapes"])), int(refs["seed"]))
    lin = torch_pickle.load(DATA / "lpips_lin_random.pth")
    return refs, lpips.params_from_state_dicts(vgg, lin), lin


def test_legacy_torch_file_reads_without_torch(case):
    refs, _, lin = case
    assert sorted(lin) == sorted(k.removeprefix("lin/") for k in refs if k.startswith("lin/"))
    for name, value in lin.items():
        np.testing.assert_array_equal(value, refs[f"lin/{name}"])


def test_matches_the_lpips_package(case):
    refs, params, _ = case
    got = jax.jit(lpips.distance)(params, refs["x"], refs["x_hat"])
    np.testing.assert_allclose(got, refs["distance"], rtol=1e-5)


def test_identity_symmetry_and_grey(case):
    refs, params, _ = case
    x, x_hat = refs["x"], refs["x_hat"]
    fn = jax.jit(lpips.distance)
    np.testing.assert_allclose(fn(params, x, x), 0.0, atol=1e-12)
    np.testing.assert_allclose(fn(params, x_hat, x), fn(params, x, x_hat), rtol=1e-6)
    grey, grey_hat = x[..., :1], x_hat[..., :1]
    rgb = lambda a: np.repeat(a, 3, axis=-1)  # noqa: E731
    np.testing.assert_allclose(fn(params, grey, grey_hat), fn(params, rgb(grey), rgb(grey_hat)),
                               rtol=1e-6)  # fmt: skip


def test_folder_loading_and_refusals(case, tmp_path):
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        lpips.load(tmp_path)
    shutil.copy(DATA / "lpips_lin_random.pth", tmp_path / "vgg.pth")
    shutil.copy(DATA / "lpips_lin_random.pth", tmp_path / "vgg16-397923af.pth")
    with pytest.raises(UserError, match="features.0: not torchvision's"):
        lpips.load(tmp_path)


def test_first_stage_loss_adds_the_perceptual_term_per_pixel(case):
    """L_rec with perceptual_weight λ_p is Σ|x - x̂| / B + λ_p · mean_b LPIPS · H·W·C (the
    distance of each example added at each of its pixels, as LDM)."""
    from ddpm_jax import autoencoder_loss

    refs, params, _ = case
    x, x_hat = refs["x"], refs["x_hat"]

    def both(x, x_hat):
        perceptual = functools.partial(lpips.distance, params)
        rec = autoencoder_loss.reconstruction(x, x_hat, "l1", perceptual, 0.5)
        return rec, perceptual(x, x_hat)

    rec, d = jax.jit(both)(x, x_hat)
    want = np.abs(x - x_hat).sum() / 2 + 0.5 * np.mean(d) * 32 * 32 * 3
    np.testing.assert_allclose(rec, want, rtol=1e-5)
