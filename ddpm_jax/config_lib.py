"""From an ml_collections config to the typed setup the library takes, with checks.

`build(config)` is where a config becomes a `spec.Setup`: everything a run needs is
checked there, before anything is compiled or read, so that a mistake in a config or on
the command line fails at once with a message naming the setting and how to fix it. The
entry points and the loops (training, evaluation modes, data) read the config; the core
(diffusion, sampling, the bound, the train step) takes the Setup.
"""

import dataclasses
import difflib
import importlib.util
import math
from pathlib import Path

import numpy as np

from ddpm_jax import schedules, spec, unet
from ddpm_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_names():
    """The packaged configs (ddpm_jax/configs/NAME.py), by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(path_or_name):
    """The file of a config given by path or by the name of a packaged one ("cifar")."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name.removesuffix(".py")
    if str(path_or_name).removesuffix(".py") == name and name in config_names():
        return CONFIG_DIR / f"{name}.py"
    if name in config_names():  # a path to a clone's configs/, given from elsewhere
        raise UserError(
            f"config file {str(path_or_name)!r} does not exist (relative to {Path.cwd()}); "
            f"the packaged config of that name is --config {name}"
        )
    raise UserError(
        f"config file {str(path_or_name)!r} does not exist, and {name!r} is not a packaged "
        f"config; give a config file's path or one of {', '.join(config_names())}"
    )


def resolve_config_flag(argv):
    """argv with `--config NAME` (or `--config=NAME[:args]`) replaced by the packaged file's
    path, which is what ml_collections' config flag takes; paths are left as they are.
    `--pretrained FOLDER` adds `--config pretrained:FOLDER` (a diffusers pipeline)."""
    argv = _pretrained_config(list(argv))
    out = []
    while argv:
        arg = argv.pop(0)
        if arg == "--config" and argv:
            out += [arg, _resolve(argv.pop(0))]
        elif arg.startswith("--config="):
            out.append("--config=" + _resolve(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out


def _pretrained_config(argv):
    """argv with --config pretrained:FOLDER added where --pretrained FOLDER is given."""
    values = [a.removeprefix("--pretrained=") for a in argv if a.startswith("--pretrained=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--pretrained"]
    if not values:
        return argv
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        raise UserError(
            "give --pretrained FOLDER or --config, not both (--config pretrained:FOLDER is the "
            "same as --pretrained FOLDER, and takes --config.KEY=VALUE overrides either way)"
        )
    # before any --config.KEY=VALUE: ml_collections defines those once --config is parsed
    return [argv[0], f"--config={CONFIG_DIR / 'pretrained.py'}:{values[-1]}", *argv[1:]]


def _resolve(value):
    name, colon, args = value.partition(":")
    if Path(value).is_file() or Path(name).is_file():
        return value
    return f"{config_path(name)}{colon}{args}"


def load_config(path_or_name):
    """get_config() of a config given by path or by name (as `--config` takes it); a file
    that does not run, or has no get_config, is a UserError naming it."""
    path = config_path(path_or_name)
    spec_ = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec_)
    try:
        spec_.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise UserError(f"config file {path} has no get_config() function; define one")
        return module.get_config()
    except SyntaxError as e:
        raise UserError(f"config file {path}, line {e.lineno}: {e.msg}; fix it") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"config file {path} raised {type(e).__name__}: {e}; fix the file"
        ) from None


def setting_names(config, prefix=""):
    """Every setting of a config as a dotted name ("training.batch_size", ...)."""
    names = []
    for key, value in config.items():
        if hasattr(value, "items"):
            names += setting_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def check_config_flags(argv):
    """Before flags are parsed: the file of `--config` runs and has get_config(), and each
    `--config.KEY=VALUE` names one of its settings; a UserError names the mistake (an
    unknown key with the closest known names). A config given arguments (FILE:ARGS) is
    left to ml_collections."""
    value = next((a.removeprefix("--config=") for a in argv if a.startswith("--config=")), None)
    if value is None and "--config" in argv[:-1]:
        value = argv[argv.index("--config") + 1]
    if value is None or ":" in value:
        return
    names = setting_names(load_config(value))
    keys = [a[len("--config.") :].split("=")[0] for a in argv if a.startswith("--config.")]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2, cutoff=0.7)
            hint = (
                f"; did you mean {' or '.join('config.' + c for c in close)}?"
                if close
                else ("; see the config file for its settings")
            )
            raise UserError(f"--config.{key}: the config has no setting {key!r}{hint}")


