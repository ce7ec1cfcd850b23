"""Checkpoints: records, fingerprints, the fallback past damaged steps, settings that
disagree, the rotation, and the workdir lock (tiny config, CPU)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import mnist_data_dir

from ddpm_jax import (
    checkpointing,
    config_lib,
    records,
    sharding,
    training,
    workdir,
)
from ddpm_jax.errors import UserError, file_system_error

ROOT = Path(__file__).resolve().parents[1]


def tiny_config():
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    return config


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """An initial train state of the tiny config."""
    return training.Trainer(tiny_config(), tmp_path_factory.mktemp("init")).init()


def write(path, state, steps, config=None):
    """Checkpoints of `state` at each step, its parameters shifted by the step."""
    manager = checkpointing.make_manager(path, keep=10)
    for step in steps:
        shifted = jax.tree.map(lambda a, s=step: a + s, state.params)
        checkpointing.save(
            manager,
            state.replace(step=jnp.int32(step), params=shifted, ema_params=shifted),
            config or tiny_config(),
        )
        manager.wait_until_finished()
    manager.close()


def step_of(params, state):
    """Which step's shifted parameters `params` are."""
    shift = np.asarray(params["conv_in"]["bias"]) - np.asarray(state.params["conv_in"]["bias"])
    return round(float(shift[0]))


def test_replicated_arrays_are_written_whole_by_one_replica(tmp_path):
    """Saving traces no program: the first replica writes each array whole (orbax's
    replica-parallel default first slices every array once per replica, on the devices)."""
    mesh = sharding.make_mesh()
    assert mesh.size == 4
    tree = {"a": jnp.arange(36.0).reshape(12, 3), "b": jnp.arange(20, dtype=jnp.int32)}
    # shapes no other test saves, divisible by 4 (that orbax would slice them for 4 replicas)
    tree = jax.device_put(tree, sharding.replicated(mesh))
    traced = []
    listen = lambda event, secs, **_: traced.append(event) if "trace" in event else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        manager = checkpointing.make_manager(tmp_path, async_save=False)
        args = dict(default=ocp.args.PyTreeSave(tree), record=ocp.args.JsonSave({}))
        manager.save(1, args=ocp.args.Composite(**args))
        manager.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert traced == []
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "checkpoints" / "1" / "default")
    jax.tree.map(np.testing.assert_array_equal, restored, tree)


def test_record_holds_the_settings_and_restore_verifies(tmp_path, fresh):
    write(tmp_path, fresh, [3])
    record = json.loads((tmp_path / "checkpoints" / "3" / "record" / "metadata").read_text())
    assert record["step"] == 3 and record["settings"]["diffusion.num_timesteps"] == 20
    assert record["settings"]["model.ch_mult"] == [1, 2] and record["config"]["seed"] == 0
    assert len(record["fingerprint"]) == len(jax.tree.leaves(checkpointing.as_dict(fresh)))
    params, step = checkpointing.restore_params(tmp_path, tiny_config())
    assert step == 3 and step_of(params, fresh) == 3


@pytest.mark.parametrize(
    "change, listed",
    [
        (lambda c: c.model.update(ch=64), "model.ch=32 (this config: 64)"),
        (lambda c: c.diffusion.update(num_timesteps=30), "diffusion.num_timesteps=20"),
        (lambda c: c.data.update(image_size=16), "data.image_size=8 (this config: 16)"),
        (
            lambda c: c.training.update(timestep_sampler="importance"),
            "training.timestep_sampler='uniform' (this config: 'importance')",
        ),
        (
            lambda c: c.diffusion.update(var_type="learned_range", loss_type="hybrid"),
            "diffusion.var_type='fixedlarge' (this config: 'learned_range')",
        ),
    ],
)
def test_other_settings_fail_at_once_listing_them(tmp_path, two_steps, change, listed):
    copy(two_steps, tmp_path)
    config = tiny_config()
    change(config)
    for call in (
        lambda: checkpointing.restore_params(tmp_path, config),
        lambda: training.Trainer(config, tmp_path).restore_or_init(),
    ):
        with pytest.raises(UserError, match="was written with other settings") as e:
            call()
        assert listed in str(e.value) and "a fresh --workdir" in str(e.value)
    assert checkpointing.steps(tmp_path) == [4, 2]  # nothing moved or deleted


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, fresh):
    """A workdir with checkpoints of steps 2 and 4, written once; tests damage copies."""
    path = tmp_path_factory.mktemp("two_steps")
    write(path, fresh, [2, 4])
    return path


def copy(workdir, to):
    shutil.copytree(workdir, to, dirs_exist_ok=True)
    return to


def largest_array_file(step_dir):
    return max((step_dir / "default").rglob("d/*"), key=lambda p: p.stat().st_size)


def flip_a_bit(step_dir):
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def rewrite_record(step_dir, change):
    path = step_dir / "record" / "metadata"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def copy_of_step_2(step_dir):
    """The directory of step 4 replaced by a copy of step 2 (a step misnamed by hand)."""
    shutil.rmtree(step_dir)
    shutil.copytree(step_dir.parent / "2", step_dir)


