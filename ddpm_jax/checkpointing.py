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

import contextlib
import dataclasses
import json
import logging as std_logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import UserError
from ddpm_jax.records import (  # noqa: F401 (Damaged, NonFinite and the record: this API)
    Damaged,
    NonFinite,
    check_settings,
    fingerprint,
    listed,
    read_record,
    settings,
    summarize,
    verify,
)

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
    """A train state (a flax dataclass) -> plain dict (what is written), so checkpoints do
    not depend on the class; fields that are None (the importance sampler's loss history,
    a latent model's scale, a first stage's discriminator) are left out."""
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    tree = {k: v for k, v in tree.items() if v is not None}
    if "history" in tree:
        tree["history"] = dict(losses=state.history.losses, counts=state.history.counts)
    return tree


def save(manager, state, config, force=False):
    """Start saving `state` at its step (asynchronously) with its record; returns whether a
    save started."""
    tree, step = as_dict(state), int(state.step)
    prints, nonfinite = summarize(tree)
    if nonfinite:
        raise NonFinite(
            f"the train state of step {step} holds NaN or inf ({listed(nonfinite)}): it was "
            "not saved. Lower config.training.learning_rate or check the data."
        )
    record = dict(
        step=step,
        settings=settings(config),
        config=json.loads(config.to_json_best_effort()),
        fingerprint=prints,
    )
    if getattr(state, "latent_scale", None) is not None:  # what sample.py decodes with
        record["latent_scale"] = float(jax.device_get(state.latent_scale))
    args = ocp.args.Composite(default=ocp.args.PyTreeSave(tree), record=ocp.args.JsonSave(record))
    return manager.save(step, args=args, force=force)


# ---- Reading: the newest good step ---------------------------------------------------------


def _read_step(directory, config, read):
    """read(directory / "default"), checked against the step's record."""
    record = read_record(directory)
    if record is not None:
        check_settings(record, config, directory)
    tree = read(directory / "default")
    if record is None:
        logging.warning("%s has no record: its settings and fingerprint are not checked", directory)
    if "step" in tree and int(tree["step"]) != int(directory.name):
        raise Damaged(f"it holds step {int(tree['step'])}, not {directory.name}")
    verify(tree, record)
    return tree


def _reason(error):
    """The first line of the error at the root of the chain (orbax wraps TensorStore's),
    as far as the chain is shown (not past `raise ... from None`)."""
    shown = lambda e: e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # noqa: E731
    while shown(error) is not None:
        error = shown(error)
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


def _check_shapes(stored, target, what):
    """UserError unless the stored arrays (orbax metadata) have target's shapes; `what`
    names them ("checkpoint DIR")."""
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
            f"{what} hold another network than this config builds "
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
    with _quiet_item_metadata(), ocp.StandardCheckpointer() as checkpointer:
        what = f"the arrays of checkpoint {directory.parent}"
        _check_shapes(_stored_tree(checkpointer, directory), target, what)
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


class _NoMetadataWarning(std_logging.Filter):
    """Orbax's warning that an item has no _CHECKPOINT_METADATA of its own (the manager
    keeps it one level up, at the step): reading an item alone always says so."""

    def filter(self, record):
        return "_CHECKPOINT_METADATA" not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata():
    quiet, logger = _NoMetadataWarning(), std_logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _read_params(directory, key, sharding):
    """Only the arrays under `key` of a saved state, placed with `sharding`."""
    with _quiet_item_metadata(), ocp.StandardCheckpointer() as checkpointer:
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
    with _quiet_item_metadata(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=args)


def restore_params(workdir, config, ema=True, step=None, sharding=None):
    """(params, step): the (EMA) parameters of the newest good checkpoint in `workdir` (or of
    `step`), placed with `sharding` (default: the first local device). Nothing else is read.
    Raises UserError if the checkpoint's settings differ from `config`."""
    if not hasattr(config, "model"):
        raise UserError(
            "restore_params(workdir, config) needs the config the run was trained with, e.g. "
            f"config_lib.load_config('mnist'); got {config!r}"
        )
    key = "ema_params" if ema else "params"
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    read = lambda directory: _read_params(directory, key, sharding)  # noqa: E731
    tree, found = _newest_good(workdir, config, read, only=step)
    if tree is None:
        raise UserError(
            f"no checkpoint in {checkpoint_dir(workdir)}; train first, or pass the right --workdir"
        )
    return tree[key], found


def restore_converted(directory, expected=None):
    """Parameters saved by `python -m ddpm_jax.convert` (a plain orbax pytree), checked
    against the shapes of `expected` (e.g. convert.expected_params(setup)) when given."""
    directory = fs.as_path(directory)
    if (directory / "checkpoints").is_dir():
        raise UserError(f"{directory} is a training workdir: pass it as --workdir, not --params")
    if not (directory / "_METADATA").is_file():
        raise UserError(
            f"no converted parameters at {directory} (no orbax _METADATA there); write them "
            f"with python -m ddpm_jax.convert --checkpoint ... --config ... --out {directory}"
        )
    with ocp.StandardCheckpointer() as checkpointer:
        if expected is not None:
            stored = _stored_tree(checkpointer, directory)
            _check_shapes(stored, expected, f"the converted parameters {directory}")
        return checkpointer.restore(directory)
