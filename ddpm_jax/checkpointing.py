"""Orbax checkpoints of the TrainState in `workdir/checkpoints/<step>`, and the one policy
by which training, sampling and evaluation read them.

A step directory holds the state (`default/`, written asynchronously) and its record
(`record/metadata`, JSON): the settings that shape the parameters and their meaning
(`settings`), the whole config, and a fingerprint of every array computed when saved.
Orbax commits a step by renaming its temporary directory to the bare step number, so only
such names are steps.

Reading takes the newest step that restores and whose arrays match their fingerprint. A
damaged step (a missing or truncated file, a flipped bit, an empty directory) is named in a
warning and skipped, never deleted; training, which will write that step again, first moves
it to `workdir/damaged_checkpoints/`. A record whose settings differ from the config is an
error at once that lists them. The rotation (the last `keep`, plus every multiple of
`keep_period`) is the only thing that deletes a checkpoint, and it keeps at least one.
Arrays are placed directly with the shardings asked for, so a checkpoint written by any
number of devices or processes restores on any other.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import UserError

# The settings that shape the parameters, their meaning or the train state: all of
# config.model, and these.
SHAPING = dict(
    diffusion=("num_timesteps", "beta_schedule", "beta_start", "beta_end", "mean_type", "var_type"),
    data=("image_size", "num_channels"),
    training=("timestep_sampler",),
)


class Damaged(Exception):
    """A step whose arrays do not match their fingerprint."""


# Reading a damaged step raises many kinds of error (orbax even raises a bare Exception);
# these are never damage but a programming error.
BUGS = (TypeError, AttributeError, NameError, AssertionError, ImportError)


def checkpoint_dir(workdir):
    return fs.as_path(workdir) / "checkpoints"


def steps(workdir):
    """The committed steps in workdir, newest first. Locally orbax commits a step by
    renaming its temporary directory, in a bucket by writing commit_success.txt into it."""
    path = checkpoint_dir(workdir)
    names = [p.name for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    steps = [int(n) for n in names if n.isdigit()]
    if not fs.is_local(path):
        steps = [s for s in steps if (path / str(s) / "commit_success.txt").exists()]
    return sorted(steps, reverse=True)


def make_manager(workdir, keep=3, keep_period=None, async_save=True):
    if keep < 1:  # orbax would delete every checkpoint
        raise UserError(f"keep must be >= 1 (the rotation keeps at least one), got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    handlers = dict(
        default=ocp.PyTreeCheckpointHandler(type_handler_registry=array_handlers()),
        record=ocp.JsonCheckpointHandler(),
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def array_handlers(replica_parallel=False):
    """Orbax's array handlers, with each replicated array written whole by its first replica
    (unless `replica_parallel`, orbax's default, kept to compare). Replica-parallel writes
    split every array into one slice per replica first: a device program per array and
    replica, in the save's blocking part. On 8 simulated CPU devices
    (bench/checkpoint_bench.py --cpu_devices 8) a save of the CIFAR10 state blocked
    training 2.2-2.4 s that way, 0.95 s this way (15.5 s against 7.7 s for the first
    save, which compiles what it runs)."""
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)
    numpy, scalar = ocp.type_handlers.NumpyHandler(), ocp.type_handlers.ScalarHandler()
    return ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays), (np.ndarray, numpy), (np.number, scalar), (int, scalar)
    )


def as_dict(state):
    """TrainState -> plain dict (what is written), so checkpoints do not depend on the class;
    the importance sampler's loss history only where there is one."""
    tree = dict(
        step=state.step,
        params=state.params,
        ema_params=state.ema_params,
        opt_state=state.opt_state,
        rng=state.rng,
    )
    if state.history is not None:
        tree["history"] = dict(losses=state.history.losses, counts=state.history.counts)
    return tree


# ---- What a checkpoint records ------------------------------------------------------------


def settings(config):
    """{"model.ch": 128, "diffusion.num_timesteps": 1000, ...}: the SHAPING settings of
    config as JSON values."""
    names = {"model": sorted(config.model), **SHAPING}
    flat = {f"{g}.{n}": config[g].get(n) for g, group in names.items() for n in group}
    return json.loads(json.dumps(flat))  # tuples -> lists, as they are read back


def differences(recorded, config):
    """The settings in which config differs from a record, as readable lines."""
    current, lines = settings(config), []
    for name, value in recorded.items():
        if name not in current:
            lines.append(f"{name}={value!r} (not a setting of this config)")
        elif current[name] != value:
            lines.append(f"{name}={value!r} (this config: {current[name]!r})")
    return lines


def _words(x):
    """The bits of x as uint32 words (from 1-, 2-, 4- or 8-byte elements)."""
    x = jnp.ravel(x)
    if x.dtype.itemsize >= 4:
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    uint = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


@jax.jit
def _sums(x):
    """[Σ w, Σ i·w] mod 2^32 over the uint32 words w_i of one array: one small program per
    shape and dtype (a train state has few), not one large program over every leaf."""
    w = _words(x)
    i = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(i * w, dtype=jnp.uint32)])


