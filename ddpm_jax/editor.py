"""Editing given images with a trained model, on every device: `Editor` runs editing.py's
DDIM inversion, SDEdit and RePaint on chunks of images, and `read_images` / `read_masks`
load what sample.py's --init_images and --mask name.

    editor = Editor(setup)
    x_T = editor.invert(params, x_0)                  # x_0: float NHWC in [-1, 1]
    x_0_again = editor.reconstruct(params, x_T)
    edited = editor.sdedit(params, rng, x_0, strength=0.6, mask=mask)
    filled = editor.inpaint(params, rng, x_0, mask)  # RePaint

The chain is setup.sampler's: its timesteps (num_steps, spacing) and method. SDEdit with
a solver (or DDIM, η = 0) runs solvers.solve; with Algorithm 2 (method ancestral) the
RePaint chain without jumps on the (respaced) chain. A class model edits unconditionally
(∅). Masks are 1 where the image is regenerated and 0 where it is kept.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import editing, fs, reverse, sharding, solvers
from ddpm_jax.errors import UserError
from ddpm_jax.spec import SamplerMethod, Setup


class Editor:
    """Editing on `devices` (default all), in chunks of at most setup.sampler.batch_size
    images (a multiple of the device count); image i depends on (rng, i, x_0^i) alone."""

    def __init__(self, setup: Setup, devices=None):
        if setup.latent is not None:
            raise UserError("editing works on pixel-space models, not on a latent model")
        self.setup, self.mesh = setup, sharding.make_mesh(devices)
        self.max_chunk = -(-setup.sampler.batch_size // self.mesh.size) * self.mesh.size
        sampler, T = setup.sampler, setup.schedule.num_timesteps
        self.timesteps = solvers.spaced_timesteps(T, sampler.num_steps, sampler.spacing)
        self.programs = {}  # (fn, static settings) -> its jitted form

    def invert(self, params, x_0) -> np.ndarray:
        """x_T by DDIM inversion over the sampler's timesteps, increasing."""
        return self._run(_invert, params, None, x_0, timesteps=tuple(self.timesteps[::-1]))

    def reconstruct(self, params, x_T) -> np.ndarray:
        """x_0 from x_T by DDIM (η = 0) over the sampler's timesteps."""
        ts = tuple(self.timesteps)
        return self._run(_solve, params, None, x_T, timesteps=ts, method=SamplerMethod.DDIM)

    def sdedit(self, params, rng, x_0, strength: float, mask=None) -> np.ndarray:
        """SDEdit from t = strength·T back to x_0; the mask's 0 region kept (module doc)."""
        method = self.setup.sampler.method
        if method == SamplerMethod.DDIM and self.setup.sampler.eta:
            raise UserError("SDEdit with DDIM is deterministic: set config.sampling.eta = 0")
        if not 0.0 <= strength <= 1.0:
            raise UserError(
                f"strength must lie in [0, 1] (the fraction of the chain), got {strength}"
            )
        if method == SamplerMethod.ANCESTRAL:
            top = int(round(strength * self.setup.sampler.num_steps)) - 1
            if top < 0:
                return np.asarray(x_0, np.float32)
            levels = editing.repaint_levels(self.setup.sampler.num_steps, 1, 1, top)
            mask = np.ones_like(x_0[..., :1]) if mask is None else mask
            return self._run(_repaint, params, rng, x_0, mask, levels=tuple(levels))
        ts = tuple(editing.strength_timesteps(self.timesteps, strength))
        return self._run(_sdedit, params, rng, x_0, mask, timesteps=ts, method=method)

    def inpaint(self, params, rng, x_0, mask, jump_length=10, jump_n_sample=10) -> np.ndarray:
        """RePaint on the sampler's (respaced) chain with its jump schedule."""
        try:
            levels = editing.repaint_levels(
                self.setup.sampler.num_steps, jump_length, jump_n_sample
            )
        except ValueError as e:
            raise UserError(str(e)) from None
        return self._run(_repaint, params, rng, x_0, mask, levels=tuple(levels))

    def program(self, fn, **static):
        """fn jitted with the setup and the static settings bound, one per settings."""
        key = (fn, tuple(sorted(static.items())))
        if key not in self.programs:
            bound = functools.partial(fn, setup=self.setup, **static)
            self.programs[key] = jax.jit(bound, out_shardings=sharding.batch_sharding(self.mesh))
        return self.programs[key]

    def _run(self, fn, params, rng, x, mask=None, **static) -> np.ndarray:
        """fn on chunks of x (and the mask), padded to the devices, gathered to the host."""
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[1:] != tuple(self.setup.image_shape):
            raise UserError(
                f"images must be (N, {', '.join(map(str, self.setup.image_shape))}) like the "
                f"model's, got {x.shape}"
            )
        if mask is not None:
            mask = np.broadcast_to(np.asarray(mask, np.float32), x.shape[:3] + (1,))
        rng = jax.random.PRNGKey(0) if rng is None else rng
        run = self.program(fn, **static)
        params = jax.device_put(params, sharding.replicated(self.mesh))
        size = min(self.max_chunk, -(-len(x) // self.mesh.size) * self.mesh.size)
        out = []
        for start in range(0, len(x), size):
            part = [_pad(a[start : start + size], size) for a in (x, mask) if a is not None]
            part = jax.device_put(part, sharding.batch_sharding(self.mesh))
            y = run(params, rng, jnp.asarray(start, jnp.int32), *part)
            out.append(np.asarray(multihost_utils.process_allgather(y, tiled=True)))
        return np.concatenate(out)[: len(x)]


def _pad(a, size):
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


def _keys(rng, offset, n):
    return reverse.example_keys(rng, n, offset)


def _model_fn(setup, params):
    """The network as model_fn(x_t, t); a class model's unconditional pass (∅)."""
    return lambda x, t: setup.model.apply({"params": params}, x, t, None)


def _invert(params, rng, offset, x_0, *, setup, timesteps):
    model_fn = _model_fn(setup, params)
    return editing.invert(setup.schedule, setup.diffusion, model_fn, x_0, timesteps)


def _solve(params, rng, offset, x_T, *, setup, timesteps, method):
    model_fn = _model_fn(setup, params)
    return solvers.solve(setup.schedule, setup.diffusion, model_fn, x_T, timesteps, method)


def _sdedit(params, rng, offset, x_0, mask=None, *, setup, timesteps, method):
    keys, model_fn = _keys(rng, offset, x_0.shape[0]), _model_fn(setup, params)
    return editing.sdedit(
        setup.schedule, setup.diffusion, model_fn, x_0, timesteps, keys, method, mask
    )


def _repaint(params, rng, offset, x_0, mask, *, setup, levels):
    keys, model_fn, sched = (
        _keys(rng, offset, x_0.shape[0]),
        _model_fn(setup, params),
        setup.schedule,
    )
    if setup.respaced:
        sched, model_fn = reverse.respaced(sched, model_fn, setup.sampler.num_steps)
    return editing.repaint(sched, setup.diffusion, model_fn, x_0, mask, keys, levels)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_images(path, image_shape, key="images") -> np.ndarray:
    """uint8 NHWC images from an .npz (array `key`, NHWC or NHW) or a folder of image
    files (sorted by name), in the model's channels; sizes must be the model's."""
    path = fs.as_path(path)
    if str(path).endswith(".npz"):
        arrays = fs.load_npz(path)
        if key not in arrays:
            raise UserError(f"{path} has no array {key!r} (it has {sorted(arrays)})")
        images = arrays[key]
        images = images[..., None] if images.ndim == 3 else images
    else:
        images = np.stack([_read_image(p, image_shape[-1]) for p in _image_files(path)])
    h, w, c = image_shape
    if images.ndim != 4 or images.shape[1:3] != (h, w) or images.shape[3] not in (1, 3):
        raise UserError(
            f"{path}: images of shape {images.shape[1:]} do not fit the model's {h}x{w}: "
            "resize them to that size first"
        )
    if images.shape[3] != c:  # gray to RGB or RGB to gray (ITU-R 601 luma, as PIL)
        images = (
            np.repeat(images, 3, axis=3)
            if c == 3
            else np.round(images @ np.array([0.299, 0.587, 0.114]))[..., None]
        )
    return images.astype(np.uint8)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder} is neither an .npz file nor a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path, channels: int) -> np.ndarray:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(path.read_bytes())).convert("L" if channels == 1 else "RGB")
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def read_masks(path, image_shape, num_images: int) -> np.ndarray:
    """float32 (N or 1, H, W, 1) masks in {0, 1} (1: regenerate) from one image file, a
    folder of them or an .npz array `masks`: pixels of 128 and above are 1."""
    path = fs.as_path(path)
    h, w, _ = image_shape
    if path.suffix.lower() in IMAGE_SUFFIXES:
        masks = _read_image(path, 1)[None]
    else:
        masks = read_images(path, (h, w, 1), key="masks")
    if masks.shape[1:3] != (h, w) or len(masks) not in (1, num_images):
        raise UserError(
            f"{path}: {len(masks)} mask(s) of {masks.shape[1]}x{masks.shape[2]}; give one "
            f"{h}x{w} mask or one per image ({num_images})"
        )
    return (masks[..., :1] >= 128).astype(np.float32)
