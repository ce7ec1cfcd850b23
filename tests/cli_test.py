"""The entry points' shared behaviour: which log records are kept, and one-line errors."""

import logging
import subprocess
import sys
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


def test_a_typo_in_an_override_is_one_line_naming_the_closest_key(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny"]
    cmd += ["--workdir", str(tmp_path / "w"), "--config.training.batchsize=64"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --config.training.batchsize: the config has no setting 'training.batchsize'; "
        "did you mean config.training.batch_size or config.sampling.batch_size?"
    ]
    assert not (tmp_path / "w").exists()


def test_help_exits_0_names_the_command_and_lists_verbosity():
    """--help is no failure; it lists --verbosity, and an installed command's usage says
    ddpm-sample, not python sample.py."""
    code = "import sys; sys.argv[0] = 'ddpm-sample'; from ddpm_jax import sample; sample.run()"
    for cmd, name in (
        ([sys.executable, str(ROOT / "sample.py")], "python sample.py --config mnist"),
        ([sys.executable, "-c", code], "ddpm-sample --config mnist"),
    ):
        result = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert name in result.stdout and "--verbosity" in result.stdout
    assert "python sample.py" not in result.stdout
