"""TFDS -> tf.data -> host NumPy batches of images in [-1, 1] (and their labels, for a
class-conditional model: config.model.num_classes > 0).

Each process reads its own disjoint part of the split (`tfds.even_splits`). The order is a
pure function of (seed, process, epoch): epoch e is the shard shuffled with seed
(seed, e), so resuming at any example offset replays exactly the same stream without
saving iterator state. Random flips are likewise keyed by (seed, epoch, position).
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax import data
from ddpm_jax.errors import UserError


def _builder(config):
    """The TFDS builder of config.data.dataset ('name[/config]' or 'folder:/path')."""
    name = config.data.dataset
    data.tensorflow_on_cpu_only()
    if name.startswith(data.FOLDER_PREFIX):
        root = name[len(data.FOLDER_PREFIX) :]
        if not os.path.isdir(root):
            raise UserError(f"config.data.dataset {name!r}: {root} is not a directory")
        return tfds.folder_dataset.ImageFolder(root)
    return data.builder(name, config.data.data_dir)


def _not_prepared_message(config, split):
    name, where = config.data.dataset, data.default_data_dir(config.data.data_dir)
    return (
        f"dataset {name!r} (split {split!r}) is not prepared in {where}: run "
        f"`{data.prepare_command(name, where)}` (train.py and evaluate.py do this "
        f"themselves), or pass --config.data.data_dir=DIR where it is prepared"
    )


def _process_shard(builder, split, process_index, process_count):
    """This process's equal, disjoint part of the split (TFDS subsplits where supported),
    and whether it is contiguous (a subsplit) rather than every process_count-th example.
    TFDS does not cache small datasets itself: a run shorter than an epoch would otherwise
    end with tf.data's warning about a cache not read to its end."""
    read = tfds.ReadConfig(try_autocache=False)
    if not isinstance(builder, tfds.folder_dataset.ImageFolder):
        subsplit = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
        return builder.as_dataset(split=subsplit, shuffle_files=False, read_config=read), True
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read)  # by index
    if split not in builder.info.splits:
        raise UserError(f"unknown split {split!r}; the folder has {list(builder.info.splits)}")
    per_process = builder.info.splits[split].num_examples // process_count
    return ds.shard(process_count, process_index).take(per_process), False


def conditional(config):
    """Whether the model takes class labels (config.model.num_classes > 0)."""
    return config.model.get("num_classes", 0) > 0


def _check_labels(config, builder):
    """A class model needs a label feature with at most config.model.num_classes classes."""
    features = builder.info.features
    feature = features["label"] if features and "label" in features.keys() else None
    name, want = config.data.dataset, config.model.num_classes
    if not isinstance(feature, tfds.features.ClassLabel):
        raise UserError(
            f"{name!r} has no class label feature, which config.model.num_classes={want} "
            "needs; use a labelled dataset (an image folder takes its subfolders as "
            "classes), or set --config.model.num_classes=0"
        )
    if feature.num_classes > want:
        raise UserError(
            f"{name!r} has {feature.num_classes} classes; set "
            f"--config.model.num_classes={feature.num_classes} (it is {want})"
        )


def _example(ex, with_labels):
    return (ex["image"], tf.cast(ex["label"], tf.int32)) if with_labels else ex["image"]


def image_of(example):
    """The image of a dataset element: itself, or the first of (image, label)."""
    return example[0] if isinstance(example, tuple) else example


def load_split(config, split, process_index=0, process_count=1, count=True, with_index=False):
    """(tf.data.Dataset of uint8 HWC images, or (image, int32 label) pairs for a class
    model, and its number of examples) for this process. with_index: elements are (index
    of the example in the whole split, example)."""
    builder = _builder(config)
    if conditional(config):
        _check_labels(config, builder)
    try:
        ds, contiguous = _process_shard(builder, split, process_index, process_count)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        raise UserError(_not_prepared_message(config, split)) from e
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(
                f"config.data: {config.data.dataset!r} cannot give split {split!r}: {e}"
            ) from e
        raise UserError(f"{_not_prepared_message(config, split)} ({e})") from e
    with_labels = conditional(config)
    ds = ds.map(lambda ex: _example(ex, with_labels), num_parallel_calls=tf.data.AUTOTUNE)
    channels = image_of(ds.element_spec).shape[-1]
    if channels is not None and channels != config.data.num_channels:
        raise UserError(
            f"{config.data.dataset!r} images have {channels} channels; set "
            f"--config.data.num_channels={channels}"
        )
    if not count:
        return ds, None
    num = int(ds.cardinality())
    if num < 0:  # unknown (e.g. mocked data without metadata): count once
        num = int(ds.reduce(0, lambda n, _: n + 1))
    if num < 1:
        raise UserError(
            f"split {split!r} of {config.data.dataset!r} is empty for process {process_index}"
        )
    if with_index:  # equal shards: contiguous blocks, or every process_count-th example
        start, stride = (process_index * num, 1) if contiguous else (process_index, process_count)
        ds = ds.enumerate().map(lambda i, example: (start + stride * i, example))
    return ds, num


