"""The first stage's training objective (Rombach et al. 2022, Appendix G; Esser et al. 2021):

    L_AE = L_rec(x, x̂) + λ_KL KL(q(z | x) || N(0, I)) + d(step) λ_adv L_G,

L_rec the per-pixel L1 (or L2) error summed over pixels and averaged over the batch, the KL
term likewise (autoencoder.kl), L_G = -E[D(x̂)] of a patch discriminator D, switched on at
`disc_start` (d(step) = 1 from then, 0 before), with the adaptive weight

    λ_adv = disc_weight · clip(‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-4), 0, 1e4),

w the kernel of the decoder's last layer (as LDM); D is trained on the hinge loss
½ E[relu(1 - D(x))] + ½ E[relu(1 + D(x̂))], also from `disc_start`. The gradients with
respect to w are taken through that layer alone (Autoencoder.decode_features returns its
input, autoencoder.last_layer applies it), so no second pass through the network.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import autoencoder


@dataclasses.dataclass(frozen=True)
class LossSpec:
    rec: str = "l1"  # or "l2"
    kl_weight: float = 1e-6
    disc_start: int = 50_001  # the step from which the discriminator trains and counts
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_ch: int = 64
    perceptual_weight: float = 0.0  # of LPIPS (lpips.py), added per pixel as LDM does
    lpips_weights: str = ""  # the folder of its weights (vgg16*.pth and vgg.pth)

    def __post_init__(self):
        if self.rec not in ("l1", "l2"):
            raise ValueError(f"rec must be 'l1' or 'l2', got {self.rec!r}")
        if min(self.kl_weight, self.disc_weight, self.disc_start, self.perceptual_weight) < 0:
            raise ValueError(
                "kl_weight, disc_weight, disc_start and perceptual_weight must be >= 0"
            )
        if self.perceptual_weight and not self.lpips_weights:
            raise ValueError(
                "perceptual_weight > 0 needs lpips_weights: a folder with torchvision's VGG16 "
                "weights (vgg16-397923af.pth) and LPIPS's vgg.pth (nothing is downloaded)"
            )

    @property
    def adversarial(self) -> bool:
        """Whether the patch discriminator exists (disc_weight > 0)."""
        return self.disc_weight > 0


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as LDM uses it: 4x4 convolutions, stride 2 for the first
    `layers`, LeakyReLU 0.2, BatchNorm on batch statistics, one logit per patch."""

    ch: int = 64
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1))
        h = nn.leaky_relu(nn.Conv(self.ch, (4, 4), (2, 2), pad)(x), 0.2)
        for n in range(1, self.layers + 1):
            stride = 2 if n < self.layers else 1
            width = self.ch * min(2**n, 8)
            h = nn.Conv(width, (4, 4), (stride, stride), pad, use_bias=False)(h)
            h = nn.leaky_relu(nn.BatchNorm(use_running_average=False)(h), 0.2)
        return nn.Conv(1, (4, 4), (1, 1), pad)(h)


def discriminator_logits(disc_params, x, spec: LossSpec):
    """D(x): patch logits, BatchNorm on the batch itself (no running averages are kept)."""
    model = PatchDiscriminator(spec.disc_ch, spec.disc_layers)
    logits, _ = model.apply({"params": disc_params}, x, mutable=["batch_stats"])
    return logits


def init_discriminator(rng, image_shape, spec: LossSpec):
    model = PatchDiscriminator(spec.disc_ch, spec.disc_layers)
    return jax.jit(model.init)(rng, jnp.zeros((2, *image_shape)))["params"]


def reconstruction(x, x_hat, kind: str, perceptual=None, weight=0.0) -> jax.Array:
    """Σ_pixels (|x - x̂| (or squared) + weight · LPIPS(x, x̂)), averaged over the batch
    (LDM adds the perceptual distance of each example at each of its pixels);
    perceptual(x, x̂) -> the distance per example, or None."""
    err = jnp.abs(x - x_hat) if kind == "l1" else (x - x_hat) ** 2
    total = jnp.sum(err)
    if perceptual is not None and weight:
        total += weight * jnp.sum(perceptual(x, x_hat)) * (x[0].size)
    return total / x.shape[0]


def switch(step, start) -> jax.Array:
    """d(step): 1.0 from step `start` on, 0.0 before."""
    return jnp.where(step >= start, 1.0, 0.0)


def adaptive_weight(rec_grad, g_grad, disc_weight) -> jax.Array:
    """λ_adv from the gradients of L_rec and L_G with respect to the last layer."""
    ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def hinge_d_loss(logits_real, logits_fake) -> jax.Array:
    return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def generator_loss(x, features, last, mean, logvar, disc_params, step, spec: LossSpec,
                   perceptual=None):  # fmt: skip
    """(L_AE, metrics) from the decoder's features before its last layer `last` (a
    function of its parameters w and the features: x̂ = last(w, features)), w inside;
    perceptual: LPIPS per example, where spec.perceptual_weight is on."""
    w, apply_last = last

    def rec_of(w_):
        x_hat = apply_last(w_, features)
        return reconstruction(x, x_hat, spec.rec, perceptual, spec.perceptual_weight)

    def g_of(w_):
        return -jnp.mean(discriminator_logits(disc_params, apply_last(w_, features), spec))

    rec, rec_grad = jax.value_and_grad(rec_of)(w)
    g_loss, g_grad = jax.value_and_grad(g_of)(w)
    kl = jnp.mean(autoencoder.kl(mean, logvar))
    d = switch(step, spec.disc_start)
    weight = adaptive_weight(rec_grad["kernel"], g_grad["kernel"], spec.disc_weight)
    total = rec + spec.kl_weight * kl + d * weight * g_loss
    return total, dict(rec=rec, kl=kl, g_loss=g_loss, disc_weight=weight, disc_on=d)
