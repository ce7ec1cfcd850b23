"""Evaluation runs: the modes of evaluate.py and periodic evaluation during training.

Results go to WORKDIR/eval/step_<N>.json (process 0), TensorBoard scalars under eval/,
and for the bound also nll_step_<N>.npz (per-step terms, rate, distortion) and
rate_distortion_step_<N>.png (the paper's Fig. 5).
"""

import json
import logging
import os

import jax
import numpy as np

from ddpm_jax import bound, events, fid, fs, inception, plots, sampling, sharding
from ddpm_jax.errors import UserError
from ddpm_jax.spec import Setup

MODES = ("nll", "fid", "is", "kid", "pr", "fid_data")
TB_NAMES = {
    "bpd": "nll_bpd", "fid": "fid", "is": "inception_score", "kid": "kid",
    "precision": "precision", "recall": "recall", "psnr": "psnr", "rec_fid": "reconstruction_fid",
}  # fmt: skip


def stats_dir(config):
    """config.eval.stats_dir, or ~/.cache/ddpm_jax/fid_stats."""
    if config.eval.stats_dir:
        return fs.as_path(config.eval.stats_dir)
    cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return fs.as_path(cache) / "ddpm_jax" / "fid_stats"


def check_modes(modes, network=None):
    """Unknown modes, and IS without the classifier, fail before any work."""
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise UserError(f"evaluation modes must be among {MODES}, got {list(modes)}")
    if "is" in modes and network is not None:
        inception.class_probabilities(network[0], np.zeros((1, 2048), np.float32))


def nll(config, setup: Setup, params, batch_size, max_batches=None, progress=False, devices=None,
        step_fn=None, seed=0):  # fmt: skip
    """(scalars, arrays) of the bound over config.data.eval_split; example i's noise comes
    from fold_in(PRNGKey(seed), i)."""
    result = bound.evaluate_bpd(
        config, setup, params, batch_size, seed=seed, devices=devices,
        max_batches=max_batches, progress=progress, step_fn=step_fn,
    )  # fmt: skip
    summary = bound.summarize_bpd(result)
    arrays = {k: v for k, v in summary.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in summary.items() if k not in arrays}
    if setup.latent is not None:  # not comparable with a pixel model's bits/dim
        h, w, c = setup.image_shape
        scalars["bpd_space"] = f"latent {h}x{w}x{c} (the first stage's scaled posterior mean)"
    return scalars, arrays


def write_results(workdir, step, scalars, arrays=None) -> list:
    """step_<N>.json (merged with what an earlier run at this step wrote), TensorBoard
    scalars and, for the bound, the npz and the plot. Process 0 only; returns the paths of
    the files written (not TensorBoard's)."""
    if jax.process_index() != 0:
        return []
    out = fs.as_path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{step}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    fs.write_bytes(path, json.dumps(dict(old, **scalars, step=step), indent=1).encode())
    written = [path]
    if arrays:
        written += [out / f"nll_step_{step}.npz", out / f"rate_distortion_step_{step}.png"]
        fs.save_npz(written[1], **arrays)
        plots.rate_distortion_png(written[2], arrays["rate_bpd"], arrays["distortion_rmse"])
    writer = events.EventWriter(fs.as_path(workdir) / "tensorboard")
    for key, name in TB_NAMES.items():
        if key in scalars:
            writer.scalar(step, f"eval/{name}", scalars[key])
    writer.close()
    return written


def reference_statistics(config, network, batch_size, progress=False, devices=None, features=False):
    """fid.Reference of config.eval.fid_split, from the cache or computed and cached
    (features=True: with its features, for KID and precision/recall)."""
    return fid.dataset_statistics(
        config, network, config.eval.fid_split, stats_dir(config), batch_size, devices, progress,
        features,
    )  # fmt: skip


