"""Orbax checkpoints of the TrainState in `workdir/checkpoints/<step>`.

Saves are asynchronous; the last `keep` checkpoints are kept, plus every multiple of
`keep_period`. Restoring places arrays directly with the shardings asked for, so a
checkpoint written by any number of devices or processes restores on any other.
"""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ddpm_jax.errors import UserError


def checkpoint_dir(workdir):
    return Path(workdir).resolve() / "checkpoints"


def make_manager(workdir, keep=3, keep_period=None, async_save=True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def as_dict(state):
    """TrainState -> plain dict (what is written), so checkpoints do not depend on the class."""
    return dict(
        step=state.step,
        params=state.params,
        ema_params=state.ema_params,
        opt_state=state.opt_state,
        rng=state.rng,
    )


def save(manager, state, force=False):
    """Start saving `state` at its step (asynchronously); returns whether a save started."""
    return manager.save(int(state.step), args=ocp.args.StandardSave(as_dict(state)), force=force)


def restore(manager, abstract_state, step=None):
    """The TrainState at `step` (default: latest) laid out like `abstract_state`
    (ShapeDtypeStructs with shardings), or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    target = as_dict(abstract_state)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    # Orbax returns optax's named tuples as plain tuples: put the leaves back in the target's
    # structure (same order, as both flatten tuples and named tuples alike).
    restored = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))
    return abstract_state.replace(**restored)


def with_shardings(abstract, shardings):
    """Attach shardings to a tree of ShapeDtypeStructs (the target of a restore)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def latest_step_dir(workdir, step=None):
    """The directory of the state saved at `step` (default: the latest) in `workdir`."""
    path = checkpoint_dir(workdir)
    steps = sorted(int(p.name) for p in path.glob("[0-9]*") if (p / "default").is_dir())
    if not steps:
        raise UserError(f"no checkpoint in {path}; train first, or pass the right --workdir")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint of step {step} in {path}; there are {steps}")
    return path / str(steps[-1] if step is None else step) / "default"


def restore_params(workdir, ema=True, step=None, sharding=None):
    """Only the (EMA) parameters of a checkpoint in `workdir` (default: the latest step),
    placed with `sharding` (default: the first local device). Nothing else is read."""
    directory = latest_step_dir(workdir, step)
    key = "ema_params" if ema else "params"
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(directory).item_metadata.tree
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
        return checkpointer.restore(directory, args=args)[key]


def restore_converted(directory):
    """Parameters saved by `python -m ddpm_jax.convert` (a plain orbax pytree)."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise UserError(f"no converted parameters at {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory)
