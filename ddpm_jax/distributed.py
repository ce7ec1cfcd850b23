"""Start `jax.distributed` when a run spans several processes (hosts).

On TPU pod slices JAX finds the coordinator itself: pass --multiprocess with no address.
On CPU or GPU clusters give the coordinator's host:port, the number of processes and
this process's id (flags or $DDPM_COORDINATOR, $DDPM_NUM_PROCESSES, $DDPM_PROCESS_ID).
Must run before anything touches a JAX device.
"""

import os
import socket
import time

import jax

from ddpm_jax.errors import UserError


def settings_from_env(coordinator_address=None, num_processes=None, process_id=None):
    """Flags win over $DDPM_COORDINATOR / $DDPM_NUM_PROCESSES / $DDPM_PROCESS_ID."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("DDPM_COORDINATOR")
    if num_processes is None and "DDPM_NUM_PROCESSES" in env:
        num_processes = int(env["DDPM_NUM_PROCESSES"])
    if process_id is None and "DDPM_PROCESS_ID" in env:
        process_id = int(env["DDPM_PROCESS_ID"])
    return coordinator_address, num_processes, process_id


def check_settings(coordinator_address, num_processes, process_id):
    """Raise ValueError naming the setting that cannot work."""
    if num_processes is None or num_processes < 1:
        raise UserError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise UserError(
            f"process_id must be in [0, num_processes={num_processes}), got {process_id}"
        )
    host, _, port = (coordinator_address or "").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator_address must be host:port, got {coordinator_address!r}")


def initialize(
    coordinator_address=None, num_processes=None, process_id=None, tpu_pod=False, timeout_s=120
):
    """Join the run's processes; a no-op for a single process. Returns the process count."""
    coordinator_address, num_processes, process_id = settings_from_env(
        coordinator_address, num_processes, process_id
    )
    if tpu_pod and coordinator_address is None:
        jax.distributed.initialize()  # TPU pods: everything from the environment
        return jax.process_count()
    if coordinator_address is None and num_processes in (None, 1):
        return 1
    check_settings(coordinator_address, num_processes, process_id)
    if process_id != 0:  # the runtime aborts without naming the setting: check first
        wait_for_coordinator(coordinator_address, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless elsewhere
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
    )
    return jax.process_count()


def wait_for_coordinator(address, timeout_s):
    """Block until host:port accepts connections; RuntimeError after timeout_s seconds."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot reach the coordinator at {address} within {timeout_s} s ({e}); "
                    f"check --coordinator_address and that process 0 is running"
                ) from e
            time.sleep(0.2)


def define_flags():
    """The absl flags every entry point shares for multi-process runs."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
    flags.DEFINE_bool("tpu_pod", False, "Initialise jax.distributed from the TPU pod environment.")


def initialize_from_flags():
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.tpu_pod)
