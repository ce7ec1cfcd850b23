"""Evaluation runs: results files, the Fig. 5 plot, modes, periodic evaluation in training."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fid_file, mnist_data_dir
from PIL import Image

from ddpm_jax import config_lib, eval_modes, plots, training

ROOT = Path(__file__).resolve().parents[1]


def test_rate_distortion_plot_draws_the_curves(tmp_path):
    T = 50
    rate = np.linspace(3.0, 0.0, T)  # index t: received after T - t steps
    distortion = np.linspace(0.0, 60.0, T) ** 0.5
    panels = plots.rate_distortion_png(tmp_path / "rd.png", rate, distortion)
    image = np.asarray(Image.open(tmp_path / "rd.png").convert("RGB")).astype(int)
    assert image.shape == (plots.PANEL_H, 2 * plots.PANEL_W, 3)
    steps = T - np.arange(T)
    for (box, x_range, y_range), curve in zip(panels, (rate, distortion), strict=True):
        assert x_range == (0.0, float(T))
        for t in (5, 25, 45):  # the line's colour is found where the curve's point maps to
            px, py = plots.to_pixels(steps[t], curve[t], box, x_range, y_range)
            patch = image[int(py) - 2 : int(py) + 3, int(px) - 2 : int(px) + 3]
            assert np.any(np.all(patch == plots.LINE, axis=-1)), (t, px, py)
    # Rate grows with the steps received: its first point (1 step) is low, its last high.
    _, py_first = plots.to_pixels(1, rate[-1], *panels[0])
    _, py_last = plots.to_pixels(T, rate[0], *panels[0])
    assert py_first > py_last
    with pytest.raises(ValueError, match="equal-length"):
        plots.rate_distortion_png(tmp_path / "x.png", rate, distortion[:-1])


def test_write_results_merges_and_draws(tmp_path):
    arrays = dict(rate_bpd=np.linspace(2, 0, 10), distortion_rmse=np.linspace(0, 9, 10))
    arrays["terms_bpd"] = np.ones(10)
    eval_modes.write_results(tmp_path, 7, {"bpd": 2.5, "bpd_stderr": 0.1}, arrays)
    eval_modes.write_results(tmp_path, 7, {"fid": 12.0})
    result = json.loads((tmp_path / "eval" / "step_7.json").read_text())
    assert result == {"bpd": 2.5, "bpd_stderr": 0.1, "fid": 12.0, "step": 7}
    np.testing.assert_array_equal(np.load(tmp_path / "eval" / "nll_step_7.npz")["terms_bpd"], 1)
    assert (tmp_path / "eval" / "rate_distortion_step_7.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_modes_are_checked_before_any_work(tiny_model):
    config, _, params = tiny_model
    with pytest.raises(ValueError, match="modes must be among"):
        eval_modes.check_modes(["nll", "bpd"])
    config = config.copy_and_resolve_references()
    with pytest.raises(ValueError, match="config.eval.inception_path"):
        eval_modes.run(config, config_lib.build(config), params, ["fid"], 8, 8)
    config.eval.inception_path = str(fid_file())
    with pytest.raises(ValueError, match="1008-way classifier"):
        eval_modes.run(config, config_lib.build(config), params, ["is"], 8, 8)
    with pytest.raises(ValueError, match="other_split"):
        eval_modes.run(config, config_lib.build(config), params, ["fid_data"], 8, 8)
    config.eval.every = -1
    with pytest.raises(ValueError, match="config.eval"):
        config_lib.build(config)


def test_periodic_evaluation_during_training(tmp_path, monkeypatch):
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    config.training.update(num_steps=4, sample_every=0, checkpoint_every=4)
    config.sampling.batch_size = 8  # the same batch shape as the data: one Inception program
    config.eval.update(every=2, fid_split="test[:8]", fid_samples=8, nll_batches=1)
    config.eval.update(inception_path=str(fid_file()), stats_dir=str(tmp_path / "stats"))
    built, make = [], eval_modes.PeriodicEvaluator
    monkeypatch.setattr(
        eval_modes, "PeriodicEvaluator", lambda *a: built.append(make(*a)) or built[0]
    )
    training.train_and_evaluate(config, tmp_path / "work")
    # Two evaluations, each program compiled once.
    assert built[0].bpd_fn._cache_size() == 1
    assert built[0].activations_fn.sampler.segment._cache_size() == 1
    assert [p.name[:19] for p in (tmp_path / "stats").iterdir()] == ["mnist_test-8_8x8x1_"]
    for step in (2, 4):
        result = json.loads((tmp_path / "work" / "eval" / f"step_{step}.json").read_text())
        assert result["num_examples"] == 8 and result["bpd"] > result["decoder_bpd"] > 0
        assert result["num_samples"] == 8 and result["fid"] > 0
        assert (tmp_path / "work" / "eval" / f"rate_distortion_step_{step}.png").is_file()