def run(config, setup: Setup, params, modes, num_samples, batch_size, max_batches=None,
        other_split=None, seed=0, **kwargs):  # fmt: skip
    """The asked-for modes -> (scalars, arrays) for the model of `setup` on the data of
    `config`. max_batches limits the bound; fid_data is the FID of config.eval.fid_split
    against other_split (a real-data baseline); kwargs: progress, devices."""
    network, sample_metrics = None, [m for m in modes if m in fid.SAMPLE_METRICS]
    if sample_metrics or "fid_data" in modes:
        network = fid.load_network(config.eval.inception_path)
    check_modes(modes, network)
    if "fid_data" in modes and not other_split:
        raise UserError("mode fid_data needs the split to compare with (--other_split)")
    if {"kid", "pr"} & set(modes) and num_samples < 4:
        raise UserError(f"KID and precision/recall need at least 4 samples, got {num_samples}")
    scalars, arrays, reference = {}, None, None
    if "nll" in modes:
        scalars, arrays = nll(config, setup, params, batch_size, max_batches, seed=seed, **kwargs)
    if {"fid", "fid_data", "kid", "pr"} & set(modes):
        features = bool({"kid", "pr"} & set(modes))
        reference = reference_statistics(config, network, batch_size, **kwargs, features=features)
        scalars["fid_reference"] = f"{config.data.dataset} {config.eval.fid_split}"
        scalars["fid_reference_examples"] = reference.num_examples
    if sample_metrics:
        sampler = sampling.Sampler(setup, kwargs.get("devices"), kwargs.get("progress", False))
        acts = fid.SampleActivations(sampler, network)
        scalars.update(
            fid.sample_quality(acts, params, num_samples, reference, seed, sample_metrics)
        )
    if "fid_data" in modes:
        other = fid.dataset_statistics(
            config, network, other_split, stats_dir(config), batch_size, **kwargs
        )
        scalars.update(fid_data=fid.frechet_distance(*reference[:2], other.mu, other.sigma))
        scalars.update(fid_data_split=other_split, fid_data_examples=other.num_examples)
    return scalars, arrays


class PeriodicEvaluator:
    """Evaluation every config.eval.every training steps on a small budget: the bound on
    config.eval.nll_batches batches and FID of config.eval.fid_samples samples (FID only
    when config.eval.inception_path is set). The reference statistics are read or
    computed when the evaluator is built, before training starts."""

    def __init__(self, config, setup: Setup, workdir, devices=None, check_data=True):
        """check_data=False: the caller checks that the eval split reads (a data worker)."""
        self.config, self.setup, self.workdir, self.devices = config, setup, workdir, devices
        e = config.eval
        self.modes = (["nll"] if e.nll_batches else []) + (["fid"] if e.fid_samples else [])
        if "fid" in self.modes and not e.inception_path:
            logging.warning("periodic FID is off: set config.eval.inception_path to turn it on")
            self.modes.remove("fid")
        if "nll" in self.modes and check_data:
            from ddpm_jax import input_pipeline  # TensorFlow: only where data is read

            input_pipeline.check_dataset(config, config.data.eval_split)
        self.network = self.reference = self.bpd_fn = self.activations_fn = None
        if "nll" in self.modes:  # the jitted functions are built once, for every evaluation
            self.bpd_fn = bound.jit_bpd_step(setup, sharding.make_mesh(devices))
        if "fid" in self.modes:
            self.network = fid.load_network(e.inception_path)
            self.reference = reference_statistics(
                config, self.network, e.batch_size, False, devices
            )
            sampler = sampling.Sampler(setup, devices)
            self.activations_fn = fid.SampleActivations(sampler, self.network)

    def __call__(self, ema_params, step):
        """Evaluates and writes the results; returns the scalars."""
        e, scalars, arrays = self.config.eval, {}, None
        if "nll" in self.modes:
            scalars, arrays = nll(
                self.config, self.setup, ema_params, e.batch_size, e.nll_batches,
                devices=self.devices, step_fn=self.bpd_fn,
            )  # fmt: skip
        if "fid" in self.modes:
            scalars.update(
                fid.sample_quality(self.activations_fn, ema_params, e.fid_samples, self.reference)
            )
        write_results(self.workdir, step, scalars, arrays)
        return scalars
