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

from ddpm_jax.errors import UserError

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
    libraries' warnings and errors, less the HARMLESS ones."""

    def __init__(self, entry_point):
        super().__init__()
        self.ours = (PACKAGE_DIR, str(Path(entry_point).resolve()))

    def filter(self, record):
        if record.pathname.startswith(self.ours):
            return True
        return record.levelno >= logging.WARNING and not any(
            text in record.getMessage() for text in HARMLESS
        )


def quiet_libraries(entry_point):
    """Install QuietLibraries on the root handlers (absl's among them)."""
    quiet = QuietLibraries(entry_point)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def run(main, entry_point):
    """absl's app.run(main), with quiet libraries and UserError as one line, exit 1."""

    def wrapped(argv):
        verbose = flags.FLAGS.verbosity >= 1
        if not verbose:
            quiet_libraries(entry_point)
        try:
            return main(argv)
        except UserError as e:
            if verbose:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 1

    app.run(wrapped)