def fingerprint(tree):
    """{leaf path: [Σ w, Σ i·w] mod 2^32 over the leaf's uint32 words w_i}: a changed bit
    changes the first sum, two swapped words the second. Computed where the arrays are,
    fetched in one transfer."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    sums = jax.device_get([_sums(x).addressable_data(0) for x in leaves])
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): [int(a), int(b)]
        for p, (a, b) in zip(paths, sums, strict=True)
    }


def verify(tree, record):
    """Raise Damaged naming the arrays of tree that do not match the record's fingerprint."""
    expected = record["fingerprint"]
    bad = [k for k, v in fingerprint(tree).items() if expected.get(k) != v]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise Damaged(f"arrays differ from their fingerprint: {', '.join(bad[:3])}{more}")


def save(manager, state, config, force=False):
    """Start saving `state` at its step (asynchronously) with its record; returns whether a
    save started."""
    tree, step = as_dict(state), int(state.step)
    record = dict(
        step=step,
        settings=settings(config),
        config=json.loads(config.to_json_best_effort()),
        fingerprint=fingerprint(tree),
    )
    args = ocp.args.Composite(default=ocp.args.PyTreeSave(tree), record=ocp.args.JsonSave(record))
    return manager.save(step, args=args, force=force)


# ---- Reading: the newest good step ---------------------------------------------------------


def read_record(directory):
    """The record of a step directory, or None for a step written without one."""
    if not (directory / "record").exists():
        return None
    return json.loads((directory / "record" / "metadata").read_text())


def check_settings(record, config, directory):
    lines = differences(record["settings"], config)
    if lines:
        raise UserError(
            f"checkpoint {directory} was written with other settings: {'; '.join(lines)}. Use "
            f"the config the run was trained with (whole in {directory}/record/metadata), or "
            "a fresh --workdir"
        )


def _read_step(directory, config, read):
    """read(directory / "default"), checked against the step's record."""
    record = read_record(directory)
    if record is not None:
        check_settings(record, config, directory)
    tree = read(directory / "default")
    if record is None:
        logging.warning("%s has no record: its settings and arrays are not checked", directory)
    else:
        verify(tree, record)
    return tree