DAMAGE = {
    "truncated array file": lambda d: os.truncate(
        largest_array_file(d), largest_array_file(d).stat().st_size // 2
    ),
    "missing array file": lambda d: largest_array_file(d).unlink(),
    "missing _METADATA": lambda d: (d / "default" / "_METADATA").unlink(),
    "missing manifest.ocdbt": lambda d: (d / "default" / "manifest.ocdbt").unlink(),
    "missing record": lambda d: (d / "record" / "metadata").unlink(),
    "bit flip": flip_a_bit,
    "empty step dir": lambda d: shutil.rmtree(d) or d.mkdir(),
    "empty record": lambda d: (d / "record" / "metadata").write_text(""),
    "zeroed record": lambda d: (d / "record" / "metadata").write_bytes(bytes(64)),
    "record a list": lambda d: rewrite_record(d, lambda r: []),
    "record settings a string": lambda d: rewrite_record(d, lambda r: dict(r, settings="x")),
    "record without a fingerprint": lambda d: rewrite_record(d, lambda r: dict(r, fingerprint=1)),
    "a copy of step 2 named 4": copy_of_step_2,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_step_is_skipped_named_and_moved_aside(tmp_path, fresh, two_steps, kind, caplog):
    copy(two_steps, tmp_path)
    DAMAGE[kind](tmp_path / "checkpoints" / "4")
    caplog.set_level(logging.WARNING)
    state = training.Trainer(tiny_config(), tmp_path).restore_or_init()  # resuming
    assert int(state.step) == 2 and step_of(state.params, fresh) == 2
    damaged = str(tmp_path / "checkpoints" / "4")
    warnings = [r.getMessage() for r in caplog.records if damaged + " is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "using step 2 instead" in warnings[0]
    assert "damaged_checkpoints" in warnings[0] and "not deleted" in warnings[0]
    assert checkpointing.steps(tmp_path) == [2]
    assert (tmp_path / "damaged_checkpoints" / "4").is_dir()  # kept, out of the way


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing _METADATA", "Damaged: no array metadata"),
        ("record a list", "Damaged: its record is not a checkpoint record"),
        ("zeroed record", "Damaged: its record is not JSON"),
        ("a copy of step 2 named 4", "Damaged: it holds step 2, not 4"),
    ],
)
def test_sampling_falls_back_and_moves_nothing(tmp_path, fresh, two_steps, caplog, kind, reason):
    copy(two_steps, tmp_path)
    DAMAGE[kind](tmp_path / "checkpoints" / "4")
    caplog.set_level(logging.WARNING)
    params, step = checkpointing.restore_params(tmp_path, tiny_config())
    assert step == 2 and step_of(params, fresh) == 2
    assert f"checkpoints/4 is damaged ({reason}" in caplog.text
    assert "left where it is" in caplog.text
    assert "_CHECKPOINT_METADATA" not in caplog.text  # orbax's notice, which says nothing
    assert checkpointing.steps(tmp_path) == [4, 2]  # reading moves nothing


def save_unchecked(path, state, config):
    """A step saved as save() did before it checked finiteness (its record and fingerprint
    made of what it holds, NaN included)."""
    tree = checkpointing.as_dict(state)
    record = dict(
        step=int(state.step),
        settings=records.settings(config),
        config={},
        fingerprint=records.fingerprint(tree),
    )
    manager = checkpointing.make_manager(path, keep=10, async_save=False)
    default = ocp.args.PyTreeSave(tree)
    manager.save(
        int(state.step), args=ocp.args.Composite(default=default, record=ocp.args.JsonSave(record))
    )
    manager.close()


def test_non_finite_states_are_never_saved_nor_read_as_good(tmp_path, fresh, two_steps, caplog):
    """save() refuses a state with NaN or inf and writes nothing; a step saved with a NaN
    EMA before that check (by earlier code) is damage: sampling skips it, resuming moves it
    aside, and both use step 2."""
    copy(two_steps, tmp_path)
    nan_ema = jax.tree.map(lambda a: a * jnp.nan, fresh.ema_params)
    bad = fresh.replace(step=jnp.int32(6), ema_params=nan_ema)
    manager = checkpointing.make_manager(tmp_path, keep=1)
    with pytest.raises(checkpointing.NonFinite, match=r"^the train state of step 6 holds NaN"):
        checkpointing.save(manager, bad, tiny_config())
    manager.close()
    assert checkpointing.steps(tmp_path) == [4, 2]  # nothing written, nothing rotated away
    save_unchecked(tmp_path, bad, tiny_config())
    caplog.set_level(logging.WARNING)
    params, step = checkpointing.restore_params(tmp_path, tiny_config())
    assert (
        step == 4
        and "checkpoints/6 is damaged (Damaged: arrays hold NaN or inf: ema_params/" in caplog.text
    )
    state = training.Trainer(tiny_config(), tmp_path).restore_or_init()
    assert int(state.step) == 4 and (tmp_path / "damaged_checkpoints" / "6").is_dir()


