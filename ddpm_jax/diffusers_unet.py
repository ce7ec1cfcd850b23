"""diffusers' UNet2DModel <-> this package's U-Net: configs, parameter names and layouts.

A UNet2DModel of DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D levels is the
paper's network with options (GroupNorm groups and ε, attention heads, scale-shift time
conditioning, the downsampling pad, the time embedding's order and frequencies), all in
`unet.UNetConfig`. Its tensors map one to one onto our parameters:

    time_embedding.linear_1          temb/dense0
    down_blocks.L.resnets.I          down_L/block_I   (time_emb_proj: temb_proj,
    down_blocks.L.attentions.I       down_L/attn_I     conv_shortcut: nin_shortcut)
    down_blocks.L.downsamplers.0     down_L/downsample
    mid_block.resnets.0 / .1         mid/block_1 / block_2
    mid_block.attentions.0           mid/attn_1        (group_norm: norm, to_q: q, to_k: k,
    up_blocks.(N-1-L).*              up_L/*             to_v: v, to_out.0: proj_out)
    conv_norm_out, class_embedding   norm_out, label_emb

with torch's layouts: a conv weight is (out, in, kh, kw), a linear one (out, in). A class
model's embedding here has one more row, "no label"; from diffusers it is zeros, and a
zero last row is not exported.
"""

import re

import numpy as np
from flax import traverse_util

from ddpm_jax import unet
from ddpm_jax.errors import UserError

# UNet2DModel's defaults for the keys a config.json may leave out (diffusers 0.42).
DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)  # fmt: skip
# Settings only these values of which have a form here.
REQUIRED = dict(
    center_input_sample=False, time_embedding_type="positional", mid_block_type="UNetMidBlock2D",
    mid_block_scale_factor=1, downsample_type="conv", upsample_type="conv",
    class_embed_type=None, add_attention=True,
)  # fmt: skip
_ACTIVATIONS = ("silu", "swish")
_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True, "UpBlock2D": False, "AttnUpBlock2D": True}


def _refuse(setting, value, allowed):
    raise UserError(
        f"UNet2DModel config: {setting}={value!r} is not supported here (supported: "
        f"{allowed}); only DownBlock2D/AttnDownBlock2D/UpBlock2D/AttnUpBlock2D U-Nets load"
    )


def unet_config(config: dict, **model) -> tuple[unet.UNetConfig, int]:
    """(UNetConfig, image size) of a UNet2DModel config.json's dict; `model` sets dtype and
    precision. Any option without a form here is a UserError naming it."""
    unknown = sorted(k for k in config if k not in DEFAULTS and not k.startswith("_"))
    if unknown:
        _refuse(unknown[0], config[unknown[0]], "the options of UNet2DModel")
    c = DEFAULTS | config
    _check_options(c)
    widths, size = tuple(c["block_out_channels"]), _image_size(c["sample_size"])
    attn = _attention_levels(c["down_block_types"], c["up_block_types"], len(widths))
    mid_groups = c["attn_norm_num_groups"]
    if mid_groups is None:
        mid_groups = 0 if c["resnet_time_scale_shift"] == "default" else -1
    try:
        return unet.UNetConfig(
            ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=c["layers_per_block"],
            attn_resolutions=tuple(size // 2**i for i in attn), dropout=float(c["dropout"]),
            resamp_with_conv=True, out_ch=c["out_channels"],
            num_classes=c["num_class_embeds"] or 0, norm_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]), attn_head_dim=c["attention_head_dim"] or 0,
            scale_shift=c["resnet_time_scale_shift"] == "scale_shift",
            downsample_pad=("same", "symmetric")[c["downsample_padding"]],
            time_flip=bool(c["flip_sin_to_cos"]), time_shift=float(c["freq_shift"]),
            mid_attn_groups=mid_groups, **model,
        ), size  # fmt: skip
    except ValueError as e:
        raise UserError(f"UNet2DModel config: {e}") from None


