"""What a training run shows and keeps besides checkpoints: metrics in TensorBoard and the
log (with a progress bar on a terminal), and grids of EMA samples."""

import sys
import time

import jax
import numpy as np
from absl import logging

from ddpm_jax import events, fs, guidance, images
from ddpm_jax.progress import Progress


class Reporter:
    """Metrics to TensorBoard and the log (process 0 only), with a progress bar on a terminal."""

    def __init__(self, workdir, num_steps: int, batch_size: int):
        self.enabled = jax.process_index() == 0
        self.num_steps, self.batch_size = num_steps, batch_size
        self.last_step = self.last_time = None
        self.writer = events.EventWriter(workdir / "tensorboard") if self.enabled else None
        self.bar = Progress(num_steps, self.enabled and sys.stderr.isatty())

    def begin(self, step: int) -> None:
        """Start the clocks once `step` is done: the first step's compilation is not counted
        in steps/s nor in the bar's rate and ETA."""
        self.last_step, self.last_time = step, time.time()
        self.bar.start(step)

    def write(self, step, scalars):
        """Log scalars at `step` and add steps/s and images/s since the last call."""
        now = time.time()
        if step > self.last_step:
            steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
            scalars = dict(
                scalars, steps_per_s=steps_per_s, images_per_s=steps_per_s * self.batch_size
            )
        self.last_step, self.last_time = step, now
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.scalar(step, name, value)
        text = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        if self.bar.shown:
            self.bar.advance_to(step, text)
        else:
            logging.info("step %d: %s", step, text)

    def image(self, step, name, grid):
        if self.enabled:
            self.writer.image(step, name, grid)

    def close(self):
        """End the bar and the event file (again: nothing)."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_samples(
    sample_fn, ema_params, step: int, seed: int, num_images: int, workdir, reporter: Reporter
) -> np.ndarray:
    """num_images EMA samples as workdir/samples/step_<N>.png (N zero-padded to 8 digits)
    and a TensorBoard image; a class model's in columns of its classes 0 .. K-1, at the
    sampler's guidance. The samples' key is fold_in(PRNGKey(seed + 1), step). Returns the
    grid."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), step)
    labels = guidance.balanced_labels(sample_fn.setup.num_classes, num_images)
    x = sample_fn(ema_params, rng, num_images, labels=labels)
    ncols = None if labels is None else min(num_images, len(set(labels)))
    grid = images.image_grid(x, ncols=ncols)
    if jax.process_index() == 0:
        out = workdir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        fs.save_png(out / f"step_{step:08d}.png", grid)
        reporter.image(step, "ema_samples", grid)
    return grid
