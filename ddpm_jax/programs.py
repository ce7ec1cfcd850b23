"""Jitted functions whose traced programs are kept beside JAX's compilation cache, so that a
relaunch neither traces nor lowers them again.

JAX's persistent cache (cli.use_compilation_cache) saves compiling, but its key is the
lowered program: every launch still traces the U-Net, its gradient and the optimizer in
Python first (seconds). `CachedJit(fn, name, static)` is `jax.jit(fn, **jit_kwargs)` that,
the first time it meets a signature (the arguments' tree, shapes, dtypes and shardings),
loads the program `jax.export` serialized on an earlier launch, or traces and serializes it
now. The file's name is a hash of everything the program depends on: `static` (the
settings fn closes over, e.g. the Setup), the signature, the devices, the versions of JAX,
jaxlib, Flax and Optax and the source of this package. A file that does not read falls
back to tracing, and is replaced.

Programs live in COMPILATION_CACHE/ddpm_jax_programs/ (local or gs://); with no
compilation cache, or with several processes, CachedJit traces as jax.jit does.
"""

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import os
import pickle
from pathlib import Path

import jax
import numpy as np
from absl import logging
from etils import epath
from jax import export

SUBDIR = "ddpm_jax_programs"
VERSIONED = ("jax", "jaxlib", "flax", "optax")


