"""The bound over a split (sharded = unsharded), its terms and summary."""

from pathlib import Path

import jax
import numpy as np
from conftest import mnist_data_dir

from ddpm_jax import bound, config_lib, input_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_bound_over_a_split_sharded_equals_unsharded(tiny_model):
    config, model, params = tiny_model
    config = config.copy_and_resolve_references()
    config.data.update(data_dir=str(mnist_data_dir()), eval_split="test[:20]")
    setup = config_lib.build(config)
    four = bound.evaluate_bpd(config, setup, params, batch_size=8)
    one = bound.evaluate_bpd(  # another device count and batch size
        config, setup, params, batch_size=4, devices=jax.devices()[:1]
    )
    assert four["total_bpd"].shape == (20,) and four["terms_bpd"].shape == (20, 20)
    for key in four:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-6)
    # Row i is example i of the split, with the noise of fold_in(PRNGKey(0), i).
    ds, _ = input_pipeline.eval_dataset(config, 20)
    images = next(ds.as_numpy_iterator())[0]
    for i in (0, 13):
        alone = bound.bpd_step(
            params, images[i : i + 1], jax.random.fold_in(jax.random.PRNGKey(0), i)[None],
            setup=setup,
        )  # fmt: skip
        np.testing.assert_allclose(alone["total_bpd"][0], four["total_bpd"][i], rtol=1e-4)
    np.testing.assert_allclose(
        four["terms_bpd"].sum(1) + four["prior_bpd"], four["total_bpd"], rtol=1e-6
    )
    assert np.all(four["terms_bpd"] >= 0) and np.all(four["prior_bpd"] >= 0)
    summary = bound.summarize_bpd(four)
    assert summary["num_examples"] == 20 and summary["bpd_stderr"] > 0
    np.testing.assert_allclose(summary["rate_bpd"][0], summary["bpd"], rtol=1e-5)
    assert np.all(np.diff(summary["rate_bpd"]) <= 0)  # rate accumulates from t = T-1 down to 0
