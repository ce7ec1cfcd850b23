"""diffusers pipeline folders (and Hub ids) as configs and parameters here, and back.

A DDPMPipeline / DDIMPipeline folder holds `model_index.json`, `unet/` (a UNet2DModel:
config.json and diffusion_pytorch_model.safetensors or .bin) and
`scheduler/scheduler_config.json`. `get_config(folder)` turns it into a config of this
package (the packaged `--config pretrained:FOLDER` and `--pretrained FOLDER` of sample.py
and evaluate.py), `load(name)` into (config, parameters) for a notebook:

    config, params = diffusers_pipeline.load("google/ddpm-cifar10-32")
    samples = sampling.make_sample_fn(config)(params, jax.random.key(0), 16)

`write(out, config, params)` writes a folder that diffusers' DDPMPipeline loads. A Hub id
is downloaded with huggingface_hub (into its cache) when it is not a local folder.
"""

import json
import os
import socket
from pathlib import Path

from ddpm_jax import diffusers_unet, fs
from ddpm_jax.errors import UserError

PIPELINES = {"DDPMPipeline": "ancestral", "DDIMPipeline": "ddim"}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}  # fmt: skip
VARIANCES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
             "fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge",
             "learned_range": "learned_range"}  # fmt: skip
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# Scheduler settings whose other values change the process; anything else is sampling detail.
SCHEDULER_REQUIRED = dict(thresholding=False, rescale_betas_zero_snr=False)
HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.md"]


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def resolve(name) -> Path:
    """The local folder of `name`: itself if it is a folder, else a Hub id downloaded (or
    found in huggingface_hub's cache); no network fails within seconds."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or str(name).startswith(".") or str(name).count("/") != 1:
        raise UserError(f"{name}: no such folder (and not a Hub id such as google/ddpm-cifar10-32)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not in the cache: download
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not _online():
        raise UserError(
            f"{name} is not a local folder and is not in the Hugging Face cache, and the Hub "
            "cannot be reached (offline); download it elsewhere and pass its folder"
        )
    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_FILES))
    except Exception as e:
        raise UserError(f"downloading {name} from the Hugging Face Hub failed: {e}") from None


def _online(host="huggingface.co", timeout=3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{host}")
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def folders(folder) -> tuple[Path, dict | None]:
    """(the UNet2DModel folder, the scheduler config or None) of a pipeline folder or of a
    bare UNet2DModel folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINES:
            raise UserError(
                f"{folder}: {pipeline} is not supported here (supported: {', '.join(PIPELINES)})"
            )
        return folder / "unet", read_json(folder / "scheduler" / "scheduler_config.json")
    if (folder / "config.json").is_file():
        return folder, None
    raise UserError(f"{folder} holds neither model_index.json (a pipeline) nor config.json")


def diffusion_settings(scheduler: dict) -> dict:
    """config.diffusion and config.sampling settings of a DDPM/DDIM scheduler config."""
    name = scheduler.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise UserError(f"scheduler {name} is not supported here (supported: {SCHEDULERS})")
    for key, value in SCHEDULER_REQUIRED.items():
        if scheduler.get(key, value) != value:
            raise UserError(f"scheduler setting {key}={scheduler[key]!r} is not supported here")
    get = lambda key, table, default: _choose(key, scheduler.get(key, default), table)  # noqa: E731
    diffusion = dict(
        num_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_start=float(scheduler.get("beta_start", 1e-4)),
        beta_end=float(scheduler.get("beta_end", 0.02)),
        mean_type=get("prediction_type", PREDICTIONS, "epsilon"),
        var_type=get("variance_type", VARIANCES, "fixed_small"),
    )
    if scheduler.get("trained_betas") is not None:
        diffusion.update(beta_schedule="given", betas=tuple(map(float, scheduler["trained_betas"])))
    else:
        diffusion["beta_schedule"] = get("beta_schedule", BETA_SCHEDULES, "linear")
    if diffusion["var_type"] == "learned_range":
        diffusion["loss_type"] = "hybrid"
    clip = bool(scheduler.get("clip_sample", True))
    if clip and float(scheduler.get("clip_sample_range", 1.0)) != 1.0:
        raise UserError("scheduler setting clip_sample_range other than 1.0 is not supported")
    return dict(diffusion=diffusion, clip_x0=clip)


def _choose(key, value, table):
    if value not in table:
        raise UserError(
            f"scheduler setting {key}={value!r} is not supported (one of {list(table)})"
        )
    return table[value]


