"""TensorBoard event files without TensorFlow: TensorFlow's own reader (which checks every
record's CRC) reads back what was written; files rotate; a flush rewrites one file whole."""

import struct

import numpy as np
import tensorflow as tf

from ddpm_jax import events


def read(path):
    return list(tf.compat.v1.train.summary_iterator(str(path)))


def test_masked_crc_is_the_tfrecord_one():
    # CRC-32C("123456789") = 0xE3069283 (the standard check value), then masked.
    crc = 0xE3069283
    assert events.masked_crc(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    record = events.record(b"abc")
    assert struct.unpack("<Q", record[:8])[0] == 3 and record[12:15] == b"abc"
    assert len(record) == 8 + 4 + 3 + 4


def test_scalars_and_images_read_back_by_tensorflow(tmp_path):
    writer = events.EventWriter(tmp_path / "tb", flush_s=3600)
    writer.scalar(5, "loss", 0.25)
    assert not (tmp_path / "tb").exists()  # not yet flushed
    grid = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6, 1)
    writer.image(7, "samples", grid)  # images are written at once
    writer.scalar(9, "loss", 0.125)
    writer.close()
    [path] = (tmp_path / "tb").glob("events.out.tfevents.*")
    first, *rest = read(path)
    assert first.file_version == "brain.Event:2"
    assert [(e.step, e.summary.value[0].tag) for e in rest] == [
        (5, "loss"), (7, "samples"), (9, "loss")
    ]  # fmt: skip
    assert [rest[0].summary.value[0].simple_value, rest[2].summary.value[0].simple_value] == [
        0.25, 0.125
    ]  # fmt: skip
    image = rest[1].summary.value[0].image
    decoded = tf.io.decode_png(image.encoded_image_string).numpy()
    assert (image.height, image.width, image.colorspace) == (4, 6, 1)
    np.testing.assert_array_equal(decoded, grid)


def test_files_rotate_and_each_holds_whole_records(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "ROTATE_BYTES", 200)
    writer = events.EventWriter(tmp_path, flush_s=0)
    for step in range(20):
        writer.scalar(step, "x", step)
    writer.close()
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) > 2 and all(f.stat().st_size <= 200 + 100 for f in files)
    steps = [e.step for f in files for e in read(f) if e.summary.value]
    assert steps == list(range(20))  # in order across files sorted by name
