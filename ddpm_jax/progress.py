"""The one progress bar: shown by process 0 alone, its clock started once the first piece
of work is done, so that its rate and ETA leave out compilation. While it is shown, log
lines (absl's handler) are written above it instead of through it."""

import jax
import tqdm
from absl import logging


class _AboveTheBar:
    """A stream for absl's log handler that writes each line above the shown bars."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self):
        self.stream.flush()


class Progress:
    """A bar over `total` units (sampling steps, batches, training steps). Nothing is shown
    unless `enabled` and this is process 0; `update` then waits for the work it counts."""

    def __init__(self, total: int, enabled: bool, desc: str | None = None, unit: str = "step"):
        self.total, self.desc, self.unit, self.bar = total, desc, unit, None
        self.enabled = enabled and jax.process_index() == 0

    def start(self, done: int = 0) -> None:
        """Show the bar now, with `done` units already counted and the clock at zero."""
        if self.enabled and self.bar is None:
            self.bar = tqdm.tqdm(
                total=self.total, initial=done, desc=self.desc, unit=self.unit, dynamic_ncols=True
            )
            handler = logging.get_absl_handler().python_handler
            self._log_stream = handler.stream
            handler.setStream(_AboveTheBar(self._log_stream))

    def update(self, n: int, result=None) -> None:
        """Count n more units once `result` (their output) is computed; the first call
        starts the clock with them counted (and shows no bar if they are all the work)."""
        if not self.enabled:
            return
        jax.block_until_ready(result)
        if self.bar is None:
            if n < self.total:
                self.start(n)
        else:
            self.bar.update(n)

    def advance_to(self, done: int, text: str = "") -> None:
        """Move to `done` units, with `text` after the bar (e.g. the latest metrics)."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text)

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            logging.get_absl_handler().python_handler.setStream(self._log_stream)
            self.bar = None
