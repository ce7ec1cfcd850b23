"""The first-stage autoencoder: shapes for several f, the KL term against its closed form,
and parity with diffusers' AutoencoderKL (tests/data/diffusers_references.npz)."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ddpm_jax import autoencoder, diffusers_vae
from ddpm_jax.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import diffusers_weights  # noqa: E402

REFERENCES = Path(__file__).resolve().parent / "data" / "diffusers_references.npz"


@pytest.mark.parametrize("ch_mult, f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_shapes_for_several_f(ch_mult, f):
    cfg = autoencoder.AutoencoderConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=3,
                                        out_ch=1)  # fmt: skip
    model, x = autoencoder.Autoencoder(cfg), jnp.zeros((2, 16, 16, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    out, mean, logvar = jax.eval_shape(lambda p: model.apply(p, x, jax.random.key(1)), params)
    assert cfg.factor == f and mean.shape == logvar.shape == (2, 16 // f, 16 // f, 3)
    assert cfg.latent_shape((16, 16, 1)) == mean.shape[1:] and out.shape == x.shape
    if f > 1:
        with pytest.raises(ValueError, match="divisible"):
            cfg.latent_shape((16 + f // 2, 16, 1))


def test_kl_against_closed_form_and_sampling():
    """½ Σ(μ² + σ² - 1 - log σ²) per example, restated; it is KL(N(μ, σ²) || N(0, 1)), the
    mean over draws z of log q(z) - log N(z; 0, 1)."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    logvar = (0.5 * rng.standard_normal((2, 3, 3, 2))).astype(np.float32)
    pairs = [zip(mean[i].ravel(), logvar[i].ravel(), strict=True) for i in range(2)]
    want = [0.5 * sum(m * m + np.exp(v) - 1 - v for m, v in pair) for pair in pairs]
    np.testing.assert_allclose(autoencoder.kl(mean, logvar), want, rtol=1e-5)
    keys = jax.random.split(jax.random.key(1), 20_000)
    z = jax.vmap(lambda k: autoencoder.sample_posterior(k, mean, logvar))(keys)
    log_q = -0.5 * ((z - mean) ** 2 / np.exp(logvar) + logvar)
    log_p = -0.5 * z**2
    monte_carlo = np.asarray((log_q - log_p).sum(axis=(2, 3, 4)).mean(0))
    np.testing.assert_allclose(monte_carlo, want, rtol=0.03)
    assert np.all(np.asarray(autoencoder.kl(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)))) == 0)


def write_vae(folder, refs, name):
    keys = [str(k) for k in refs[f"{name}/keys"]]
    shapes = json.loads(str(refs[f"{name}/shapes"]))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(str(refs[f"{name}/config"]))
    state = diffusers_weights.draw(keys, shapes, int(refs[f"{name}/seed"]))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def rel_l2(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def refs():
    with np.load(REFERENCES) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name, scale", [("vae", 0.18215), ("vae_f4", 0.5)])
def test_matches_diffusers_autoencoder_kl(refs, name, scale, tmp_path):
    """Encode's mean and log-variance and decode equal diffusers' (float64) to 1e-5."""
    cfg, params, got_scale = diffusers_vae.load(write_vae(tmp_path / "vae", refs, name),
                                                precision="highest")  # fmt: skip
    model, variables = autoencoder.Autoencoder(cfg), {"params": params}
    mean, logvar = jax.jit(lambda x: model.apply(variables, x, method="encode"))(refs[f"{name}/x"])
    decoded = jax.jit(lambda z: model.apply(variables, z, method="decode"))(refs[f"{name}/z"])
    assert got_scale == scale
    assert rel_l2(mean, refs[f"{name}/mean"]) <= 1e-5
    assert rel_l2(logvar, refs[f"{name}/logvar"]) <= 1e-5
    assert rel_l2(decoded, refs[f"{name}/decoded"]) <= 1e-5


def test_pipeline_vae_folder_and_refusals(refs, tmp_path):
    """A pipeline's vae/ is found; other blocks and options are refused by name."""
    write_vae(tmp_path / "pipe" / "vae", refs, "vae")
    cfg, _, _ = diffusers_vae.load(tmp_path / "pipe")
    assert (cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.factor) == (32, (1, 2), 4, 2)
    config = json.loads(str(refs["vae/config"]))
    for change, named in (
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDown"),
        ({"use_quant_conv": False}, "use_quant_conv=False"),
        ({"shift_factor": 0.1}, "shift_factor=0.1"),
        ({"spatial_norm": True}, "spatial_norm"),
    ):
        with pytest.raises(UserError, match=named):
            diffusers_vae.autoencoder_config(config | change)
