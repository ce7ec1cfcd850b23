"""How long a checkpoint save holds training up, for a config's whole train state.

    python bench/checkpoint_bench.py                          # CIFAR10 state, every device
    python bench/checkpoint_bench.py --cpu_devices 8          # 8 simulated CPU devices
    python bench/checkpoint_bench.py --cpu_devices 8 --replica_parallel   # orbax's default

Saves the replicated train state (parameters, EMA parameters, Adam moments) --saves times
through checkpointing.save, as train.py does, into a temporary directory. Reports per
save the seconds `save` blocks (the fingerprint, then orbax's copy off the devices; the
writing goes on in the background) and the seconds until the save is committed. The
first save also compiles what it needs. --replica_parallel measures orbax's own default
instead, where each replica writes a slice of every array.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_jax import checkpointing, config_lib, sharding, train_state  # noqa: E402


def timed_saves(config, state, saves):
    """[(blocking s, until committed s)] for `saves` saves at successive steps."""
    times = []
    with tempfile.TemporaryDirectory() as directory:
        manager = checkpointing.make_manager(directory, keep=2)
        for _ in range(saves):
            state = state.replace(step=state.step + 1)
            start = time.perf_counter()
            checkpointing.save(manager, state, config, force=True)
            blocked = time.perf_counter() - start
            manager.wait_until_finished()
            times.append((blocked, time.perf_counter() - start))
        manager.close()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cifar", help="a config's name or path")
    parser.add_argument("--cpu_devices", type=int, default=None, help="simulate N CPU devices")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--replica_parallel", action="store_true", help="orbax's default")
    args = parser.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.replica_parallel:
        handlers = checkpointing.array_handlers
        checkpointing.array_handlers = lambda: handlers(replica_parallel=True)
    config = config_lib.load_config(args.config)
    setup = config_lib.build(config)
    tx = train_state.make_optimizer(setup.training)
    state = train_state.jit_init_state(setup, tx, sharding.make_mesh())()
    values = sum(x.size for x in jax.tree.leaves(state))
    writes = "replica-parallel" if args.replica_parallel else "one replica"
    print(f"{args.config}: {values / 1e6:.1f}M values on {jax.device_count()} devices, {writes}")
    for i, (blocked, committed) in enumerate(timed_saves(config, state, args.saves)):
        print(f"save {i + 1}: blocks {blocked:.2f} s, committed after {committed:.2f} s")


if __name__ == "__main__":
    main()
