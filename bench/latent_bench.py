"""Latent against pixel diffusion at 256x256: the train step of celeba_hq_latent (LDM-4:
the frozen f = 4 first stage encodes the batch, the U-Net trains on 64x64x3 latents)
against celeba_hq's (the paper's pixel-space U-Net), in one run.

    python bench/latent_bench.py                       # a CPU: batch 1
    python bench/latent_bench.py --batch 16 --repeats 5  # a GPU

Each is train_state's own jitted step (what train.py runs; the state donated), its first
stage untrained (the cost does not depend on the weights). Reports images/s, XLA's FLOP
count of each compiled step (cost_analysis: the latent step's includes its encoder pass),
the ratios latent / pixel, and each as a fraction of this machine's 3x3 conv GFLOP/s.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet_bench import conv_peak  # noqa: E402

from ddpm_jax import (  # noqa: E402
    autoencoder_training,
    cli,
    config_lib,
    first_stage,
    sharding,
    train_state,
)


def step_of(name, args):
    """(jitted step, its arguments, parameter count) of a config at --batch on one device."""
    config = config_lib.load_config(name)
    config.training.batch_size = args.batch
    config.model.dtype = args.dtype
    ae = None
    if name == "celeba_hq_latent":
        ae_config = config_lib.load_config("celeba_hq_autoencoder")
        ae_config.model.dtype = args.dtype
        ae = autoencoder_training.model_config(ae_config)
    setup = config_lib.build(config, first_stage=None if ae is None else (ae, 0.0))
    tx, mesh = train_state.make_optimizer(setup.training), sharding.make_mesh(jax.devices()[:1])
    init = train_state.jit_init_state(setup, tx, mesh)
    step = train_state.jit_train_step(setup, tx, mesh, jax.eval_shape(init))
    x0 = np.random.default_rng(0).uniform(-1, 1, (args.batch, *setup.data_shape))
    frozen = ()
    if setup.latent is not None:
        model, x = first_stage.model(setup.latent), np.zeros((1, *setup.data_shape), np.float32)
        frozen = (jax.jit(model.init)(jax.random.key(1), x)["params"],)
    state = init()
    count = sum(p.size for p in jax.tree.leaves(state.params))
    return step, (state, sharding.global_batch(x0.astype(np.float32), mesh), *frozen), count


def measure(step, args_, repeats):
    """(compile s, best step s, XLA FLOPs): steps chained on the state they return."""
    start = time.perf_counter()
    compiled = step.lower(*args_).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    state, rest = args_[0], args_[1:]
    state = jax.block_until_ready(compiled(state, *rest))[0]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state, *rest))[0]
        best = min(best, time.perf_counter() - start)
    return compile_s, best, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    cli.use_compilation_cache(tempfile.mkdtemp(prefix="latent_bench_cache_"))
    dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
    peak = conv_peak(args.repeats, dtype)
    print(f"{jax.devices()[0].device_kind}: 3x3 conv peak {peak:.1f} GFLOP/s")
    results = {}
    for name in ("celeba_hq", "celeba_hq_latent"):
        step, step_args, count = step_of(name, args)
        compile_s, seconds, flops = measure(step, step_args, args.repeats)
        results[name] = (args.batch / seconds, flops)
        print(
            f"{name:17s} {count / 1e6:6.1f}M params, batch {args.batch}: "
            f"{args.batch / seconds:7.3f} images/s, {flops / args.batch / 1e9:8.1f} GFLOP per "
            f"image (XLA), {flops / seconds / 1e9 / peak:.2f} of conv peak, compile "
            f"{compile_s:.0f} s"
        )
    (pixel_rate, pixel_flops), (latent_rate, latent_flops) = results.values()
    print(
        f"latent / pixel: {latent_rate / pixel_rate:.2f}x the images/s, "
        f"{pixel_flops / latent_flops:.2f}x fewer FLOPs per step"
    )


if __name__ == "__main__":
    main()
