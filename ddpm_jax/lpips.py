"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), VGG16 variant v0.1: the perceptual term of LDM's first-stage loss.

d(x, x̂) = Σ_l mean_hw( w_l · (n_l(x) - n_l(x̂))² ), n_l the channel-normalised VGG16
activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the images shifted
and scaled per channel, w_l ≥ 0 the learned 1x1 weights of layer l. The weights are the
user's: a folder with torchvision's ImageNet VGG16 state dict (`vgg16*.pth`) and LPIPS's
linear layers (`vgg.pth`, v0.1), read without torch (torch_pickle.py). Nothing downloads.
Grey images are compared as RGB (the channel repeated).
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import torch_pickle
from ddpm_jax.errors import UserError

# torchvision's vgg16().features: (index of the conv, its width); a 2x2 max-pool before
# each stage after the first; LPIPS taps the ReLU after the last conv of each stage.
STAGES = (((0, 64), (2, 64)), ((5, 128), (7, 128)), ((10, 256), (12, 256), (14, 256)),
          ((17, 512), (19, 512), (21, 512)), ((24, 512), (26, 512), (28, 512)))  # fmt: skip
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS's ScalingLayer
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
    """(x, x̂) in [-1, 1], NHWC with 1 or 3 channels -> the distance per example."""

    @nn.compact
    def __call__(self, x, x_hat):
        total = 0.0
        for layer, f in enumerate(self.features(jnp.concatenate([x, x_hat]))):
            a, b = jnp.split(f / (jnp.sqrt(jnp.sum(f**2, -1, keepdims=True)) + 1e-10), 2)
            w = self.param(f"lin{layer}", nn.initializers.ones, (f.shape[-1],))
            total = total + jnp.mean(jnp.sum(w * (a - b) ** 2, -1), axis=(1, 2))
        return total

    def features(self, x):
        x = jnp.broadcast_to(x, (*x.shape[:3], 3)) if x.shape[-1] == 1 else x
        h, outs = (x - SHIFT) / SCALE, []
        for stage, convs in enumerate(STAGES):
            if stage:
                h = nn.max_pool(h, (2, 2), (2, 2))
            for index, width in convs:
                h = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"conv{index}")(h))
            outs.append(h)
        return outs


def params_from_state_dicts(vgg: dict, lin: dict) -> dict:
    """Flax parameters from torchvision's VGG16 state dict and LPIPS's lin state dict."""
    params = {}
    for index, _ in (c for stage in STAGES for c in stage):
        weight, bias = vgg.get(f"features.{index}.weight"), vgg.get(f"features.{index}.bias")
        if weight is None or bias is None:
            raise UserError(f"the VGG16 state dict has no features.{index}: not torchvision's")
        params[f"conv{index}"] = dict(kernel=np.transpose(weight, (2, 3, 1, 0)), bias=bias)
    for layer in range(len(STAGES)):
        w = lin.get(f"lin{layer}.model.1.weight")
        if w is None:
            raise UserError(f"the LPIPS weights have no lin{layer}: not LPIPS's vgg.pth v0.1")
        params[f"lin{layer}"] = np.reshape(w, (-1,))
    return params


def load(folder) -> dict:
    """The LPIPS parameters of a folder holding `vgg16*.pth` and `vgg.pth`."""
    folder = Path(folder).expanduser()
    vgg = sorted(folder.glob("vgg16*.pth")) if folder.is_dir() else []
    if not vgg or not (folder / "vgg.pth").is_file():
        raise UserError(
            f"config.loss.lpips_weights: {folder} must hold torchvision's VGG16 weights "
            "(vgg16-397923af.pth) and LPIPS's linear layers (vgg.pth of LPIPS v0.1); nothing "
            "is downloaded"
        )
    return params_from_state_dicts(torch_pickle.load(vgg[0]), torch_pickle.load(folder / "vgg.pth"))


def distance(params, x, x_hat) -> jax.Array:
    """LPIPS(x, x̂) per example."""
    return LPIPS().apply({"params": params}, x, x_hat)
