"""A first stage's runs: its Trainer (training.py's loop with autoencoder_training.py's
state and step), its grids of inputs against reconstructions, and its reconstruction
metrics (PSNR, and the FID of reconstructions where config.eval.inception_path is set),
periodically during training and from evaluate.py."""

import jax
import numpy as np

from ddpm_jax import (
    autoencoder_training,
    bound,
    eval_modes,
    fid,
    fs,
    images,
    lpips,
    sharding,
    training,
)
from ddpm_jax import workdir as workdir_lib


class AutoencoderTrainer(training.Trainer):
    """training.Trainer for a config with stage = "autoencoder"."""

    build_setup = staticmethod(autoencoder_training.build)

    def _build(self, workdir):
        self.workdir, self.created_workdir = workdir_lib.check_workdir(workdir)
        self.mesh = sharding.make_mesh(self.devices)
        functions = autoencoder_training.jit_functions(self.setup, self.mesh)
        self.abstract_state, self.init, self.train_step = functions
        self.frozen = ()  # the perceptual network, where the loss has one
        if self.setup.loss.perceptual_weight:
            weights = lpips.load(self.setup.loss.lpips_weights)
            self.frozen = (jax.device_put(weights, sharding.replicated(self.mesh)),)

    def sample_params(self, state):
        return state.ema_params

    def sampler(self):
        return ReconstructionGrid(self.config, self.setup, self.mesh)

    def evaluator(self, check_data):
        return PeriodicEvaluator(self.config, self.setup, self.workdir, self.devices)

    def write_grid(self, sample_fn, state, reporter):
        sample_fn.write(state.ema_params, int(state.step), self.workdir, reporter)


def reconstruct_fn(setup, mesh):
    """(params, x) -> (x̂, per-example PSNR), one jitted program over the mesh."""

    def fn(params, x):
        x_hat = autoencoder_training.reconstruct(setup, params, x)
        return x_hat, autoencoder_training.psnr(x, x_hat)

    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, batch), out_shardings=batch)


class ReconstructionGrid:
    """Grids of the first config.training.num_sample_images images of the eval split
    (rows of up to 8) each above its reconstruction D(μ(x)) by the EMA weights."""

    def __init__(self, config, setup, mesh):
        self.config, self.mesh = config, mesh
        self.reconstruct = reconstruct_fn(setup, mesh)
        self.inputs = None

    def images(self) -> np.ndarray:
        """The grid's inputs, read once."""
        if self.inputs is None:
            from ddpm_jax import input_pipeline  # TensorFlow: only where data is read

            n = self.config.training.num_sample_images
            ds, _ = input_pipeline.eval_dataset(self.config, n)
            self.inputs = next(ds.as_numpy_iterator())[0][:n]
        return self.inputs

    def __call__(self, params) -> np.ndarray:
        """uint8 grid: rows of inputs, each followed by the row of their reconstructions."""
        x = self.images()
        size = -(-len(x) // self.mesh.size) * self.mesh.size  # whole device shards
        padded = np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])
        batch = jax.device_put(padded, sharding.batch_sharding(self.mesh))
        x_hat = np.asarray(jax.device_get(self.reconstruct(params, batch)[0]))[: len(x)]
        rows = [np.concatenate([x[i : i + 8], x_hat[i : i + 8]]) for i in range(0, len(x), 8)]
        return images.image_grid(images.to_uint8(np.concatenate(rows)), ncols=min(8, len(x)))

    def write(self, params, step, workdir, reporter):
        grid = self(params)
        if jax.process_index() == 0:
            out = fs.as_path(workdir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            fs.save_png(out / f"reconstructions_step_{step:08d}.png", grid)
            reporter.image(step, "ema_reconstructions", grid)
        return grid


class ReconstructionMetrics:
    """metrics(config, params, batch_size, ...) -> {'psnr' (mean dB over the examples),
    'psnr_examples'} of the EMA reconstructions of config.data.eval_split (its first
    max_batches batches), and 'rec_fid' against `reference` where the Inception `network`
    is given. Compiled once, for every evaluation."""

    def __init__(self, setup, devices=None, network=None):
        self.mesh = sharding.make_mesh(devices)
        self.rec = reconstruct_fn(setup, self.mesh)
        self.act = None if network is None else fid.make_activations_fn(network[0], self.mesh)

    def __call__(self, config, params, batch_size, max_batches=None, reference=None,
                 progress=False) -> dict:  # fmt: skip
        params = jax.device_put(params, sharding.replicated(self.mesh))

        def step(x, index, *labels):
            x_hat, psnr = self.rec(params, x)
            return {"psnr": psnr} | (
                {} if self.act is None else {"pool3": self.act(x_hat)["pool3"]}
            )

        out = bound.map_split(step, config, batch_size, self.mesh, max_batches=max_batches,
                              progress=progress)  # fmt: skip
        scalars = {"psnr": float(np.mean(out["psnr"])), "psnr_examples": len(out["psnr"])}
        if self.act is not None:
            stats = fid.feature_statistics(out["pool3"])
            scalars["rec_fid"] = fid.frechet_distance(*stats, *reference[:2])
            scalars["fid_reference"] = f"{config.data.dataset} {config.eval.fid_split}"
        return scalars


class PeriodicEvaluator:
    """PSNR (and the FID of reconstructions, where config.eval.inception_path is set) on
    config.eval.psnr_batches batches of the eval split, every config.eval.every steps."""

    def __init__(self, config, setup, workdir, devices=None):
        self.config, self.setup, self.workdir, self.devices = config, setup, workdir, devices
        self.network = self.reference = None
        if config.eval.inception_path:
            self.network = fid.load_network(config.eval.inception_path)
            self.reference = eval_modes.reference_statistics(
                config, self.network, config.eval.batch_size, False, devices
            )
        self.metrics = ReconstructionMetrics(setup, devices, self.network)

    def __call__(self, ema_params, step):
        e = self.config.eval
        scalars = self.metrics(self.config, ema_params, e.batch_size, e.psnr_batches,
                               self.reference)  # fmt: skip
        eval_modes.write_results(self.workdir, step, scalars)
        return scalars
