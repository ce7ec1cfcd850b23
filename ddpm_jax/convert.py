"""Load the authors' released TensorFlow checkpoints into this package's UNet parameters.

The authors' variables live under a scope (default 'model/') and are named after the
network's structure, e.g. 'model/down_0/block_0/conv1/W' or 'model/mid/attn_1/q/b';
GroupNorm variables are 'gamma'/'beta'. The EMA copy of each variable carries the suffix
'/ExponentialMovingAverage'; Adam's slots ('/Adam', '/Adam_1') are ignored.

    python -m ddpm_jax.convert --checkpoint diffusion_cifar10_model/model.ckpt-790000 \\
        --config configs/cifar.py --out /tmp/cifar10_params

writes the EMA parameters as an orbax checkpoint that `sample.py --params` reads; --out may
be a local directory or a bucket (gs://BUCKET/...).
"""

import numpy as np
from flax import traverse_util

from ddpm_jax import fs
from ddpm_jax.errors import UserError

EMA_SUFFIX = "/ExponentialMovingAverage"
_SLOT_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1")


def tf_variable_name(path):
    """('down_0', 'block_0', 'norm1', 'scale') -> 'down_0/block_0/norm1/gamma'."""
    *scopes, leaf = path
    if scopes[-1].startswith("norm"):
        renamed = {"scale": "gamma", "bias": "beta"}[leaf]
    else:
        renamed = {"kernel": "W", "bias": "b"}[leaf]
    return "/".join([*scopes, renamed])


def _model_variables(names, prefix, ema):
    """{name without prefix and EMA suffix: full name} for the model's own variables."""
    out = {}
    for name in names:
        if not name.startswith(prefix) or name.endswith(_SLOT_SUFFIXES):
            continue
        if name.endswith(EMA_SUFFIX) == ema:
            out[name[len(prefix) :].removesuffix(EMA_SUFFIX)] = name
    return out


def params_from_tf_variables(shapes, get_tensor, expected, prefix="model/", ema=True):
    """Build a Flax param tree from TF variables, checking every name and shape.

    shapes: {tf name: shape}; get_tensor(name) -> array; expected: the Flax param tree
    (arrays or ShapeDtypeStructs) of the matching UNet. Raises ValueError listing every
    missing, unexpected and misshaped variable.
    """
    flat = traverse_util.flatten_dict(expected)
    available = _model_variables(shapes, prefix, ema)
    wanted = {tf_variable_name(path): path for path in flat}
    missing = sorted(set(wanted) - set(available))
    unexpected = sorted(set(available) - set(wanted))
    misshaped = [
        f"{available[n]}: checkpoint {tuple(shapes[available[n]])} != model {flat[p].shape}"
        for n, p in sorted(wanted.items())
        if n in available and tuple(shapes[available[n]]) != tuple(flat[p].shape)
    ]
    if missing or unexpected or misshaped:
        kind = "EMA" if ema else "raw (non-EMA)"
        raise ValueError(
            f"checkpoint does not match the model config ({kind} variables under {prefix!r}):\n"
            + "".join(f"  missing: {prefix}{n}\n" for n in missing)
            + "".join(f"  unexpected: {available[n]}\n" for n in unexpected)
            + "".join(f"  wrong shape: {m}\n" for m in misshaped)
        )
    params = {p: np.asarray(get_tensor(available[n]), np.float32) for n, p in wanted.items()}
    return traverse_util.unflatten_dict(params)


def load_tf_checkpoint(path, expected, prefix="model/", ema=True):
    """Read an authors' TF checkpoint (path prefix, e.g. '.../model.ckpt-790000')."""
    import tensorflow as tf  # imported here: only conversion needs TensorFlow

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(f"cannot read a TensorFlow checkpoint at {path!r}: {e}") from e
    shapes = reader.get_variable_to_shape_map()
    return params_from_tf_variables(shapes, reader.get_tensor, expected, prefix, ema)


def expected_params(setup):
    """Parameter shapes of the U-Net of a typed setup (config_lib.build); nothing is
    computed."""
    import jax
    import jax.numpy as jnp

    x, t = jnp.zeros((1, *setup.image_shape)), jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(setup.model.init, jax.random.key(0), x, t)["params"]


def main(argv=None):
    import argparse

    import orbax.checkpoint as ocp

    from ddpm_jax import config_lib

    parser = argparse.ArgumentParser(
        description="Convert an authors' TF checkpoint to Flax params."
    )
    parser.add_argument("--checkpoint", required=True, help="TF checkpoint prefix (model.ckpt-N)")
    parser.add_argument("--config", required=True, help="config file of the matching model")
    parser.add_argument(
        "--out", required=True, help="new directory (local or gs://) for the orbax checkpoint"
    )
    parser.add_argument("--raw", action="store_true", help="take raw weights, not their EMA")
    parser.add_argument("--prefix", default="model/", help="variable scope of the model")
    args = parser.parse_args(argv)
    out = fs.as_path(args.out)
    if out.exists():
        parser.error(f"--out {out} already exists; choose a new directory")
    config = config_lib.load_config(args.config)
    expected = expected_params(config_lib.build(config))
    params = load_tf_checkpoint(args.checkpoint, expected, args.prefix, not args.raw)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out, params)
    count = sum(a.size for a in traverse_util.flatten_dict(params).values())
    print(f"wrote {count:,} parameters to {out}")


if __name__ == "__main__":
    main()
