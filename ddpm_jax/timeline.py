"""Marks on a launch's timeline, for bench/launch_bench.py: where $DDPM_TIMELINE names a
file, each mark(name) appends one line `name unix_time` to it; otherwise mark does nothing.

The entry points mark when their imports are done, the setup is built, the parameters or
state are restored and the first step (or reverse step) has run; the bench subtracts the
time it started the process."""

import os
import time


def mark(name: str, *wait) -> None:
    """Append `name time.time()` to $DDPM_TIMELINE, if it is set, once the arrays in `wait`
    are computed (waited for only then: unmarked runs dispatch as before)."""
    path = os.environ.get("DDPM_TIMELINE")
    if path:
        for array in wait:
            array.block_until_ready()
        with open(path, "a") as f:
            f.write(f"{name} {time.time():.6f}\n")