def _reason(error):
    """The first line of the error at the root of the chain (orbax wraps TensorStore's)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _move_aside(directory):
    """Move a damaged step directory to workdir/damaged_checkpoints/ (never delete it)."""
    target = directory.parent.parent / "damaged_checkpoints" / directory.name
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        target = target.with_name(f"{directory.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    fs.move(directory, target)
    return target


def _report_damaged(damaged, step, quarantine):
    for directory, reason in damaged:
        where = "left where it is"
        if quarantine and jax.process_index() == 0:
            where = f"moved to {_move_aside(directory)}"
        logging.warning(
            "checkpoint %s is damaged (%s); using step %d instead. It is %s, not deleted",
            directory,
            reason,
            step,
            where,
        )


def _newest_good(workdir, config, read, quarantine=False, only=None):
    """(tree, step) of the newest step that reads and verifies, or (None, None) if workdir
    has no step. Damaged steps are reported (and with `quarantine` moved aside)."""
    candidates = steps(workdir)
    if only is not None:
        if only not in candidates:
            raise UserError(f"no checkpoint of step {only} in {checkpoint_dir(workdir)}")
        candidates = [only]
    damaged = []
    for step in candidates:
        directory = checkpoint_dir(workdir) / str(step)
        try:
            tree = _read_step(directory, config, read)
        except (UserError, *BUGS):
            raise
        except Exception as e:  # any other failure to read or verify a step is damage
            damaged.append((directory, _reason(e)))
            continue
        _report_damaged(damaged, step, quarantine)
        return tree, step
    if damaged:
        listed = "; ".join(f"{d} ({reason})" for d, reason in damaged)
        raise UserError(
            f"no checkpoint can be read: {listed}. They are left where they are; move them "
            "elsewhere to start afresh, or use another --workdir"
        )
    return None, None


def _check_shapes(stored, target, directory):
    """UserError unless the stored arrays (orbax metadata) have target's shapes."""
    wanted = jax.tree_util.tree_flatten_with_path(target)[0]
    shapes = [tuple(m.shape) for m in jax.tree.leaves(stored)]
    differ = [
        f"{jax.tree_util.keystr(path, simple=True, separator='/')}: {shape} stored, "
        f"{tuple(want.shape)} here"
        for (path, want), shape in zip(wanted, shapes, strict=False)
        if shape != tuple(want.shape)
    ]
    if differ or len(shapes) != len(wanted):
        example = differ[0] if differ else f"{len(shapes)} arrays stored, {len(wanted)} here"
        raise UserError(
            f"checkpoint {directory.parent} holds another network than this config builds "
            f"({example}); use the config the run was trained with, or a fresh --workdir"
        )


def _stored_tree(checkpointer, directory):
    """The metadata tree of the arrays saved in directory (shapes, dtypes)."""
    metadata = checkpointer.metadata(directory).item_metadata
    if metadata is None:
        raise Damaged(f"no array metadata in {directory}")
    return metadata.tree


def _restore(directory, target):
    """Orbax's StandardRestore of directory into target, after checking the shapes."""
    with ocp.StandardCheckpointer() as checkpointer:
        _check_shapes(_stored_tree(checkpointer, directory), target, directory)
        return checkpointer.restore(directory, target)


def restore(workdir, abstract_state, config, quarantine=False):
    """(state, step) of the newest good checkpoint, laid out like `abstract_state`
    (ShapeDtypeStructs with shardings), or (None, None) when there is none. With
    `quarantine` (training) damaged newer steps are moved aside."""
    target = as_dict(abstract_state)

    def read(directory):
        tree = _restore(directory, target)
        # Orbax returns optax's named tuples as plain tuples: put the leaves back in the
        # target's structure (same order, as both flatten alike).
        return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(tree))

    tree, step = _newest_good(workdir, config, read, quarantine)
    if tree is None:
        return None, None
    if "history" in tree:
        tree["history"] = abstract_state.history.replace(**tree["history"])
    return abstract_state.replace(**tree), step


def with_shardings(abstract, shardings):
    """Attach shardings to a tree of ShapeDtypeStructs (the target of a restore)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _read_params(directory, key, sharding):
    """Only the arrays under `key` of a saved state, placed with `sharding`."""
    with ocp.StandardCheckpointer() as checkpointer:
        tree = _stored_tree(checkpointer, directory)
    target = {
        key: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree[key]
        )
    }
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=args)


def restore_params(workdir, config, ema=True, step=None, sharding=None):
    """(params, step): the (EMA) parameters of the newest good checkpoint in `workdir` (or of
    `step`), placed with `sharding` (default: the first local device). Nothing else is read.
    Raises UserError if the checkpoint's settings differ from `config`."""
    key = "ema_params" if ema else "params"
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    read = lambda directory: _read_params(directory, key, sharding)  # noqa: E731
    tree, found = _newest_good(workdir, config, read, only=step)
    if tree is None:
        raise UserError(
            f"no checkpoint in {checkpoint_dir(workdir)}; train first, or pass the right --workdir"
        )
    return tree[key], found


def restore_converted(directory):
    """Parameters saved by `python -m ddpm_jax.convert` (a plain orbax pytree)."""
    directory = fs.as_path(directory)
    if not directory.is_dir():
        raise UserError(f"no converted parameters at {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory)
