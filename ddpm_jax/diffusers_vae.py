"""diffusers' AutoencoderKL (the Stable Diffusion VAE layout) as autoencoder.Autoencoder.

A folder with `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`), or a
pipeline whose `vae/` holds them, loads with its `scaling_factor`:

    config, params, scale = diffusers_vae.load("/path/to/sd-vae-ft-mse")

Tensors map as the U-Net's do (diffusers_unet.py) under `encoder.` / `decoder.`, plus
`quant_conv` and `post_quant_conv`; any other block type or option is refused by name.
"""

from pathlib import Path

from ddpm_jax import autoencoder, diffusers_unet
from ddpm_jax.errors import UserError

DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
)  # fmt: skip
REQUIRED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None,
                use_quant_conv=True, use_post_quant_conv=True)  # fmt: skip


def _refuse(setting, value):
    raise UserError(
        f"AutoencoderKL config: {setting}={value!r} is not supported here (only "
        "DownEncoderBlock2D/UpDecoderBlock2D autoencoders with both 1x1 quant convs load)"
    )


def autoencoder_config(config: dict, **model) -> tuple[autoencoder.AutoencoderConfig, float]:
    """(AutoencoderConfig, scaling_factor) of an AutoencoderKL config.json's dict."""
    unknown = sorted(k for k in config if k not in DEFAULTS and not k.startswith("_"))
    if unknown:
        _refuse(unknown[0], config[unknown[0]])
    c = DEFAULTS | config
    for key, value in REQUIRED.items():
        if c[key] != value:
            _refuse(key, c[key])
    widths = tuple(c["block_out_channels"])
    blocks = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
    for key, block in blocks.items():
        if len(c[key]) != len(widths) or any(name != block for name in c[key]):
            _refuse(key, tuple(c[key]))
    if c["in_channels"] != c["out_channels"] or any(w % widths[0] for w in widths):
        _refuse("in_channels/out_channels/block_out_channels", (c["in_channels"], widths))
    try:
        cfg = autoencoder.AutoencoderConfig(
            ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=c["layers_per_block"], z_channels=c["latent_channels"],
            out_ch=c["out_channels"], norm_groups=c["norm_num_groups"],
            mid_attention=bool(c["mid_block_add_attention"]), **model,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(f"AutoencoderKL config: {e}") from None
    return cfg, float(c["scaling_factor"])


def diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
    """('encoder', 'down_0', 'block_0', 'conv1', 'kernel') ->
    'encoder.down_blocks.0.resnets.0.conv1.weight'; quant convs keep their names."""
    if path[0] in ("encoder", "decoder"):
        return f"{path[0]}.{diffusers_unet.diffusers_name(path[1:], num_levels)}"
    return diffusers_unet.diffusers_name(path, num_levels)


def describe(folder, **model) -> tuple[Path, autoencoder.AutoencoderConfig, float]:
    """(the folder holding the weights, AutoencoderConfig, scaling_factor) of an
    AutoencoderKL folder, of a pipeline folder's vae/ or of a Hub id; no weights are read."""
    from ddpm_jax import diffusers_pipeline

    folder = Path(diffusers_pipeline.resolve(folder))
    folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: not a diffusers AutoencoderKL folder")
    config = diffusers_pipeline.read_json(folder / "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{folder} holds a {config['_class_name']}, not an AutoencoderKL")
    return folder, *autoencoder_config(config, **model)


def load(folder, **model):
    """(AutoencoderConfig, parameters, scaling_factor) of an AutoencoderKL folder or of a
    pipeline folder's vae/; `model` sets dtype and precision."""
    import jax
    import jax.numpy as jnp

    folder, cfg, scale = describe(folder, **model)
    x = jnp.zeros((1, 2 * cfg.factor, 2 * cfg.factor, cfg.out_ch))
    expected = jax.eval_shape(autoencoder.Autoencoder(cfg).init, jax.random.key(0), x)["params"]
    state, where = diffusers_unet.read_weights(folder)
    levels = len(cfg.ch_mult)
    name_of = lambda path: diffusers_name(path, levels)  # noqa: E731
    return cfg, diffusers_unet.params_from_state_dict(state, expected, name_of, where), scale
