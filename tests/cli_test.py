"""The entry points' shared behaviour: which log records are kept, and one-line errors."""

import logging
from pathlib import Path

from ddpm_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def record(pathname, level, message):
    return logging.LogRecord("absl", level, pathname, 1, message, None, None)


def test_quiet_libraries_keeps_ours_and_real_warnings():
    quiet = cli.QuietLibraries(ROOT / "train.py")
    ours = str(ROOT / "ddpm_jax" / "training.py")
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py"
    assert quiet.filter(record(ours, logging.INFO, "step 4: loss 0.1"))
    assert quiet.filter(record(str(ROOT / "train.py"), logging.INFO, "config: ..."))
    assert not quiet.filter(record(orbax, logging.INFO, "Saving checkpoint at step 4"))
    assert quiet.filter(record(orbax, logging.WARNING, "No space left on device"))
    harmless = "Missing _CHECKPOINT_METADATA file; reading without it"
    assert not quiet.filter(record(orbax, logging.WARNING, harmless))
    assert quiet.filter(record(ours, logging.WARNING, harmless))  # ours always shows