def check_dataset(config, split):
    """Fail now, with instructions, if the dataset or split cannot be read."""
    load_split(config, split, count=False)


def preprocess(image, image_size, num_channels, pad=False):
    """uint8 HWC -> float32 [-1, 1] (x = k/127.5 - 1), center-cropped square and resized;
    with `pad` (config.data.pad) a smaller image is centred on black instead (MNIST's 28
    to 32)."""
    if image.shape[-1] is not None and image.shape[-1] != num_channels:
        raise ValueError(
            f"images have {image.shape[-1]} channels; config.data.num_channels={num_channels}"
        )
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    image = tf.cast(image, tf.float32)
    if pad:  # black borders up to image_size (a larger image is resized as without pad)
        offset, canvas = tf.maximum((image_size - side) // 2, 0), tf.maximum(image_size, side)
        image = tf.image.pad_to_bounding_box(image, offset, offset, canvas, canvas)
    if image.shape[0] != image_size:
        image = tf.image.resize(image, (image_size, image_size), method="area", antialias=True)
        image = tf.round(tf.clip_by_value(image, 0.0, 255.0))  # stay on the 256-level grid
    image = tf.ensure_shape(image, (image_size, image_size, num_channels))
    return image / 127.5 - 1.0


def _epoch(ds, num, epoch, seed, buffer_size):
    """One pass over the shard in the order of (seed, epoch): elements (epoch, index, example)."""
    epoch_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
    ds = ds.enumerate().shuffle(
        min(buffer_size, num), seed=epoch_seed, reshuffle_each_iteration=False
    )
    return ds.map(lambda i, example: (epoch_seed, i, example))


def _flip(epoch_seed, index, image):
    """Horizontal flip with probability 1/2, keyed by (seed, epoch, position in the shard)."""
    key = tf.stack([epoch_seed, index])
    flip = tf.random.stateless_uniform([], seed=key) < 0.5
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def train_dataset(config, batch_size, seed, start_example=0, process_index=0, process_count=1):
    """Endless batches (B, H, W, C) float32 in [-1, 1] of this process's shard of the
    training split, starting at `start_example` of the deterministic stream; for a class
    model (images, int32 labels (B,))."""
    ds, num = load_split(config, config.data.train_split, process_index, process_count)
    start_epoch, offset = divmod(int(start_example), num)
    seed = seed * 7919 + process_index  # each process shuffles its own shard differently
    epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
    ds = epochs.flat_map(lambda e: _epoch(ds, num, e, seed, config.data.shuffle_buffer))

    d = config.data

    def prepare(epoch_seed, index, example):
        image = image_of(example)
        if config.data.random_flip:
            image = _flip(epoch_seed, index, image)
        image = preprocess(image, d.image_size, d.num_channels, d.get("pad", False))
        return (image, example[1]) if isinstance(example, tuple) else image

    ds = ds.skip(offset).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)


def train_iterator(config, batch_size, seed, start_example=0, process_index=0, process_count=1):
    """train_dataset as an iterator of host NumPy arrays."""
    ds = train_dataset(config, batch_size, seed, start_example, process_index, process_count)
    return ds.as_numpy_iterator()


def eval_dataset(config, batch_size, process_index=0, process_count=1, split=None):
    """One ordered pass over this process's shard of `split` (default config.data.eval_split),
    no flips, as batches (images, mask, index in the split), and for a class model their
    labels as a fourth entry. The last batch is padded with copies of the first example,
    the 0/1 mask marking real ones."""
    split = config.data.eval_split if split is None else split
    ds, num = load_split(config, split, process_index, process_count, with_index=True)
    size, channels = config.data.image_size, config.data.num_channels

    def prepare(i, example):
        image = preprocess(image_of(example), size, channels, config.data.get("pad", False))
        label = (example[1],) if isinstance(example, tuple) else ()
        return (image, tf.constant(1.0), i, *label)

    ds = ds.map(prepare)
    pad = (-num) % batch_size
    if pad:
        unmask = lambda image, _, *rest: (image, tf.constant(0.0), *rest)  # noqa: E731
        ds = ds.concatenate(ds.take(1).map(unmask).repeat(pad))
    return ds.batch(batch_size).prefetch(2), num