def stage(config) -> spec.Stage:
    """config.stage: what the config trains (a diffusion model when it has none)."""
    try:
        return spec.choose(spec.Stage, "stage", config.get("stage", spec.Stage.DIFFUSION))
    except UserError as e:
        raise UserError(f"config.{e}") from None


def build(config, num_devices: int = 1, num_processes: int = 1, first_stage=None) -> spec.Setup:
    """The typed setup of a config: every setting checked (a mistake is a UserError naming
    it and the fix) and each piece built once. The only reader of a config's model,
    diffusion, sampling and training settings; the core takes what this returns.
    first_stage: (AutoencoderConfig, scale) instead of those of config.autoencoder.path
    (a benchmark's untrained first stage)."""
    if stage(config) != spec.Stage.DIFFUSION:
        raise UserError(
            "this is a first stage's config (config.stage = 'autoencoder'): train it with "
            "train.py, evaluate it with evaluate.py --eval psnr; sampling needs a diffusion model"
        )
    diffusion_spec_ = diffusion_spec(config)
    size = config.data.image_size
    if not isinstance(size, int) or size < 1:
        raise UserError(f"config.data.image_size must be a positive integer, got {size!r}")
    if config.data.num_channels not in (1, 3):
        raise UserError(f"config.data.num_channels must be 1 or 3, got {config.data.num_channels}")
    latent = latent_spec(config, first_stage)
    shape = (size, size, config.data.num_channels) if latent is None else latent.latent_shape
    model = unet_config(config, diffusion_spec_, shape[-1])
    try:
        model.check_image_size(shape[0])
    except ValueError as e:
        raise UserError(f"config.data.image_size{' (latent)' if latent else ''}: {e}") from e
    if latent is not None and diffusion_spec_.clip_x0:
        raise UserError(
            "config.sampling.clip_x0 must be False for a latent model: its latents are not "
            "bounded by [-1, 1] as pixels are (set --config.sampling.clip_x0=False)"
        )
    if config.data.get("shuffle_buffer", 1) < 1:
        raise UserError(
            f"config.data.shuffle_buffer must be >= 1 (1: no shuffling), got "
            f"{config.data.shuffle_buffer}"
        )
    check_batch("training.batch_size", config.training.batch_size, num_devices, num_processes)
    check_eval(config, num_devices, num_processes)
    return spec.Setup(
        unet=model,
        schedule=make_schedule(config),
        diffusion=diffusion_spec_,
        sampler=sampler_spec(config),
        training=train_spec(config),
        image_shape=shape,
        seed=config.seed,
        latent=latent,
    )


