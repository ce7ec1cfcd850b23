"""What a checkpoint records, and the checks of a step read back: its settings (those that
shape the parameters and their meaning), a fingerprint of every array, finiteness, and a
record of the right shape for its step. checkpointing.py writes and reads through these."""

import json

import jax
import jax.numpy as jnp

from ddpm_jax.errors import UserError

# The settings that shape the parameters, their meaning or the train state: all of
# config.model, and these.
SHAPING = dict(
    diffusion=("num_timesteps", "beta_schedule", "beta_start", "beta_end", "mean_type", "var_type"),
    data=("image_size", "num_channels"),
    training=("timestep_sampler",),
    autoencoder=("latent_size", "latent_channels"),
    loss=("disc_layers", "disc_ch"),  # (whether there is a discriminator: its state's shape)
)


class Damaged(Exception):
    """A step that cannot be used: its arrays do not match their fingerprint or are not
    finite, its record is not one, or it holds another step than its name says."""


class NonFinite(UserError):
    """A train state with NaN or ±inf values: never saved, never read as good."""


def settings(config):
    """{"model.ch": 128, "diffusion.num_timesteps": 1000, ...}: the SHAPING settings of
    config as JSON values."""
    names = {"model": sorted(config.model), **SHAPING}
    groups = {g: config.get(g) or {} for g in names}  # (a first stage has no diffusion)
    flat = {f"{g}.{n}": groups[g].get(n) for g, group in names.items() for n in group}
    return json.loads(json.dumps(flat))  # tuples -> lists, as they are read back


def differences(recorded, config):
    """The settings in which config differs from a record, as readable lines."""
    current, lines = settings(config), []
    for name, value in recorded.items():
        if name not in current and value is None:  # absent then, and not recorded now
            continue
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
    """[Σ w, Σ i·w] mod 2^32 over the uint32 words w_i of one array, and its number of
    non-finite values: one small program per shape and dtype (a train state has few), not
    one large program over every leaf."""
    w = _words(x)
    i = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
    bad = jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    return jnp.stack(
        [jnp.sum(w, dtype=jnp.uint32), jnp.sum(i * w, dtype=jnp.uint32), jnp.uint32(bad)]
    )


def summarize(tree):
    """(fingerprint, non-finite): {leaf path: [Σ w, Σ i·w] mod 2^32 over the leaf's uint32
    words w_i} (a changed bit changes the first sum, two swapped words the second) and the
    paths of the leaves holding NaN or ±inf. Computed where the arrays are, fetched in one
    transfer."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    sums = jax.device_get([_sums(x).addressable_data(0) for x in leaves])
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p in paths]
    prints = {name: [int(a), int(b)] for name, (a, b, _) in zip(names, sums, strict=True)}
    return prints, [name for name, s in zip(names, sums, strict=True) if s[2]]


def fingerprint(tree):
    """The fingerprint of summarize(tree)."""
    return summarize(tree)[0]


def listed(names):
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def verify(tree, record):
    """Raise Damaged naming the arrays of tree that do not match the record's fingerprint
    (record None: not checked) or that are not finite."""
    prints, nonfinite = summarize(tree)
    bad = [k for k, v in prints.items() if record is not None and record["fingerprint"].get(k) != v]
    if bad:
        raise Damaged(f"arrays differ from their fingerprint: {listed(bad)}")
    if nonfinite:
        raise Damaged(f"arrays hold NaN or inf: {listed(nonfinite)}")


def read_record(directory):
    """The record of a step directory, or None for a step written without one; Damaged if
    it is not a record of that step."""
    if not (directory / "record").exists():
        return None
    try:
        record = json.loads((directory / "record" / "metadata").read_text())
    except ValueError as e:
        raise Damaged(f"its record is not JSON ({e})") from None
    if not _is_record(record):
        raise Damaged("its record is not a checkpoint record (step, settings, fingerprint)")
    if record["step"] != int(directory.name):
        raise Damaged(f"it holds step {record['step']}, not {directory.name}")
    return record


def _is_record(record):
    """Whether a JSON value has the shape save() writes."""
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return False
    fields = record.get("settings"), record.get("fingerprint")
    if not all(isinstance(f, dict) for f in fields):
        return False
    return all(isinstance(v, list) and len(v) == 2 for v in record["fingerprint"].values())


def check_settings(record, config, directory):
    lines = differences(record["settings"], config)
    if lines:
        raise UserError(
            f"checkpoint {directory} was written with other settings: {'; '.join(lines)}. Use "
            f"the config the run was trained with (whole in {directory}/record/metadata), or "
            "a fresh --workdir"
        )
