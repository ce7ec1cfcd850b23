"""The first stage's objective: the discriminator's switch, the adaptive weight against
its formula (gradients through the last layer alone equal those through the whole
network), the hinge loss and the total, restated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import autoencoder, autoencoder_loss

CFG = autoencoder.AutoencoderConfig(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=2)
SPEC = autoencoder_loss.LossSpec(disc_start=5, kl_weight=1e-3, disc_ch=8, disc_layers=2)


@pytest.fixture(scope="module")
def setup():
    model = autoencoder.Autoencoder(CFG)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = model.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params
    )
    disc = autoencoder_loss.init_discriminator(jax.random.key(3), (16, 16, 3), SPEC)
    return model, params, disc, x


def test_switch_at_its_step():
    steps = jnp.arange(10)
    np.testing.assert_array_equal(autoencoder_loss.switch(steps, 5), (np.arange(10) >= 5) * 1.0)


def test_adaptive_weight_formula():
    a, b = np.array([3.0, 4.0]), np.array([0.6, 0.8])  # norms 5 and 1
    np.testing.assert_allclose(autoencoder_loss.adaptive_weight(a, b, 0.5), 0.5 * 5 / (1 + 1e-4))
    assert float(autoencoder_loss.adaptive_weight(a, np.zeros(2), 1.0)) == 1e4  # clipped


def test_hinge_loss():
    real, fake = np.array([2.0, 0.5, -1.0]), np.array([-2.0, 0.0, 1.5])
    want = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(autoencoder_loss.hinge_d_loss(real, fake), want, rtol=1e-6)


def total_loss(setup, step):
    model, params, disc, x = setup
    mean, logvar = model.apply({"params": params}, x, method="encode")
    h = model.apply({"params": params}, mean, method="decode_features")
    last = (params["decoder"]["conv_out"], autoencoder.last_layer(CFG))
    return autoencoder_loss.generator_loss(x, h, last, mean, logvar, disc, step, SPEC)


def test_last_layer_is_the_decoder_end(setup):
    model, params, _, x = setup
    mean, _ = model.apply({"params": params}, x, method="encode")
    h = model.apply({"params": params}, mean, method="decode_features")
    got = autoencoder.last_layer(CFG)(params["decoder"]["conv_out"], h)
    np.testing.assert_allclose(
        got, model.apply({"params": params}, mean, method="decode"), atol=1e-5
    )


def test_total_before_and_after_the_switch(setup):
    """Before disc_start: L_rec + λ_KL KL. From it: + λ_adv L_G, with λ_adv from gradients
    taken through the whole network (restated)."""
    model, params, disc, x = setup
    before, m = total_loss(setup, 4)
    rec = np.sum(np.abs(np.asarray(x) - model.apply({"params": params}, x)[0])) / 2
    np.testing.assert_allclose(m["rec"], rec, rtol=1e-5)
    np.testing.assert_allclose(before, m["rec"] + 1e-3 * m["kl"], rtol=1e-6)
    after, m = total_loss(setup, 5)

    def whole(p, which):
        mean, _ = model.apply({"params": p}, x, method="encode")
        x_hat = model.apply({"params": p}, mean, method="decode")
        if which == "rec":
            return jnp.sum(jnp.abs(x - x_hat)) / 2
        return -jnp.mean(autoencoder_loss.discriminator_logits(disc, x_hat, SPEC))

    def norm(grads):  # of the last layer's kernel, as LDM's adaptive weight
        return np.linalg.norm(np.asarray(grads["decoder"]["conv_out"]["kernel"]))

    g_rec, g_adv = (jax.grad(whole)(params, w) for w in ("rec", "g"))
    weight = 0.5 * min(norm(g_rec) / (norm(g_adv) + 1e-4), 1e4)
    np.testing.assert_allclose(m["disc_weight"], weight, rtol=1e-4)
    np.testing.assert_allclose(after, m["rec"] + 1e-3 * m["kl"] + weight * m["g_loss"], rtol=1e-5)
    assert float(m["disc_on"]) == 1.0 and float(after) != float(before)


def test_total_is_differentiable(setup):
    model, params, disc, x = setup

    def loss(p):
        mean, logvar = model.apply({"params": p}, x, method="encode")
        h = model.apply({"params": p}, mean, method="decode_features")
        last = (p["decoder"]["conv_out"], autoencoder.last_layer(CFG))
        return autoencoder_loss.generator_loss(x, h, last, mean, logvar, disc, 10, SPEC)[0]

    grads = jax.grad(loss)(params)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(grads))
    assert float(np.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
    logits = autoencoder_loss.discriminator_logits(disc, x, SPEC)
    # 4x4 convolutions padded by 1: 16 -> 8 -> 4 (stride 2), -> 3 (stride 1), -> 2 (the logit)
    assert logits.shape == (2, 2, 2, 1)
