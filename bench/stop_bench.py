"""How long a stop signal takes to become a committed checkpoint, on this machine.

    python bench/stop_bench.py --config mnist --load 2 --repeats 3
    python bench/stop_bench.py --repo /path/to/another/checkout ...   # the same, another version

Starts `train.py` (of --repo, default this checkout) on a fresh workdir, waits until its
first log line of a step, then `--delay` seconds more, sends SIGTERM and reports, per run:
the seconds from the signal to the commit of the checkpoint it saves (the step directory's
ctime, set when orbax renames it into place), to the process's exit, and the steps between
the last step logged before the signal and the step saved. `--load N` keeps N busy
processes running beside it (the machine is loaded, as a shared or preempted one is).
Needs the config's data prepared ($TFDS_DATA_DIR for MNIST).
"""

import argparse
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def burn():
    while True:
        pass


def run_once(args, workdir):
    """(signal -> commit s, signal -> exit s, saved step - last logged step)."""
    cmd = [sys.executable, str(Path(args.repo) / "train.py"), "--config", args.config]
    cmd += ["--workdir", str(workdir), "--config.training.sample_every=0"]
    cmd += ["--config.eval.every=0", *args.overrides]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=args.repo)
    logged = None
    for line in proc.stderr:
        match = re.search(r"step (\d+): loss", line)
        if match:
            logged = int(match.group(1))
            break
    if logged is None:
        raise RuntimeError(f"train.py ended before its first log line (exit {proc.wait()})")
    time.sleep(args.delay)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    code = proc.wait()
    exited = time.time()
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    committed = os.stat(workdir / "checkpoints" / str(saved)).st_ctime
    if code != 0:
        raise RuntimeError(f"train.py exited {code}: {rest[-2000:]}")
    return committed - sent, exited - sent, saved - logged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose train.py runs")
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--load", type=int, default=2, help="busy processes beside it")
    parser.add_argument("--delay", type=float, default=5.0, help="s after the first log line")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="--config.X=Y settings for train.py")
    args = parser.parse_args()
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    try:
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                commit_s, exit_s, steps = run_once(args, Path(tmp) / "workdir")
            print(
                f"run {i + 1}: signal -> checkpoint committed {commit_s:5.1f} s, -> exit "
                f"{exit_s:5.1f} s; saved {steps} steps after the last log line",
                flush=True,
            )
    finally:
        for b in burners:
            b.terminate()


if __name__ == "__main__":
    main()