def latent_spec(config, described=None) -> spec.LatentSpec | None:
    """The first stage of config.autoencoder.path (or `described`: its (AutoencoderConfig,
    scale)), or None (pixel space). Its latents must have the shape the config states
    (config.autoencoder.latent_size, latent_channels)."""
    a = config.get("autoencoder")
    if a is None or not (a.get("path") or described):
        return None
    from ddpm_jax import first_stage

    cfg, folder_scale = described or first_stage.describe(a.path)
    size, channels = config.data.image_size, config.data.num_channels
    pixels = (size, size, channels)
    if cfg.out_ch != channels or size % cfg.factor:
        raise UserError(
            f"config.autoencoder.path: the first stage at {a.path} encodes {cfg.out_ch}-channel "
            f"images whose side is a multiple of f = {cfg.factor}; config.data makes {pixels}"
        )
    latent = cfg.latent_shape(pixels)
    want = (a.latent_size, a.latent_size, a.latent_channels)
    if latent != want:
        raise UserError(
            f"config.autoencoder.path: the first stage at {a.path} makes {latent} latents of "
            f"{pixels} images (f = {cfg.factor}, z_channels = {cfg.z_channels}), but this model "
            f"works on {want} (config.autoencoder.latent_size, latent_channels): use the first "
            f"stage the model was built for, or set latent_size={latent[0]}, "
            f"latent_channels={latent[2]} for a new model"
        )
    if not a.scale >= 0:
        raise UserError(f"config.autoencoder.scale must be >= 0 (0: automatic), got {a.scale}")
    step = a.get("step", 0)
    if not isinstance(step, int) or step < 0:
        raise UserError(f"config.autoencoder.step must be >= 0 (0: the newest), got {step!r}")
    return spec.LatentSpec(cfg, pixels, str(a.path), float(a.scale or folder_scale), step)


def unet_config(
    config, diffusion_spec_: spec.DiffusionSpec | None = None, channels: int | None = None
) -> unet.UNetConfig:
    """The UNetConfig of config.model, its out_ch following from the diffusion spec
    (`channels`, by default config.data.num_channels, twice that with a learned
    variance)."""
    fields = {f.name for f in dataclasses.fields(unet.UNetConfig)} - {"out_ch"}
    unknown = set(config.model) - fields
    if unknown:
        raise UserError(f"unknown config.model settings {sorted(unknown)}; known: {sorted(fields)}")
    model = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.model.items()}
    diffusion_spec_ = diffusion_spec_ or diffusion_spec(config)
    out_ch = diffusion_spec_.output_channels(channels or config.data.num_channels)
    try:
        return unet.UNetConfig(**model, out_ch=out_ch)
    except ValueError as e:
        raise UserError(f"config.model: {e}") from e


def make_schedule(config) -> schedules.Schedule:
    """The Schedule of config.diffusion; a schedule that cannot be built is a UserError."""
    return schedules.schedule_from_betas(betas(config))


def betas(config) -> np.ndarray:
    """β_1..β_T of config.diffusion in float64 (beta_schedule "given": its tuple `betas`);
    a schedule that cannot be built is a UserError."""
    d = config.diffusion
    try:
        if d.beta_schedule == "given":
            given = np.asarray(d.get("betas") or (), np.float64)
            if given.size != d.num_timesteps:
                raise ValueError(f"given betas must be num_timesteps={d.num_timesteps} values")
            schedules.check_betas(given)
            return given
        return schedules.get_beta_schedule(
            d.beta_schedule,
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            num_timesteps=d.num_timesteps,
        )
    except ValueError as e:
        raise UserError(f"config.diffusion: {e}") from e


def diffusion_spec(config) -> spec.DiffusionSpec:
    """The DiffusionSpec of config.diffusion, with config.sampling.clip_x0; a mistake is a
    UserError naming the setting."""
    d = config.diffusion
    try:
        return spec.DiffusionSpec(
            mean_type=d.mean_type,
            var_type=d.var_type,
            loss_type=d.loss_type,
            clip_x0=bool(config.sampling.clip_x0),
            hybrid_lambda=d.get("hybrid_lambda", spec.DiffusionSpec.hybrid_lambda),
        )
    except UserError as e:
        raise UserError(f"config.diffusion.{e}") from None


