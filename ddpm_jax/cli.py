"""What the entry points (train.py, sample.py, evaluate.py) share: library chatter off,
and a user's mistake reported as one line instead of a traceback.

TensorFlow's C++ lines (its oneDNN notice at import, tf.data's notice that a cached dataset
was not read to its end, which every run shorter than an epoch ends with) are silenced by
quiet_tensorflow(), which each entry point calls before anything imports TensorFlow.
`--verbosity=1` (absl) shows the other libraries' Python log records again.
"""

import logging
import os
import sys
from pathlib import Path

from absl import app, flags

from ddpm_jax.errors import UserError, file_system_error

PACKAGE_DIR = str(Path(__file__).resolve().parent)
# Warnings that say nothing a user can act on.
HARMLESS = (
    "_CHECKPOINT_METADATA",  # orbax, reading a checkpoint written without it
    "has no dataset_info.json",  # TFDS, looking for a dataset that is not prepared yet
    "did not fully read the dataset being cached",  # tf.data, a bound on a few batches
)


def quiet_tensorflow():
    """TensorFlow's C++ INFO and warnings off, and its oneDNN kernels (whose notice is
    printed at import) unused: TensorFlow only reads data here. Settings already in the
    environment win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class QuietLibraries(logging.Filter):
    """Keep every record of this project (the package and the entry point) and the other
    libraries' warnings and errors, less the HARMLESS ones, as one line each (without their
    tracebacks: an error that stops a run is reported once, at the end)."""

    def __init__(self, entry_point):
        super().__init__()
        self.ours = (PACKAGE_DIR, str(Path(entry_point).resolve()))

    def filter(self, record):
        if record.pathname.startswith(self.ours):
            return True
        message = record.getMessage()
        if record.levelno < logging.WARNING or any(text in message for text in HARMLESS):
            return False
        record.msg, record.args = (message.strip().splitlines() or [""])[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def quiet_libraries(entry_point):
    """Install QuietLibraries on the root handlers (absl's among them)."""
    quiet = QuietLibraries(entry_point)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def run(main, entry_point):
    """absl's app.run(main), with quiet libraries; a UserError or an error of the file
    system is one line (exit 1), Ctrl-C one line (exit 130)."""

    def wrapped(argv):
        verbose = flags.FLAGS.verbosity >= 1
        if not verbose:
            quiet_libraries(entry_point)
        try:
            return main(argv)
        except KeyboardInterrupt:
            if verbose:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            line = str(e) if isinstance(e, UserError) else file_system_error(e)
            if verbose or line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 1

    app.run(wrapped)
