"""Datasets that prepare themselves: on first use (download mocked), by command, and a
one-line failure offline that leaves nothing behind."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from ddpm_jax import config_lib, data, training

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_data": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx_files(folder, num_train=40, num_test=12):
    """MNIST's source files (IDX format, already extracted) with random digits."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = np.array([2051, n, 28, 28], ">i4").tobytes()
        (folder / MNIST_FILES[f"{split}_data"]).write_bytes(header + images.tobytes())
        header = np.array([2049, n], ">i4").tobytes()
        (folder / MNIST_FILES[f"{split}_labels"]).write_bytes(header + labels.tobytes())


@pytest.fixture
def mocked_download(tmp_path, monkeypatch):
    """MNIST 'downloads' from local files (40 train, 12 test images) with the network up;
    returns the list of URL batches asked for and hosts probed."""
    source = tmp_path / "source"
    write_idx_files(source)
    monkeypatch.setattr(tfds_mnist, "_TRAIN_EXAMPLES", 40)
    monkeypatch.setattr(tfds_mnist, "_TEST_EXAMPLES", 12)
    calls = dict(urls=[], hosts=[])

    def download_and_extract(self, url_or_urls):
        calls["urls"].append(dict(url_or_urls))
        return {key: source / MNIST_FILES[key] for key in url_or_urls}

    def reachable(host, port=443, timeout=data.PROBE_TIMEOUT_S):
        calls["hosts"].append((host, port))
        return True

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    monkeypatch.setattr(data, "reachable", reachable)
    return calls


def test_quickstart_prepares_mnist_on_first_use_then_trains(tmp_path, mocked_download):
    data_dir, workdir = tmp_path / "fresh_tfds", tmp_path / "work"
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(data_dir)
    config.training.update(num_steps=2, sample_every=0)
    config.eval.every = 0
    state = training.train_and_evaluate(config, workdir)
    assert int(state.step) == 2 and (workdir / "checkpoints" / "2").is_dir()
    builder = tfds.builder("mnist", data_dir=str(data_dir))
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 40
    assert builder.info.splits["test"].num_examples == 12
    assert mocked_download["hosts"] == [("storage.googleapis.com", 443)]
    assert len(mocked_download["urls"]) == 1
    assert set(mocked_download["urls"][0]) == set(MNIST_FILES)
    training.train_and_evaluate(config, tmp_path / "again")  # prepared: nothing downloaded
    assert len(mocked_download["urls"]) == 1


def test_prepare_command(tmp_path, mocked_download, capsys):
    data.main(["prepare", "mnist", "--data_dir", str(tmp_path / "tfds")])
    assert tfds.builder("mnist", data_dir=str(tmp_path / "tfds")).is_prepared()
    assert "Preparing 'mnist'" in capsys.readouterr().out
    data.main(["prepare", "mnist", "--data_dir", str(tmp_path / "tfds")])  # a no-op now
    assert len(mocked_download["urls"]) == 1
    assert capsys.readouterr().out == f"'mnist' is prepared in {tmp_path / 'tfds'}/mnist/3.0.1\n"


def test_prepare_offline_is_one_line(tmp_path):
    """`python -m ddpm_jax.data prepare` is as quiet as the entry points: offline, a
    dataset that is not prepared is one line (TFDS's and TensorFlow's notices kept out)."""
    cmd = [sys.executable, "-m", "ddpm_jax.data", "prepare", "cifar10", "--data_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: dataset 'cifar10' is not prepared in {tmp_path} and cannot be downloaded here "
        "(www.cs.toronto.edu is unreachable: offline?). On a machine with internet run "
        "`python -m ddpm_jax.data prepare cifar10 --data_dir DIR`, copy DIR here and set "
        "TFDS_DATA_DIR=DIR (or --config.data.data_dir=DIR)"
    ]


def test_offline_train_py_fails_in_seconds_with_one_line(tmp_path):
    """The README's command on a fresh machine without network (every connection refused)."""
    offline = (
        "import runpy, socket, sys\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network is unreachable')\n"
        "socket.create_connection = refuse\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    workdir = tmp_path / "ddpm_mnist"
    cmd = [sys.executable, "-c", offline, "--config", "configs/mnist.py", "--workdir", workdir]
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "empty_tfds"))
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stderr[-3000:]
    assert elapsed < 60, elapsed  # TensorFlow's import is most of it
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: dataset 'mnist' is not prepared in "), lines[-3:]
    assert "storage.googleapis.com is unreachable" in lines[-1]
    assert "`python -m ddpm_jax.data prepare mnist --data_dir DIR`" in lines[-1]
    assert not workdir.exists()  # nothing left behind


def test_unknown_and_manual_datasets_are_named(tmp_path):
    unknown = r"'mnits' \(config.data.dataset\) is not a TFDS dataset; did you mean mnist"
    with pytest.raises(data.UserError, match=unknown):
        data.builder("mnits", str(tmp_path))
    with pytest.raises(data.UserError, match="needs a manual download"):
        data.check_downloadable(data.builder("imagenet2012", str(tmp_path)))


def test_a_failed_setup_removes_only_the_workdir_it_created(tmp_path):
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = str(tmp_path / "fresh_tfds")
    config.eval.update(every=2, inception_path=str(tmp_path / "no_such_network.pt"))
    write_idx_files(tmp_path / "unused")  # the dataset check passes only once prepared:
    tfds_dir = tmp_path / "fresh_tfds"
    with pytest.raises(ValueError, match="no_such_network.pt"):
        with pytest.MonkeyPatch.context() as m:  # prepared from local files, as above
            m.setattr(tfds_mnist, "_TRAIN_EXAMPLES", 40)
            m.setattr(tfds_mnist, "_TEST_EXAMPLES", 12)
            m.setattr(data, "reachable", lambda *a, **k: True)
            m.setattr(
                tfds.download.DownloadManager,
                "download_and_extract",
                lambda self, urls: {k: tmp_path / "unused" / MNIST_FILES[k] for k in urls},
            )
            training.train_and_evaluate(config, tmp_path / "new_workdir")
    assert tfds.builder("mnist", data_dir=str(tfds_dir)).is_prepared()
    assert not (tmp_path / "new_workdir").exists()
    kept = tmp_path / "old_workdir"
    (kept / "notes").mkdir(parents=True)
    (kept / "notes" / "run.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no_such_network.pt"):
        training.train_and_evaluate(config, kept)
    assert (kept / "notes" / "run.txt").read_text() == "keep me"
