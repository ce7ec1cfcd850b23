"""scripts/guidance_study.py: its classifier learns MNIST's labels (it scores samples)."""

import sys
from pathlib import Path

from conftest import mnist_data_dir

from ddpm_jax import config_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import guidance_study  # noqa: E402


def test_the_classifier_learns_the_digits():
    config = config_lib.load_config("mnist_cond")
    config.data.data_dir = str(mnist_data_dir())
    classify = guidance_study.train_classifier(config, steps=100)
    assert guidance_study.test_accuracy(config, classify) > 0.9  # chance: 0.1
