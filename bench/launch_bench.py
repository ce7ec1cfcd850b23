"""Seconds from launching an entry point to its first step, cold and warm, with a breakdown.

    python bench/launch_bench.py          # train.py --config tiny, sample.py --config mnist
    python bench/launch_bench.py --repo /path/to/another/checkout   # the same, another version

For each entry point, two launches on a fresh workdir and a fresh compilation cache, and
that --repeats times (the medians are reported: this machine is shared and noisy):
- train: `train.py --config tiny` to step 3 (cold), then the same command to step 6 (warm:
  it resumes from step 3 as a relaunch after preemption does);
- sample: `sample.py --config mnist` on a checkpoint of freshly initialised parameters
  (written first, not timed), twice; each is stopped once the second segment of the
  chain has run.
The processes write marks ($DDPM_TIMELINE, ddpm_jax/timeline.py) and the bench reports each
mark's seconds since it started the process: imports done, setup built, parameters or
state restored, and the first training step done or the first reverse step running (the
end of the first segment of the chain, less all but one of its steps at the rate of the
second segment: the devices run a segment as one program). Needs
MNIST prepared ($TFDS_DATA_DIR).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_CHECKPOINT = """
import sys
from ddpm_jax import checkpointing, config_lib, training
config = config_lib.load_config(sys.argv[1])
trainer = training.Trainer(config, sys.argv[2])
manager = checkpointing.make_manager(trainer.workdir)
checkpointing.save(manager, trainer.init(), config, force=True)
manager.wait_until_finished()
"""


def launch(args, cmd, timeline, stop_at=None):
    """{mark: s since the launch} of one process; killed at the first mark whose name
    starts with `stop_at`, if given."""
    env = dict(os.environ, DDPM_TIMELINE=str(timeline))
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=args.repo, env=env, stderr=subprocess.PIPE, text=True)
    while stop_at and proc.poll() is None and not _reached(timeline, start, stop_at):
        time.sleep(0.05)
    if stop_at and proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    marks = _marks(timeline, start)
    if not stop_at and proc.returncode != 0 or stop_at and not _reached(timeline, start, stop_at):
        raise RuntimeError(f"{cmd[1]} exited {proc.returncode}: {err[-3000:]}")
    if not stop_at:
        marks["exit"] = time.time() - start
    timeline.unlink()
    return marks


def _marks(timeline, start):
    if not timeline.exists():
        return {}
    rows = [line.split() for line in timeline.read_text().splitlines()]
    return {name: float(t) - start for name, t in rows if name}


def _reached(timeline, start, prefix):
    return any(name.startswith(prefix) for name in _marks(timeline, start))


def first_reverse_step(marks):
    """When the first reverse step was done: the end of the first segment of the chain, less
    all but one of its steps at the rate of the second segment."""
    (first,) = [n for n in marks if n.startswith("segment1_done_")]
    steps = int(re.search(r"_(\d+)_steps", first).group(1))
    second = first.replace("segment1", "segment2")
    per_step = (marks[second] - marks[first]) / steps
    marks = dict(marks, first_reverse_step=marks[first] - (steps - 1) * per_step)
    return {k: v for k, v in marks.items() if not k.startswith("segment")}


def train_launches(args, tmp):
    workdir, cache = tmp / "train", tmp / "cache"
    cmd = [sys.executable, "train.py", "--config", "tiny", "--workdir", str(workdir)]
    cmd += [f"--compilation_cache={cache}", *args.train_overrides]
    runs = [
        launch(args, [*cmd, f"--config.training.num_steps={steps}"], tmp / "timeline")
        for steps in (3, 6)
    ]  # (less the marks of the sample grid at step 6)
    return [{k: v for k, v in marks.items() if not k.startswith("segment")} for marks in runs]


def sample_launches(args, tmp):
    workdir, cache = tmp / "sample", tmp / "cache"
    code = [sys.executable, "-c", MAKE_CHECKPOINT, "mnist", str(workdir)]
    subprocess.run(code, cwd=args.repo, check=True, capture_output=True)
    cmd = [sys.executable, "sample.py", "--config", "mnist", "--workdir", str(workdir)]
    cmd += [f"--compilation_cache={cache}", "--num_samples=16", f"--out={tmp / 'samples'}"]
    stop = "segment2_done_"  # the segment's length follows in the mark's name
    return [first_reverse_step(launch(args, cmd, tmp / "timeline", stop)) for _ in range(2)]


def report(name, repeats):
    """Each mark's median over the repeats (and its range), cold and warm."""
    print(f"{name}: seconds since launch, median of {len(repeats)} (min-max)")
    keys = list(dict.fromkeys(k for runs in repeats for marks in runs for k in marks))
    print(f"  {'mark':<20} {'cold':>18} {'warm':>18}")
    for key in keys:
        cells = []
        for i in range(2):
            values = [runs[i][key] for runs in repeats if key in runs[i]]
            cell = f"{statistics.median(values):6.2f} ({min(values):.1f}-{max(values):.1f})"
            cells.append(f"{cell:>18}" if values else f"{'-':>18}")
        print(f"  {key:<20} {' '.join(cells)}")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose entry points run")
    parser.add_argument("--only", choices=("train", "sample"), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm, each time")
    parser.add_argument("--train_overrides", nargs="*", default=[])
    args = parser.parse_args()
    kinds = {"train": ("train.py --config tiny", train_launches)}
    kinds["sample"] = ("sample.py --config mnist", sample_launches)
    for kind, (name, launches) in kinds.items():
        if args.only in (None, kind):
            repeats = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    repeats.append(launches(args, Path(tmp)))
            report(name, repeats)


if __name__ == "__main__":
    main()
