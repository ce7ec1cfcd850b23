"""Write a trained model as a diffusers pipeline folder that DDPMPipeline loads as it is.

    python -m ddpm_jax.export --workdir /tmp/ddpm_mnist --out /tmp/mnist_diffusers

writes OUT/model_index.json, OUT/unet (UNet2DModel config.json and
diffusion_pytorch_model.safetensors) and OUT/scheduler (a DDPMScheduler config with the
schedule's β as trained_betas, the variance and the prediction type) from the EMA
parameters of the newest checkpoint (--raw: the raw ones; --step N: that step). The config
is the one the checkpoint was trained with (its record), unless --config gives it. Then,
with diffusers: `DDPMPipeline.from_pretrained(OUT)`. A network that UNet2DModel cannot
express (average-pool resampling, an x_{t-1}-predicting model) is refused by name.
"""

import argparse

import ml_collections

from ddpm_jax import checkpointing, config_lib, diffusers_pipeline, fs, records
from ddpm_jax.errors import UserError


def trained_config(workdir, step=None):
    """The config in the record of `step` (default: the newest) of a training workdir."""
    found = checkpointing.steps(workdir)
    if not found:
        raise UserError(f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}")
    step = found[0] if step is None else step
    record = records.read_record(checkpointing.checkpoint_dir(workdir) / str(step))
    if record is None or "config" not in record:
        raise UserError(f"step {step} of {workdir} has no record of its config: pass --config")
    return ml_collections.ConfigDict(record["config"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the training workdir")
    parser.add_argument("--out", required=True, help="a new folder (local or gs://)")
    parser.add_argument("--config", help="the run's config (default: its checkpoint's record)")
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the newest)")
    parser.add_argument("--raw", action="store_true", help="the raw weights, not their EMA")
    args = parser.parse_args(argv)
    try:
        if fs.as_path(args.out).exists():
            raise UserError(f"--out {args.out} already exists; choose a new folder")
        config = (
            config_lib.load_config(args.config)
            if args.config
            else trained_config(args.workdir, args.step)
        )
        params, step = checkpointing.restore_params(
            args.workdir, config, ema=not args.raw, step=args.step
        )
        out = diffusers_pipeline.write(args.out, config, params)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    kind = "raw" if args.raw else "EMA"
    print(f"wrote the {kind} weights of step {step} of {args.workdir} as a DDPMPipeline to {out}")


if __name__ == "__main__":
    main()