def _check_options(c):
    """Every setting of `c` (defaults filled in) has a form here."""
    for key, value in REQUIRED.items():
        if c[key] != value:
            _refuse(key, c[key], repr(value))
    if c["act_fn"] not in _ACTIVATIONS:
        _refuse("act_fn", c["act_fn"], _ACTIVATIONS)
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        _refuse("resnet_time_scale_shift", c["resnet_time_scale_shift"], "default, scale_shift")
    widths = tuple(c["block_out_channels"])
    if any(w % widths[0] for w in widths):
        _refuse("block_out_channels", widths, "multiples of the first")
    if c["time_embedding_dim"] not in (None, 4 * widths[0]):
        _refuse("time_embedding_dim", c["time_embedding_dim"], f"None or {4 * widths[0]}")
    if c["downsample_padding"] not in (0, 1) or c["norm_num_groups"] is None:
        _refuse("downsample_padding/norm_num_groups", c["downsample_padding"], "0 or 1 / an int")


def _image_size(sample_size):
    if isinstance(sample_size, list | tuple) and len(set(sample_size)) == 1:
        sample_size = sample_size[0]
    if not isinstance(sample_size, int) or sample_size < 1:
        _refuse("sample_size", sample_size, "one int, or a square [size, size]")
    return sample_size


def _attention_levels(down, up, levels):
    """Levels with attention, the same on both paths (ours is per resolution)."""
    down, up = [n.removeprefix("UNetRes") for n in down], [n.removeprefix("UNetRes") for n in up]
    for kind, names in (("Down", down), ("Up", up)):
        for name in names:
            if name not in _BLOCKS or kind not in name:
                _refuse(f"{kind.lower()}_block_types", name, ", ".join(_BLOCKS))
    if len(down) != levels or len(up) != levels:
        _refuse("down/up_block_types", (len(down), len(up)), f"{levels} each")
    down_attn = [_BLOCKS[n] for n in down]
    if down_attn != [_BLOCKS[n] for n in reversed(up)]:
        _refuse("up_block_types", tuple(up), "the mirror of down_block_types")
    return [i for i, a in enumerate(down_attn) if a]


