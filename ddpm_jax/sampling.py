"""Drawing samples from a trained model: `make_sample_fn` and the `Sampler` it returns.

    setup = config_lib.build(config)
    sample_fn = sampling.make_sample_fn(setup)  # or make_sample_fn(config)
    params, step = sampling.restore_params(workdir, config)
    images = sample_fn(params, jax.random.PRNGKey(0), 64)  # uint8 NHWC

The chains themselves (Algorithm 2, DDIM, respacing) are reverse.py; this module splits
the samples into chunks over every device, shows progress over reverse steps and brings
the images back to the host.
"""

import enum
import functools
import math
import numbers
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import first_stage, images, programs, reverse, sharding, timeline
from ddpm_jax import guidance as guidance_lib  # `guidance` is also sample_fn's argument
from ddpm_jax.checkpointing import restore_params  # noqa: F401 (the Colab needs both)
from ddpm_jax.errors import UserError
from ddpm_jax.progress import Progress
from ddpm_jax.spec import Setup


class Output(enum.StrEnum):
    """What sample_fn returns: uint8 pixels, or floats in [-1, 1]."""

    UINT8 = "uint8"
    FLOAT = "float"


def check_num_samples(num_samples, image_shape: tuple[int, ...] = ()) -> None:
    """A whole number >= 1 whose images (float32, kept until the end) fit in this
    machine's memory."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise UserError(f"num_samples must be a whole number, got {num_samples!r}")
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")
    need, have = num_samples * math.prod(image_shape) * 4, _memory_bytes()
    if need > have:
        raise UserError(
            f"num_samples={num_samples} needs {need / 2**30:.3g} GiB for its images, more "
            f"than this machine's {have / 2**30:.3g} GiB: draw them in several calls"
        )


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Sampler:
    """sample_fn(params, rng, num_samples, output="uint8", labels=None, guidance=None) ->
    NumPy NHWC images.

    A class model takes labels (num_samples ints, or None for unconditional samples) and
    the guidance weight w (default setup.sampler.guidance). Any labels share one program,
    and every w > 0 another (two network passes per step); w = 0 runs one pass.

    Samples are drawn in chunks of at most setup.sampler.batch_size (a multiple of the
    device count, no larger than num_samples needs), each split over all devices, as
    segments of the chain (reverse.sample_segment) so that `progress` can show a bar over
    reverse steps; each chunk size compiles once, the segments share one program
    (`segment`). A latent model's params are a first_stage.LatentModel: its chunks are
    decoded at the end. Sample i depends only on (params, rng, i) (and its label and w): the
    result is the same for any chunk size or number of devices.
    """

    def __init__(self, setup: Setup, devices=None, progress: bool = False, desc="sampling"):
        self.setup, self.progress, self.desc = setup, progress, desc
        self.mesh = sharding.make_mesh(devices)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.num_steps = setup.sampler.num_steps
        self.length = reverse.segment_length(self.num_steps)
        if setup.sampler.method.multistep:  # a solver's history stays in one program
            self.length = self.num_steps
        self.init = jax.jit(
            functools.partial(reverse.sample_init, setup=setup),
            static_argnames="num_samples",
            out_shardings=self.batch_sharding,
        )
        self.segment = programs.CachedJit(
            functools.partial(reverse.sample_segment, setup=setup, length=self.length),
            f"sample_segment_{self.length}", (setup, self.length),
            out_shardings=self.batch_sharding,
        )  # fmt: skip
        self.max_chunk = -(-setup.sampler.batch_size // self.mesh.size) * self.mesh.size
        if setup.latent is not None:  # the latents decoded at the end of each chunk
            decode = functools.partial(first_stage.decode, setup.latent)
            self.decode = jax.jit(decode, out_shardings=self.batch_sharding)

    def __call__(
        self, params, rng: jax.Array, num_samples: int, output: Output | str = Output.UINT8,
        labels=None, guidance: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        if output not in tuple(Output):
            raise UserError(f"output must be 'uint8' or 'float', got {output!r}")
        # Kept on the devices; gathered to every host once, at the end.
        parts = self.chunks(params, rng, num_samples, labels, guidance)
        chunks = [c.block_until_ready() for c in parts]
        gathered = multihost_utils.process_allgather(chunks, tiled=True)
        x = np.concatenate([np.asarray(c) for c in gathered])[:num_samples]
        return images.to_uint8(x) if output == Output.UINT8 else x

    def chunks(
        self, params, rng: jax.Array, num_samples: int, labels=None, guidance=None
    ) -> Iterator[jax.Array]:
        """The chunks as sharded device arrays in [-1, 1], the last one possibly longer
        than needed (samples past num_samples are extra draws of the same stream)."""
        check_num_samples(num_samples, self.setup.data_shape)
        first_stage.check_params(self.setup, params)
        classes, default_w = self.setup.num_classes, self.setup.sampler.guidance
        labels, w = guidance_lib.check(classes, labels, guidance, num_samples, default_w)
        size = min(self.max_chunk, -(-num_samples // self.mesh.size) * self.mesh.size)
        params = jax.device_put(params, sharding.replicated(self.mesh))
        latent, params = (params, params.unet) if self.setup.latent else (None, params)
        w = jax.device_put(jnp.float32(w), sharding.replicated(self.mesh)) if w else None
        starts = range(0, num_samples, size)
        bar = Progress(len(starts) * self.num_steps, self.progress, self.desc)
        for start in starts:
            offset = jnp.asarray(start, jnp.int32)
            x, y = self.init(rng, offset, num_samples=size), self.chunk_labels(labels, start, size)
            for t_top in range(self.num_steps - 1, -1, -self.length):
                x = self.segment(params, rng, offset, x, jnp.asarray(t_top, jnp.int32), y, w)
                bar.update(self.length, x)
                k = (self.num_steps - 1 - t_top) // self.length + 1
                if start == 0 and k <= 2:  # the bench's rate of the first reverse steps
                    timeline.mark(f"segment{k}_done_{self.length}_steps", x)
            yield x if latent is None else self.decode(latent.autoencoder, latent.scale, x)
        bar.close()

    def chunk_labels(self, labels: np.ndarray | None, start: int, size: int) -> jax.Array | None:
        """A chunk's labels as a sharded array (∅ past the end), or None."""
        if labels is None:
            return None
        part = np.full((size,), self.setup.num_classes, np.int32)
        part[: len(labels[start : start + size])] = labels[start : start + size]
        return jax.make_array_from_callback((size,), self.batch_sharding, lambda i: part[i])


def make_sample_fn(setup, devices=None, progress: bool = False, desc="sampling") -> Sampler:
    """The Sampler of a typed setup (config_lib.build), or of a config, which is built
    (and checked) here: every device by default, a bar over reverse steps with
    `progress`."""
    if not isinstance(setup, Setup):
        from ddpm_jax import config_lib

        setup = config_lib.build(setup)
    return Sampler(setup, devices, progress, desc)
