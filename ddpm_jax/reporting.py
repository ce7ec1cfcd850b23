"""What a training run shows and keeps besides checkpoints: metrics in TensorBoard and the
log (with a progress bar on a terminal), and grids of EMA samples."""

import sys
import time

import jax
import tqdm
from absl import logging

from ddpm_jax import events, fs, guidance, sampling


class Reporter:
    """Metrics to TensorBoard and the log (process 0 only), with a progress bar on a terminal."""

    def __init__(self, workdir, num_steps, batch_size):
        self.enabled = jax.process_index() == 0
        self.num_steps, self.batch_size = num_steps, batch_size
        self.last_step = self.last_time = self.bar = None
        self.writer = events.EventWriter(workdir / "tensorboard") if self.enabled else None

    def begin(self, step):
        """Start the clocks once `step` is done: the first step's compilation is not counted
        in steps/s nor in the bar's rate and ETA."""
        self.last_step, self.last_time = step, time.time()
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm.tqdm(
                initial=step, total=self.num_steps, unit="step", dynamic_ncols=True
            )

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
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text)
        else:
            logging.info("step %d: %s", step, text)

    def image(self, step, name, grid):
        if self.enabled:
            self.writer.image(step, name, grid)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def write_samples(trainer, state, reporter, sample_fn):
    """config.training.num_sample_images EMA samples as workdir/samples/step_<N>.png
    (N zero-padded to 8 digits) and a TensorBoard image; a class model's in columns of its
    classes 0 .. K-1, at config.sampling.guidance."""
    config, n = trainer.config, trainer.config.training.num_sample_images
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), int(state.step))
    labels = guidance.balanced_labels(config, n)
    images = sample_fn(state.ema_params, rng, n, labels=labels)
    grid = sampling.image_grid(images, ncols=None if labels is None else min(n, len(set(labels))))
    if jax.process_index() == 0:
        out = trainer.workdir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        fs.save_png(out / f"step_{int(state.step):08d}.png", grid)
        reporter.image(int(state.step), "ema_samples", grid)