def get_config(name, **model):
    """The config of the pipeline or UNet2DModel folder (or Hub id) `name`: the network of
    its unet/config.json, the diffusion of its scheduler, config.pretrained its folder.
    Data settings are CIFAR10's but for the image size and channels: set
    config.data.dataset to evaluate against a dataset."""
    from ddpm_jax.configs import cifar

    folder = resolve(name)
    unet_folder, scheduler = folders(folder)
    unet_json = read_json(unet_folder / "config.json")
    cfg, size = diffusers_unet.unet_config(unet_json, **model)
    config = cifar.get_config()
    config.pretrained = str(folder)
    config.data.update(image_size=size, num_channels=unet_json.get("in_channels", 3))
    fields = {k: v for k, v in vars(cfg).items() if k != "out_ch"}
    config.model.update({k: v for k, v in fields.items() if k in config.model})
    for key in fields.keys() - set(config.model):
        config.model[key] = fields[key]
    settings = diffusion_settings(scheduler or {})
    for key, value in settings["diffusion"].items():
        config.diffusion[key] = value
    config.sampling.clip_x0 = settings["clip_x0"]
    channels, learned = config.data.num_channels, settings["diffusion"]["var_type"]
    if cfg.out_ch != channels * (2 if learned == "learned_range" else 1):
        raise UserError(
            f"{unet_folder}: out_channels={cfg.out_ch} for in_channels={channels} does not fit "
            f"the scheduler's variance_type ({learned}: learned_range has twice the channels)"
        )
    pipeline = read_json(folder / "model_index.json")["_class_name"] if scheduler else None
    if PIPELINES.get(pipeline) == "ddim":
        config.sampling.update(method="ddim", num_steps=50)  # DDIMPipeline's default
    return config


def load_params(folder, setup) -> dict:
    """The U-Net parameters of a pipeline (or UNet2DModel) folder, checked against the
    network of `setup` (config_lib.build of get_config's config)."""
    from ddpm_jax import convert

    unet_folder, _ = folders(folder)
    state, where = diffusers_unet.read_weights(unet_folder)
    expected = convert.expected_params(setup)
    levels = len(setup.unet.ch_mult)
    name_of = lambda path: diffusers_unet.diffusers_name(path, levels)  # noqa: E731
    return diffusers_unet.params_from_state_dict(state, expected, name_of, where)


def load(name, **model):
    """(config, parameters) of a pipeline folder or Hub id; `model` sets dtype/precision."""
    from ddpm_jax import config_lib

    config = get_config(name, **model)
    return config, load_params(config.pretrained, config_lib.build(config))


def scheduler_config(config) -> dict:
    """The DDPMScheduler config of a config's schedule (its β in float64) and diffusion."""
    from ddpm_jax import config_lib

    d, betas = config_lib.diffusion_spec(config), config_lib.betas(config)
    variance = {v: k for k, v in VARIANCES.items() if not k.endswith("_log")}[d.var_type]
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(d.mean_type)
    if prediction is None:
        raise UserError(f"mean type {d.mean_type!r} has no diffusers prediction_type")
    return dict(
        _class_name="DDPMScheduler", num_train_timesteps=int(betas.size),
        beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]),
        trained_betas=betas.tolist(), variance_type=variance, clip_sample=d.clip_x0,
        clip_sample_range=1.0, prediction_type=prediction, thresholding=False,
        timestep_spacing="leading", steps_offset=0,
    )  # fmt: skip


def write(out, config, params) -> Path:
    """Write a DDPMPipeline folder of `config` and its U-Net parameters to the new folder
    `out`; returns it."""
    from safetensors.numpy import save

    from ddpm_jax import config_lib

    out = fs.as_path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder (nothing is overwritten)")
    setup = config_lib.build(config)
    if setup.latent is not None:
        raise UserError("a latent model does not export (only pixel-space DDPMPipelines do)")
    size, channels = setup.image_shape[0], setup.image_shape[-1]
    unet_json = diffusers_unet.diffusers_config(setup.unet, size, channels)
    scheduler = scheduler_config(config)
    tensors = diffusers_unet.state_dict(params, len(setup.unet.ch_mult))
    for sub in ("unet", "scheduler"):
        (out / sub).mkdir(parents=True)
    index = dict(_class_name="DDPMPipeline", unet=["diffusers", "UNet2DModel"],
                 scheduler=["diffusers", "DDPMScheduler"])  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "unet" / "config.json").write_text(json.dumps(unet_json, indent=2))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(save(tensors))
    return out