def sampler_spec(config) -> spec.SamplerSpec:
    """The SamplerSpec of config.sampling: num_steps 0 is the whole chain of T steps."""
    s, T = config.sampling, config.diffusion.num_timesteps
    try:
        method = spec.choose(spec.SamplerMethod, "method", s.method)
        spacing = spec.choose(spec.Spacing, "spacing", s.get("spacing", "linspace"))
    except UserError as e:
        raise UserError(f"config.sampling.{e}") from None
    if not 0 <= s.num_steps <= T:
        raise UserError(f"config.sampling.num_steps must be in [0, T={T}], got {s.num_steps}")
    if not 0.0 <= s.eta <= 1.0:
        raise UserError(f"config.sampling.eta must be in [0, 1], got {s.eta}")
    if not isinstance(s.batch_size, int) or s.batch_size < 1:
        raise UserError(f"config.sampling.batch_size must be >= 1, got {s.batch_size!r}")
    w = s.get("guidance", 0.0)
    if not (math.isfinite(w) and w >= 0) or (w and not config.model.get("num_classes", 0)):
        raise UserError(
            f"config.sampling.guidance must be >= 0, and 0 for an unconditional model "
            f"(config.model.num_classes = 0); got {w}"
        )
    steps = s.num_steps or T
    return spec.SamplerSpec(method, steps, float(s.eta), s.batch_size, float(w), spacing)


def train_spec(config) -> spec.TrainSpec:
    """The TrainSpec of config.training, after check_training."""
    check_training(config)
    t = config.training
    try:
        sampler = spec.choose(
            spec.TimestepSampler, "timestep_sampler", t.get("timestep_sampler", "uniform")
        )
    except UserError as e:
        raise UserError(f"config.training.{e}") from None
    return spec.TrainSpec(
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip,
        ema_decay=t.ema_decay,
        ema_warmup=bool(t.get("ema_warmup", False)),
        label_dropout=t.get("label_dropout", 0.0),
        timestep_sampler=sampler,
    )


def check_batch(name, batch_size, num_devices, num_processes=1):
    """A global batch must split evenly over processes and devices."""
    if batch_size < 1 or batch_size % num_devices or batch_size % num_processes:
        raise UserError(
            f"{name}={batch_size} must be a positive multiple of the number of devices "
            f"({num_devices}) and of processes ({num_processes}); set --config.{name}=N with "
            f"N divisible by {num_devices}"
        )


def check_training(config):
    t = config.training
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"config.training.ema_decay must be in [0, 1), got {t.ema_decay}")
    lr = t.learning_rate
    if not 0 < lr <= float(np.finfo(np.float32).max):  # NaN fails, and 1e39 (inf in float32)
        raise UserError(
            f"config.training.learning_rate must be > 0 and finite in float32, got {lr}"
        )
    p, classes = t.get("label_dropout", 0.0), config.model.get("num_classes", 0)
    if not 0.0 <= p < 1.0 or (p and not classes):
        raise UserError(
            f"config.training.label_dropout must be in [0, 1), and 0 for an unconditional "
            f"model (config.model.num_classes = 0); got {p} with num_classes {classes}"
        )
    if not t.grad_clip > 0 or t.warmup_steps < 0:
        raise UserError("config.training: grad_clip must be > 0 and warmup_steps >= 0")
    at_least = dict(num_steps=1, log_every=1, checkpoint_every=1, keep_checkpoints=1)
    at_least.update(keep_period=0, sample_every=0, num_sample_images=1 if t.sample_every else 0)
    for name, low in at_least.items():
        if t[name] < low:
            hint = " (0: off)" if low == 0 else ""
            raise UserError(f"config.training.{name} must be >= {low}{hint}, got {t[name]}")


def check_eval(config, num_devices=1, num_processes=1):
    e = config.eval
    check_batch("eval.batch_size", e.batch_size, num_devices, num_processes)
    if min(e.every, e.nll_batches, e.fid_samples) < 0 or e.num_samples < 1:
        raise UserError(
            "config.eval: every, nll_batches and fid_samples must be >= 0, num_samples >= 1"
        )
    if e.fid_samples and e.fid_samples < 2:
        raise UserError("config.eval.fid_samples must be 0 (no FID) or at least 2")
