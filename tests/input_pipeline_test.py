"""The input pipeline on real MNIST ($TFDS_DATA_DIR) and on mocked CIFAR10."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import mnist_data_dir

from ddpm_jax import config_lib, input_pipeline

ROOT = Path(__file__).resolve().parents[1]


def mnist_config(**data):
    config = config_lib.load_config(ROOT / "configs" / "mnist.py")
    config.data.data_dir = str(mnist_data_dir())
    config.data.update(data)
    return config


def take(iterator, n):
    return np.stack([next(iterator) for _ in range(n)])


def test_batches_shape_dtype_range_and_pixel_grid():
    batch = next(input_pipeline.train_iterator(mnist_config(), 16, seed=0))
    assert batch.shape == (16, 28, 28, 1) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() == 1.0
    pixels = (batch + 1) * 127.5  # x = k/127.5 - 1 for integer k
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)


def test_resize_stays_on_the_pixel_grid():
    batch = next(input_pipeline.train_iterator(mnist_config(image_size=8), 4, seed=0))
    assert batch.shape == (4, 8, 8, 1)
    pixels = (batch + 1) * 127.5
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)


def test_deterministic_for_a_seed_and_resumable_at_any_offset():
    config = mnist_config()
    a = take(input_pipeline.train_iterator(config, 8, seed=3), 4)
    b = take(input_pipeline.train_iterator(config, 8, seed=3), 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, take(input_pipeline.train_iterator(config, 8, seed=4), 4))
    resumed = take(input_pipeline.train_iterator(config, 8, seed=3, start_example=16), 2)
    np.testing.assert_array_equal(resumed, a[2:])


def test_epochs_wrap_and_reshuffle():
    """Past the end of the shard the stream continues with a new order of the same images."""
    config = mnist_config(train_split="test[:40]")
    stream = take(input_pipeline.train_iterator(config, 8, seed=0), 10).reshape(80, -1)
    first, second = stream[:40], stream[40:]
    key = lambda rows: sorted(hashlib.sha1(r.tobytes()).hexdigest() for r in rows)
    assert key(first) == key(second) and not np.array_equal(first, second)


def test_flips():
    plain = take(input_pipeline.train_iterator(mnist_config(), 32, seed=0), 1)[0]
    flipped = take(input_pipeline.train_iterator(mnist_config(random_flip=True), 32, seed=0), 1)[0]
    same = [np.array_equal(p, f) for p, f in zip(plain, flipped, strict=True)]
    mirrored = [np.array_equal(p[:, ::-1], f) for p, f in zip(plain, flipped, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 4 < sum(mirrored) < 28 and sum(same) > 4


def digest_split(config, process_index, process_count):
    """{index in the split: image digest} of one process's eval shard, and its size."""
    ds, num = input_pipeline.eval_dataset(config, 100, process_index, process_count)
    batches = list(ds.as_numpy_iterator())
    images = np.concatenate([b[0][b[1] > 0] for b in batches])
    index = np.concatenate([b[2][b[1] > 0] for b in batches])
    assert len(images) == num == len(set(index.tolist()))
    return {
        int(i): hashlib.sha1(x.tobytes()).hexdigest() for i, x in zip(index, images, strict=True)
    }, num


def test_process_shards_are_disjoint_and_complete():
    config = mnist_config(eval_split="test")
    shard0, n0 = digest_split(config, 0, 2)
    shard1, n1 = digest_split(config, 1, 2)
    whole, n = digest_split(config, 0, 1)
    assert n0 == n1 == n // 2 == 5000
    # Each example keeps its index in the whole split, whichever process reads it.
    assert not shard0.keys() & shard1.keys() and shard0 | shard1 == whole
    assert sorted(whole) == list(range(n))


def test_eval_padding_is_masked():
    config = mnist_config(eval_split="test[:30]")
    ds, num = input_pipeline.eval_dataset(config, 8)
    batches = list(ds.as_numpy_iterator())
    assert num == 30 and len(batches) == 4 and all(b[0].shape[0] == 8 for b in batches)
    assert sum(b[1].sum() for b in batches) == 30 and batches[-1][1].tolist() == [1] * 6 + [0] * 2


def test_mocked_cifar10_three_channels_and_resize():
    config = config_lib.load_config(ROOT / "configs" / "cifar.py")
    config.data.image_size = 16
    with tfds.testing.mock_data(num_examples=20):
        batch = next(input_pipeline.train_iterator(config, 8, seed=0))
    assert batch.shape == (8, 16, 16, 3) and -1 <= batch.min() < batch.max() <= 1


@pytest.mark.parametrize(
    "data, word",
    [
        (dict(dataset="cifar10"), "not prepared"),
        (dict(dataset="no_such_dataset"), "not a TFDS dataset"),
        (dict(train_split="validation"), "cannot give split"),
        (dict(dataset="folder:/no/such/dir"), "not a directory"),
    ],
)
def test_missing_data_fails_at_once_with_instructions(tmp_path, data, word):
    config = mnist_config(**data)
    if data.get("dataset") == "cifar10":
        config.data.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=word):
        input_pipeline.check_dataset(config, config.data.train_split)


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="num_channels"):
        next(input_pipeline.train_iterator(mnist_config(num_channels=3), 4, seed=0))


def test_users_own_image_folder(tmp_path):
    """folder:/path reads root/<split>/<label>/*.png through tfds.folder_dataset.ImageFolder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    config = config_lib.load_config(ROOT / "configs" / "cifar.py")
    config.data.update(dataset=f"folder:{tmp_path}", image_size=16, shuffle_buffer=10)
    input_pipeline.check_dataset(config, "train")
    batch = next(input_pipeline.train_iterator(config, 4, seed=0))
    assert batch.shape == (4, 16, 16, 3) and -1 <= batch.min() < batch.max() <= 1
    with pytest.raises(ValueError, match="cannot give split|no split"):
        input_pipeline.check_dataset(config, "test")
    config.data.eval_split = "train"  # two processes: equal, disjoint halves of the 6 images
    (a, n0), (b, n1) = digest_split(config, 0, 2), digest_split(config, 1, 2)
    whole, _ = digest_split(config, 0, 1)
    assert n0 == n1 == 3 and not a.keys() & b.keys() and a | b == whole and len(whole) == 6
