"""notebooks/sample.ipynb runs end to end on a tiny checkpoint (its code cells, in order, from
its own folder)."""

import json
import os
from pathlib import Path

import numpy as np
from conftest import mnist_data_dir

from ddpm_jax import checkpointing, config_lib, training

ROOT = Path(__file__).resolve().parents[1]


def test_sample_notebook_runs(tmp_path, monkeypatch):
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(mnist_data_dir())
    trainer = training.Trainer(config, tmp_path)
    manager = checkpointing.make_manager(tmp_path)
    checkpointing.save(manager, trainer.init(), config)  # a fresh model is enough to run every cell
    manager.wait_until_finished()
    monkeypatch.setenv("DDPM_WORKDIR", str(tmp_path))
    monkeypatch.setenv("DDPM_CONFIG", "tiny")  # a packaged config by name
    monkeypatch.chdir(ROOT / "notebooks")  # run from its own folder, as Jupyter does
    notebook = json.loads((ROOT / "notebooks" / "sample.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    namespace = {}
    for source in cells:
        exec(compile(source, "sample.ipynb", "exec"), namespace)  # noqa: S102
    assert namespace["samples"].shape == (16, 8, 8, 1)
    assert namespace["progression"]["x_t"].shape == (10, 4, 8, 8, 1)
    np.testing.assert_array_equal(namespace["progression"]["x_t"][-1], namespace["x_0"])
    assert namespace["rows"].shape == (4 * 16, 10 * 8, 1)
    assert os.environ["DDPM_WORKDIR"] == str(tmp_path)