@functools.cache
def environment_hash() -> str:
    """The library versions and this package's source: a change to either is another program."""
    h = hashlib.sha256()
    for name in VERSIONED:
        h.update(f"{name}={importlib.metadata.version(name)};".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def fingerprint(value, h=None):
    """A sha256 of a value built of dataclasses, enums, containers, arrays and scalars (every
    element of an array counts, unlike its repr)."""
    h = hashlib.sha256() if h is None else h
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__qualname__.encode())
        for field in dataclasses.fields(value):
            h.update(field.name.encode())
            fingerprint(getattr(value, field.name), h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}(".encode())
        for item in value:
            fingerprint(item, h)
    elif isinstance(value, dict):
        h.update(f"dict{len(value)}(".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            fingerprint(value[key], h)
    elif isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    elif isinstance(value, (enum.Enum, str, int, float, bool, type(None), np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"fingerprint: cannot hash a {type(value).__name__}")
    return h


def trace_settings() -> tuple:
    """JAX's settings that change what a function traces to (matmul precision, x64, dtype
    promotion, ...): JAX's own trace context where it can be read, and the public flags."""
    try:
        from jax._src import config as jax_config

        context = jax_config.trace_context()
    except Exception:  # another JAX: the public flags below still count
        context = ()
    plain = (str, int, float, bool, type(None), enum.Enum, tuple)
    public = (jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64)
    return (*(repr(c) for c in context if isinstance(c, plain)), *map(repr, public))


def signature(args) -> tuple:
    """The tree of `args` and each leaf's shape, dtype and sharding (weakly typed or not)."""
    leaves, tree = jax.tree.flatten(args)
    avals = tuple(
        (tuple(x.shape), str(x.dtype), getattr(x, "weak_type", False), repr(_sharding(x)))
        for x in leaves
    )
    return str(tree), avals


def cache_dir():
    """COMPILATION_CACHE/ddpm_jax_programs, or None where programs are not kept."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or jax.process_count() > 1:
        return None
    return epath.Path(directory) / SUBDIR


class CachedJit:
    """jax.jit(fn, **jit_kwargs) whose programs are kept in cache_dir() (see the module).
    `static` is everything fn closes over (hashed with `fingerprint`); `name` names the
    files. The arguments may hold None (an absent leaf); donation is as jit_kwargs say."""

    def __init__(self, fn, name: str, static, **jit_kwargs):
        self.fn, self.name, self.jit_kwargs = fn, name, jit_kwargs
        self.jitted = jax.jit(fn, **jit_kwargs)
        self.static_hash = fingerprint(static).hexdigest()
        self.compiled = {}

    def __call__(self, *args):
        if cache_dir() is None:
            return self.jitted(*args)
        compiled, out_tree = self.warm(*args)
        leaves = jax.tree.leaves(args)
        # An uncommitted array (e.g. a fresh PRNG key) goes where the program wants it.
        places = compiled.input_shardings[0]
        leaves = [
            x if _sharding(x) == s else jax.device_put(x, s)
            for x, s in zip(leaves, places, strict=True)
        ]
        return jax.tree.unflatten(out_tree, compiled(*leaves))

    def warm(self, *args):
        """(compiled flat program, its output tree) for arguments like `args` (arrays or
        jax.ShapeDtypeStructs with shardings): loaded or traced, then compiled, once; None
        where programs are not kept."""
        directory = cache_dir()
        if directory is None:  # nothing kept: jax.jit compiles at the first call
            return None
        sig = signature(args)
        if sig not in self.compiled:
            self.compiled[sig] = self._load_or_export(directory, args, sig)
        return self.compiled[sig]

    def _cache_size(self) -> int:
        """The programs compiled so far (as jax.jit's own _cache_size)."""
        return len(self.compiled) + self.jitted._cache_size()

    def _key(self, sig) -> str:
        h = hashlib.sha256(f"{self.name}|{self.static_hash}|{environment_hash()}".encode())
        devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
        h.update(repr((sig, devices, sorted(self.jit_kwargs), trace_settings())).encode())
        return h.hexdigest()[:32]

    def _load_or_export(self, directory, args, sig):
        path = directory / f"{self.name}-{self._key(sig)}.bin"
        leaves, in_tree = jax.tree.flatten(args)
        loaded = _read(path)
        if loaded is None:
            exported, out_tree = self._export(leaves, in_tree)
            _write(path, exported, out_tree)
        else:
            exported, out_tree = loaded
        kwargs = dict(donate_argnums=self._flat_donated(args))
        if "out_shardings" in self.jit_kwargs:  # placed as jax.jit(fn) would place them
            out = jax.tree.unflatten(out_tree, [0] * out_tree.num_leaves)
            kwargs["out_shardings"] = tuple(_per_leaf(self.jit_kwargs["out_shardings"], out))
        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(x)) for x in leaves]
        compiled = jax.jit(exported.call, **kwargs).lower(*abstract).compile()
        return compiled, out_tree

    def _export(self, leaves, in_tree):
        out_tree = []

        def flat(*flat_args):
            out = self.fn(*jax.tree.unflatten(in_tree, flat_args))
            if "out_shardings" in self.jit_kwargs:  # a prefix of out: the leaves' shardings
                out = _constrain(out, self.jit_kwargs["out_shardings"])
            out_tree.append(jax.tree.structure(out))
            return tuple(jax.tree.leaves(out))

        in_shardings = self.jit_kwargs.get("in_shardings")
        args = jax.tree.unflatten(in_tree, [0] * in_tree.num_leaves)
        per_leaf = None if in_shardings is None else tuple(_per_leaf(in_shardings, args))
        jitted = jax.jit(flat, in_shardings=per_leaf)
        exported = export.export(jitted)(*leaves)
        return exported, out_tree[0]

    def _flat_donated(self, args):
        donated = self.jit_kwargs.get("donate_argnums", ())
        donated = (donated,) if isinstance(donated, int) else tuple(donated)
        counts = [len(jax.tree.leaves(a)) for a in args]
        flags = [i in donated for i, n in enumerate(counts) for _ in range(n)]
        return tuple(i for i, d in enumerate(flags) if d)


def _sharding(x):
    """Where x is placed, or None where it may go anywhere (uncommitted, NumPy)."""
    return getattr(x, "sharding", None) if getattr(x, "committed", True) else None


def _is_sharding(x):
    return isinstance(x, jax.sharding.Sharding)


def _constrain(out, shardings):
    """Each leaf of out constrained to its sharding in the prefix tree `shardings`."""
    constrain = jax.lax.with_sharding_constraint
    return jax.tree.map(
        lambda s, o: jax.tree.map(lambda x: constrain(x, s), o), shardings, out,
        is_leaf=_is_sharding,
    )  # fmt: skip


def _per_leaf(prefix, args):
    """A sharding per leaf of args, from shardings given as a prefix tree of args."""
    repeated = jax.tree.map(
        lambda s, a: [s] * len(jax.tree.leaves(a)), prefix, args, is_leaf=_is_sharding
    )
    return jax.tree.leaves(repeated, is_leaf=_is_sharding)


def _read(path):
    """(exported, out_tree) from `path`, or None where it is missing or does not read."""
    try:
        if not path.exists():
            return None
        blob, out_tree = pickle.loads(path.read_bytes())
        return export.deserialize(bytearray(blob)), out_tree
    except Exception as e:  # a partial write, another version: trace again
        logging.warning("traced again: the program in %s does not read (%s)", path, e)
        return None


def _write(path, exported, out_tree):
    """Write where a reader sees the whole file or none (a temporary name, then renamed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(pickle.dumps((exported.serialize(), out_tree)))
        tmp.replace(path)  # (over a damaged one)
    except Exception as e:  # the run goes on; the next launch traces again
        logging.warning("could not keep the program in %s: %s", path, e)
