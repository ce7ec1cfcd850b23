r"""Evaluate a trained model (the EMA parameters of its latest checkpoint).

    python evaluate.py --config cifar --workdir /tmp/ddpm_cifar10 \
        --eval nll,fid,is --config.eval.inception_path=/path/to/inception-2015-12-05.pt

Modes (--eval, comma-separated):
  nll       the variational bound in bits/dim over every example of config.data.eval_split
            (all T steps, discretized decoder, prior term), mean ± standard error, with the
            per-step terms and the rate / distortion curve (npz and PNG, the paper's Fig. 5);
  fid       FID of --num_samples samples (default config.eval.num_samples = 50k, as the
            paper) against config.eval.fid_split (the paper: train), whose statistics are
            cached in config.eval.stats_dir;
  is        Inception Score over 10 splits (needs a network file with its classifier);
  kid       KID (unbiased MMD², cubic polynomial kernel; mean ± std over 100 subsets of up
            to 1000) against the first 10k examples of config.eval.fid_split: unbiased,
            so usable with a few hundred samples where FID is not;
  pr        precision and recall (Kynkäänniemi et al. 2019, k = 3) against the same;
            fid, is, kid and pr share one pass of the samples through the network;
  fid_data  FID of config.eval.fid_split against --other_split: a real-data baseline.
A latent model's samples are decoded before fid/is/kid/pr; its bound is in latent space
(bpd_space in the results says so): not comparable with a pixel model's bits/dim.
A first stage (config.stage = "autoencoder") takes --eval psnr[,fid]: the PSNR of the
reconstructions D(μ(x)) of config.data.eval_split and their FID against fid_split.
Writes WORKDIR/eval/step_N.json and TensorBoard scalars (eval/nll_bpd, eval/fid, ...).

--pretrained FOLDER_or_HUB_ID (no --config) evaluates a diffusers pipeline instead, its
results in WORKDIR/eval/step_0.json; set the dataset it is compared with, e.g.
--config.data.dataset=cifar10.
"""

from ddpm_jax import cli

cli.quiet_tensorflow()  # before anything imports TensorFlow

import json
import sys

import jax
from absl import app, flags, logging

from ddpm_jax import checkpointing, config_lib, data, diffusers_pipeline, eval_modes, first_stage
from ddpm_jax.spec import Stage

FLAGS = flags.FLAGS


def define_flags():
    cli.define_common_flags()
    flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint is evaluated).")
    flags.DEFINE_string("pretrained", None, "A diffusers pipeline folder or Hub id (no --config).")
    flags.DEFINE_list("eval", ["nll", "fid"], f"Modes, comma-separated, among {eval_modes.MODES}.")
    flags.DEFINE_integer(
        "num_samples",
        None,
        "FID / IS / KID / PR samples (default config.eval.num_samples).",
        lower_bound=2,
    )
    flags.DEFINE_integer("batch_size", None, "Global batch (default config.eval.batch_size).")
    flags.DEFINE_integer("max_batches", None, "Bound on only this many batches.", lower_bound=1)
    flags.DEFINE_string("other_split", None, "fid_data: the split compared with fid_split.")
    flags.DEFINE_integer("seed", 0, "Seed of the samples (FID, IS) and of the bound's noise (nll).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup(FLAGS)
    config = FLAGS.config
    if config_lib.stage(config) == Stage.AUTOENCODER:
        return evaluate_first_stage(config)
    setup = config_lib.build(config, jax.device_count(), jax.process_count())
    eval_modes.check_modes(FLAGS.eval)
    batch_size = config.eval.batch_size if FLAGS.batch_size is None else FLAGS.batch_size
    config_lib.check_batch("eval.batch_size", batch_size, jax.device_count(), jax.process_count())
    if config.get("pretrained") is not None:  # results go to --workdir
        params, step = diffusers_pipeline.load_params(config.pretrained, setup), 0
    else:
        params, step = checkpointing.restore_params(FLAGS.workdir, config)
        params = first_stage.bundle(setup, params, FLAGS.workdir, step)
    if set(FLAGS.eval) & {"nll", "fid", "kid", "pr", "fid_data"}:  # these read the dataset
        data.ensure_prepared(config, log=logging.info)
    scalars, arrays = eval_modes.run(
        config,
        setup,
        params,
        FLAGS.eval,
        config.eval.num_samples if FLAGS.num_samples is None else FLAGS.num_samples,
        batch_size,
        max_batches=FLAGS.max_batches,
        other_split=FLAGS.other_split,
        seed=FLAGS.seed,
        progress=True,
    )
    written = eval_modes.write_results(FLAGS.workdir, step, scalars, arrays)
    if jax.process_index() == 0:
        print(json.dumps(dict(scalars, step=step)))
        print(f"evaluated step {step}; wrote {', '.join(map(str, written))}", file=sys.stderr)


def evaluate_first_stage(config):
    """--eval psnr[,fid] of a first stage's EMA weights: PSNR of the reconstructions of
    config.data.eval_split, and their FID against config.eval.fid_split."""
    from ddpm_jax import autoencoder_runs, autoencoder_training, fid

    unknown = set(FLAGS.eval) - {"psnr", "fid"}
    if unknown:
        raise app.UsageError(f"a first stage is evaluated by --eval psnr[,fid]; got {FLAGS.eval}")
    setup = autoencoder_training.build(config, jax.device_count(), jax.process_count())
    batch_size = config.eval.batch_size if FLAGS.batch_size is None else FLAGS.batch_size
    config_lib.check_batch("eval.batch_size", batch_size, jax.device_count(), jax.process_count())
    params, step = checkpointing.restore_params(FLAGS.workdir, config)
    data.ensure_prepared(config, log=logging.info)
    network = reference = None
    if "fid" in FLAGS.eval:
        network = fid.load_network(config.eval.inception_path)
        reference = eval_modes.reference_statistics(config, network, batch_size, True)
    metrics = autoencoder_runs.ReconstructionMetrics(setup, network=network)
    scalars = metrics(config, params, batch_size, FLAGS.max_batches, reference, progress=True)
    written = eval_modes.write_results(FLAGS.workdir, step, scalars)
    if jax.process_index() == 0:
        print(json.dumps(dict(scalars, step=step)))
        print(f"evaluated step {step}; wrote {', '.join(map(str, written))}", file=sys.stderr)


def run():
    define_flags()
    cli.run(main, __file__)


if __name__ == "__main__":
    run()
