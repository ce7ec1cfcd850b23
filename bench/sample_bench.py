"""Sampler overhead and compile cost, measured against the bare network in the same run.

    python bench/sample_bench.py                       # CIFAR10 network, batch 8, 50 steps
    python bench/sample_bench.py --config mnist --batch 64 --steps 100
    python bench/sample_bench.py --batch 256 --dtype bfloat16   # a GPU

Reports image-steps/s of the full `lax.scan` sampler over --steps steps against
--steps separate forward passes of the network (the loop's overhead; target < 5%),
the sampler's compile time and XLA temporary memory at T=10 and T=1000 (they should be
about equal: nothing is unrolled or stored per step), and the process's peak RSS.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet_bench import timed  # noqa: E402  (bench/ is on sys.path when run as a script)

from ddpm_jax import config_lib, reverse  # noqa: E402


def load(args):
    """The config, with --dtype / --precision applied."""
    config = config_lib.load_config(args.config)
    for name in ("dtype", "precision"):
        if getattr(args, name) is not None:
            config.model[name] = getattr(args, name)
    return config


def sampler(config, num_timesteps, batch):
    config.diffusion.num_timesteps = num_timesteps
    config.sampling.num_steps = 0  # the whole chain of T steps
    setup = config_lib.build(config)
    return lambda params, rng: reverse.sample(params, rng, setup=setup, num_samples=batch)


def compile_cost(config, params, num_timesteps, batch):
    fn = sampler(config, num_timesteps, batch)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, jax.random.PRNGKey(0)).compile()
    seconds = time.perf_counter() - start
    return seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cifar", help="a config's name or path")
    parser.add_argument("--dtype", default=None, help="config.model.dtype (default: the config's)")
    parser.add_argument("--precision", default=None, help="config.model.precision")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile_check", action=argparse.BooleanOptionalAction, default=True,
        help="also compile at T=10 and T=1000 (their cost and memory should be equal)",
    )  # fmt: skip
    args = parser.parse_args()
    config = load(args)
    model = config_lib.build(config).model
    size, ch = config.data.image_size, config.data.num_channels
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, ch))
    t = jnp.full((args.batch,), 500, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x[:1], t[:1])["params"]

    forward = lambda p, x, t: model.apply({"params": p}, x, t)
    one = timed(forward, params, x, t, repeats=args.repeats)[1]
    full = sampler(load(args), args.steps, args.batch)
    whole = timed(full, params, jax.random.PRNGKey(0), repeats=args.repeats)[1]
    print(f"network forward, batch {args.batch}: {one * 1e3:.1f} ms")
    rate = args.batch * args.steps / whole
    print(f"sampler, {args.steps} steps: {whole:.2f} s = {rate:.1f} image-steps/s")
    overhead = whole / (args.steps * one) - 1
    print(f"{args.steps} bare forwards: {args.steps * one:.2f} s; loop overhead {overhead:+.1%}")
    for T in (10, 1000) if args.compile_check else ():
        seconds, mib = compile_cost(load(args), params, T, args.batch)
        print(f"compile at T={T:4d}: {seconds:5.1f} s, XLA temp {mib:7.1f} MiB")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {rss_gib:.2f} GiB")


if __name__ == "__main__":
    main()