def diffusers_config(cfg: unet.UNetConfig, image_size: int, in_channels: int) -> dict:
    """The UNet2DModel config.json dict of a U-Net here; what it cannot express is refused."""
    if not cfg.resamp_with_conv:
        raise UserError("resamp_with_conv=False (average-pool resampling) has no UNet2DModel form")
    levels = range(len(cfg.ch_mult))
    attn = [image_size // 2**i in cfg.attn_resolutions for i in levels]
    if sum(attn) != sum(r <= image_size for r in cfg.attn_resolutions):
        raise UserError(f"attn_resolutions {cfg.attn_resolutions} are not all level sizes")
    return dict(
        _class_name="UNet2DModel", sample_size=image_size, in_channels=in_channels,
        out_channels=cfg.out_ch, center_input_sample=False, time_embedding_type="positional",
        freq_shift=_number(cfg.time_shift), flip_sin_to_cos=cfg.time_flip,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=1, downsample_padding=int(cfg.downsample_pad == "symmetric"),
        dropout=cfg.dropout, act_fn="silu", attention_head_dim=cfg.attn_head_dim or None,
        norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        attn_norm_num_groups=_mid_groups(cfg),
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
        add_attention=True, num_class_embeds=cfg.num_classes or None,
    )  # fmt: skip


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def _mid_groups(cfg):
    if cfg.mid_attn_groups == -1:
        if not cfg.scale_shift:
            raise UserError("a middle attention without norm is a scale_shift model's only")
        return None
    groups = cfg.mid_attn_groups or cfg.norm_groups
    return None if (groups == cfg.norm_groups and not cfg.scale_shift) else groups


_MODULES = [
    (r"^temb/dense(\d)", lambda m, n: f"time_embedding.linear_{int(m[1]) + 1}"),
    (r"^label_emb$", lambda m, n: "class_embedding"),
    (r"^norm_out$", lambda m, n: "conv_norm_out"),
    (r"^mid/block_(\d)", lambda m, n: f"mid_block.resnets.{int(m[1]) - 1}"),
    (r"^mid/attn_1", lambda m, n: "mid_block.attentions.0"),
    (r"^(down|up)_(\d+)/block_(\d+)", lambda m, n: f"{m[1]}_blocks.{_lvl(m, n)}.resnets.{m[3]}"),
    (r"^(down|up)_(\d+)/attn_(\d+)", lambda m, n: f"{m[1]}_blocks.{_lvl(m, n)}.attentions.{m[3]}"),
    (r"^(down|up)_(\d+)/\w+sample", lambda m, n: f"{m[1]}_blocks.{_lvl(m, n)}.{m[1]}samplers.0"),
]  # fmt: skip
_LAYERS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
           "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # fmt: skip
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _lvl(match, num_levels):
    level = int(match[2])
    return level if match[1] == "down" else num_levels - 1 - level


def diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
    """The state-dict key of our parameter at `path` ('down_0', 'block_0', 'conv1',
    'kernel') -> 'down_blocks.0.resnets.0.conv1.weight'."""
    *modules, leaf = path
    name = "/".join(modules)
    for pattern, rename in _MODULES:
        match = re.match(pattern, name)
        if match:
            rest = name[match.end() :].split("/")
            name = ".".join([rename(match, num_levels), *(_LAYERS.get(p, p) for p in rest if p)])
            break
    leaf = "bias" if leaf == "bias" else "weight"
    return f"{name}.{leaf}"


def params_from_state_dict(state: dict, expected, name_of, where: str) -> dict:
    """Our parameter tree from a diffusers state dict ({key: array}, torch layouts),
    checking every name and shape against `expected` (arrays or ShapeDtypeStructs);
    name_of(path) is a parameter's key there (e.g. diffusers_name with the level count)."""
    state = {_new_attention_name(k): v for k, v in state.items()}
    flat = traverse_util.flatten_dict(expected)
    wanted = {name_of(p): p for p in flat}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    params, misshaped = {}, []
    for key, path in wanted.items():
        if key in state:
            params[path] = to_flax(state[key], path, flat[path].shape)
            if params[path].shape != tuple(flat[path].shape):
                misshaped.append(f"{key}: {tuple(state[key].shape)} for {flat[path].shape}")
    if missing or unexpected or misshaped:
        raise UserError(
            f"{where} does not match its config.json:\n"
            + "".join(f"  missing: {k}\n" for k in missing)
            + "".join(f"  unexpected: {k}\n" for k in unexpected)
            + "".join(f"  wrong shape: {m}\n" for m in misshaped)
        )
    return traverse_util.unflatten_dict(params)


def _new_attention_name(key):
    """The 2022 attention spelling (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    parts = key.split(".")
    if len(parts) > 2 and "attentions" in parts and parts[-2] in _OLD_ATTENTION:
        parts[-2] = _OLD_ATTENTION[parts[-2]]
    return ".".join(parts)


def to_flax(array, path, shape) -> np.ndarray:
    """A torch-layout tensor as our parameter at `path` (shape: ours, for the label row)."""
    array = np.asarray(array, np.float32)
    if path[-1] == "kernel" and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
        return array[0, 0] if path[-2] == "nin_shortcut" else array
    if path[-1] == "kernel":
        return array.T  # (out, in) -> (in, out)
    if path[-1] == "embedding" and array.shape[0] + 1 == shape[0]:
        return np.concatenate([array, np.zeros_like(array[:1])])  # "no label": zeros
    return array


def to_torch(array, path) -> np.ndarray:
    """Our parameter at `path` in torch's layout (the inverse of to_flax)."""
    array = np.asarray(array, np.float32)
    if path[-1] == "kernel" and path[-2] == "nin_shortcut":
        return np.ascontiguousarray(array.T[:, :, None, None])
    if path[-1] == "kernel":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T)
    if path[-1] == "embedding" and not np.any(array[-1]):
        return array[:-1]  # a zero "no label" row came from diffusers
    return array


def state_dict(params, num_levels: int) -> dict[str, np.ndarray]:
    """The UNet2DModel state dict of our parameters."""
    flat = traverse_util.flatten_dict(params)
    return {diffusers_name(p, num_levels): to_torch(a, p) for p, a in flat.items()}


def read_weights(folder) -> tuple[dict[str, np.ndarray], str]:
    """({key: float32 array}, file) of a UNet2DModel folder: its .safetensors, or else the
    .bin torch pickle read by torch_pickle (no code from the file runs)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            break
    else:
        raise UserError(
            f"{folder} has no diffusion_pytorch_model.safetensors or .bin (a UNet2DModel "
            "folder holds config.json and one of them)"
        )
    if path.suffix == ".bin":
        from ddpm_jax import torch_pickle

        return torch_pickle.load(path), str(path)
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path)
