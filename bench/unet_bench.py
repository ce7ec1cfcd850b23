"""U-Net throughput on this machine, as fractions of a plain 3x3 convolution's speed.

    python bench/unet_bench.py                     # the paper's CIFAR10 network
    python bench/unet_bench.py --dtype bfloat16 --fwd_batch 16 --repeats 3
    python bench/unet_bench.py --train_batch 128 --fwd_batch 256 [--dtype bfloat16]  # a GPU

Measures, in one run: the machine's 3x3 conv GFLOP/s (128 ch, 32x32, batch 32, the best
of measurements taken between the model's, as the machine is shared); the forward pass
at --fwd_batch, whole and as lax.map over chunks of --chunk; the train step at
--train_batch, train_state's own (what train.py runs: L_simple, gradient clipping, Adam,
the EMA update, the state donated) on the CIFAR10 config. FLOPs are counted from the
architecture (convs, dense layers, attention matmuls: 12.44 GFLOP per 32x32 image
forward, 3x that for a train step). Reports images/s, compile time, XLA's temporary
buffer size, and achieved / conv-peak GFLOP/s; for the train step also its compile time
from JAX's persistent cache (a fresh one in a temporary directory), what a relaunch
pays. --precision is config.model.precision ("default": TF32 on GPUs, "highest": true float32).
"""

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_jax import cli, config_lib, sharding, train_state, unet  # noqa: E402


def timed(fn, *args, repeats):
    """Compile fn, run it once to warm up, then return (compile s, best run s, compiled)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return compile_s, best, compiled


def layer_resolution(path, image_size, num_levels):
    """Spatial size at which the layer with this parameter path runs (1 for dense on temb)."""
    top = path[0]
    if top == "temb" or path[-2] == "temb_proj":
        return 1
    if top == "mid":
        return image_size >> (num_levels - 1)
    res = image_size >> int(top.split("_")[1]) if top[:3] in ("dow", "up_") else image_size
    return res // 2 if "downsample" in path else res * 2 if "upsample" in path else res


def forward_flops(params, image_size):
    """2·MACs of every conv and dense layer at its resolution, plus attention's two matmuls."""
    num_levels, total = sum(k.startswith("down_") for k in params), 0
    for path, kernel in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel":
            res = layer_resolution(path, image_size, num_levels)
            total += 2 * math.prod(kernel.shape) * res * res
            if path[-2] == "q":  # softmax(q kᵀ) v: two (HW x HW x C) matmuls
                total += 2 * 2 * (res * res) ** 2 * kernel.shape[0]
    return total


def temp_bytes(compiled):
    mem = compiled.memory_analysis()
    return getattr(mem, "temp_size_in_bytes", float("nan"))


def conv_peak(repeats, dtype):
    """GFLOP/s of one 3x3, 128->128 channel conv on a 32x32 batch of 32 (the network's bulk)."""
    x = jnp.ones((32, 32, 32, 128), dtype)
    w = jnp.ones((3, 3, 128, 128), dtype) * 0.01
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    _, seconds, _ = timed(conv, x, w, repeats=repeats)
    return 2 * 9 * 128 * 128 * 32 * 32 * 32 / seconds / 1e9


def train_step(args):
    """(jitted step, its arguments): train_state's own train step (L_simple, gradient clipping,
    Adam with warmup, the EMA update; the state donated) for the CIFAR10 config at
    --train_batch on one device."""
    config = config_lib.load_config("cifar")
    config.training.batch_size = args.train_batch
    config.model.dtype, config.model.precision = args.dtype, args.precision
    setup = config_lib.build(config)
    tx, mesh = train_state.make_optimizer(setup.training), sharding.make_mesh(jax.devices()[:1])
    init = train_state.jit_init_state(setup, tx, mesh)
    step = train_state.jit_train_step(setup, tx, mesh, jax.eval_shape(init))
    x0 = jax.random.uniform(jax.random.key(3), (args.train_batch, 32, 32, 3), minval=-1)
    return step, (init(), sharding.global_batch(np.asarray(x0), mesh))


def timed_steps(step, state, batch, repeats):
    """Compile the train step, then (compile s, best step s, compiled): each step takes the
    state the previous one returned, as in training (its input buffers are donated)."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state = jax.block_until_ready(compiled(state, batch))[0]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state, batch))[0]
        best = min(best, time.perf_counter() - start)
    return compile_s, best, compiled


def cached_step_compile_s(step, state, batch):
    """Seconds to compile the train step again once the in-memory caches are cleared: with
    the persistent cache on, a relaunch's cost (tracing and lowering included)."""
    jax.clear_caches()
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


def report(name, batch, flops, compile_s, seconds, compiled, peak):
    gflops = flops / seconds / 1e9
    print(
        f"{name:16s} batch {batch:3d}: {batch / seconds:6.2f} images/s, "
        f"compile {compile_s:5.1f} s, "
        f"XLA temp {temp_bytes(compiled) / 2**20:7.1f} MiB, {gflops:6.1f} GFLOP/s "
        f"= {gflops / peak():.2f} of conv peak"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fwd_batch", type=int, default=64)
    parser.add_argument("--train_batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8, help="0: no chunked forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=sorted(unet.DTYPES))
    parser.add_argument("--precision", default="default", choices=sorted(unet.PRECISIONS))
    args = parser.parse_args()
    cli.use_compilation_cache(tempfile.mkdtemp(prefix="unet_bench_cache_"))

    config = unet.UNetConfig(dtype=args.dtype, precision=args.precision)
    model = unet.UNet(config)
    x = jax.random.uniform(jax.random.key(0), (args.fwd_batch, 32, 32, 3), minval=-1, maxval=1)
    t = jnp.arange(args.fwd_batch, dtype=jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x[:1], t[:1])["params"]
    print(f"devices: {jax.devices()}, dtype {args.dtype}, precision {args.precision}")
    peaks = [conv_peak(args.repeats, unet.DTYPES[args.dtype])]
    peak = lambda: max(peaks)
    flops = forward_flops(params, 32)
    print(f"model: {flops / 1e9:.2f} GFLOP per image forward")

    fwd = lambda params, x, t: model.apply({"params": params}, x, t)
    chunked = lambda params, x, t: unet.apply_in_chunks(
        lambda x, t: model.apply({"params": params}, x, t), args.chunk, x, t
    )
    results = {}
    forwards = (("forward", fwd), (f"forward/{args.chunk}", chunked))
    for name, fn in forwards[: 2 if args.chunk else 1]:
        results[name] = timed(fn, params, x, t, repeats=args.repeats)
        peaks.append(conv_peak(args.repeats, unet.DTYPES[args.dtype]))

    step, (state, batch) = train_step(args)
    results["train"] = timed_steps(step, state, batch, args.repeats)
    cached = cached_step_compile_s(step, state, batch)
    peaks.append(conv_peak(args.repeats, unet.DTYPES[args.dtype]))
    print(f"conv peak (3x3, 128 ch, 32x32, batch 32), measured {len(peaks)} times between the")
    print(f"  others; the best is used: {', '.join(f'{p:.1f}' for p in peaks)} GFLOP/s")
    for name, result in results.items():
        batch = args.train_batch if name == "train" else args.fwd_batch
        report(name, batch, batch * flops * (3 if name == "train" else 1), *result, peak)
    print(f"train step compile: {results['train'][0]:.1f} s cold, {cached:.1f} s from the cache")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {rss_gib:.2f} GiB")


if __name__ == "__main__":
    main()