def test_every_step_damaged_is_an_error_that_keeps_them(tmp_path, two_steps):
    copy(two_steps, tmp_path)
    for step in (2, 4):
        (tmp_path / "checkpoints" / str(step) / "default" / "_METADATA").unlink()
    with pytest.raises(UserError, match="^no checkpoint can be read: .*checkpoints/4 .*/2 "):
        training.Trainer(tiny_config(), tmp_path).restore_or_init()
    assert checkpointing.steps(tmp_path) == [4, 2]


def test_only_committed_step_directories_are_steps(tmp_path, fresh):
    write(tmp_path, fresh, [2])
    shutil.copytree(
        tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"
    )
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1733").mkdir()
    assert checkpointing.steps(tmp_path) == [2]
    assert checkpointing.restore_params(tmp_path, tiny_config())[1] == 2


def test_rotation_keeps_at_least_one(tmp_path):
    with pytest.raises(UserError, match="keep must be >= 1"):
        checkpointing.make_manager(tmp_path, keep=0)


def test_file_system_errors_are_one_line():
    full = OSError(28, "No space left on device", "/w/checkpoints/4")
    assert file_system_error(full) == "No space left on device: /w/checkpoints/4"
    tensorstore = ValueError("OUT_OF_RANGE: Error writing \"/w/x\": too large [os_error_code='27']")
    assert file_system_error(tensorstore).startswith('OUT_OF_RANGE: Error writing "/w/x"')
    assert file_system_error(ValueError("a bug")) is None


# ---- The workdir lock ---------------------------------------------------------------------


def test_a_held_lock_stops_a_second_run_naming_the_holder(tmp_path):
    with workdir.Lock(tmp_path):
        with pytest.raises(UserError, match=f"is being trained by pid {os.getpid()} on host"):
            workdir.Lock(tmp_path).acquire()
    assert not (tmp_path / "train.lock").exists()  # released


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    holder = dict(host=workdir.Lock(tmp_path).holder["host"], pid=int(dead.stdout), since=0)
    (tmp_path / "train.lock").write_text(json.dumps(holder))  # a killed run of this host
    with workdir.Lock(tmp_path) as lock:
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    (tmp_path / "train.lock").write_text(json.dumps(dict(holder, host="elsewhere")))
    old = time.time() - workdir.STALE_S - 1  # another host's, silent for too long
    os.utime(tmp_path / "train.lock", (old, old))
    with workdir.Lock(tmp_path):
        pass
    (tmp_path / "train.lock").write_text(json.dumps(dict(holder, host="elsewhere")))
    with pytest.raises(UserError, match="on host elsewhere"):  # another host's, alive
        lock.acquire()


def test_a_suspended_run_of_this_host_keeps_its_lock(tmp_path, monkeypatch):
    """A live process of this host keeps its lock however long its heartbeat is silent
    (Ctrl-Z stops the heartbeat too); the second run is told how to resume it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = dict(host=workdir.Lock(tmp_path).holder["host"], pid=sleeper.pid, since=0)
        (tmp_path / "train.lock").write_text(json.dumps(holder))
        old = time.time() - workdir.STALE_S - 1
        os.utime(tmp_path / "train.lock", (old, old))  # silent for longer than STALE_S
        with pytest.raises(UserError, match=f"pid {sleeper.pid} on host .* a live process"):
            workdir.Lock(tmp_path).acquire()
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    with workdir.Lock(tmp_path):  # gone: taken over at once
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()


def test_a_run_whose_lock_was_taken_over_stops_and_leaves_it(tmp_path):
    lock = workdir.Lock(tmp_path).acquire()
    lock.check()  # ours
    other = dict(host="elsewhere", pid=4242, since=1.0)
    (tmp_path / "train.lock").write_text(json.dumps(other))  # another host took it over
    with pytest.raises(UserError, match="taken over by pid 4242 on host elsewhere"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / "train.lock").read_text()) == other  # left to its holder


def test_restore_params_needs_the_config(two_steps):
    with pytest.raises(UserError, match=r"needs the config the run was trained with.*got None"):
        checkpointing.restore_params(two_steps, None)


def test_restore_converted_refuses_what_is_not_converted_parameters(tmp_path, two_steps, fresh):
    with pytest.raises(UserError, match="is a training workdir: pass it as --workdir"):
        checkpointing.restore_converted(two_steps)
    with pytest.raises(UserError, match="no converted parameters at .* python -m ddpm_jax.convert"):
        checkpointing.restore_converted(tmp_path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "params", fresh.params)
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), fresh.params)
    restored = checkpointing.restore_converted(tmp_path / "params", expected)
    jax.tree.map(np.testing.assert_array_equal, restored, fresh.params)
    expected["conv_in"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 1, 64), jnp.float32)
    with pytest.raises(UserError, match="the converted parameters .* hold another network"):
        checkpointing.restore_converted(tmp_path / "params", expected)
