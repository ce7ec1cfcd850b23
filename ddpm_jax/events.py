"""TensorBoard event files, written through epath so that a workdir on any filesystem
(gs:// included) gets its logs; TensorFlow is not needed.

An event file is a TFRecord file of `Event` protos, the first of which names the format
("brain.Event:2"). A record is: the data's length as a little-endian uint64, the masked
CRC-32C of those 8 bytes, the data, the masked CRC-32C of the data, where
masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32).

An object in a bucket cannot be appended to, so a writer keeps the records of its current
file and writes that file whole when it flushes (at most every `flush_s` seconds, and on
images and close); past ROTATE_BYTES it starts a new file, so a flush never rewrites much.
TensorBoard reads every `*tfevents*` file of the directory, in the order of their names.
"""

import itertools
import os
import socket
import struct
import time

import google_crc32c
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2

from ddpm_jax import fs

ROTATE_BYTES = 1 << 20
_files = itertools.count()  # distinct names for files opened in the same second


def masked_crc(data):
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data):
    """One TFRecord of `data` (bytes)."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", masked_crc(length)), data, struct.pack("<I", masked_crc(data)))
    )


class EventWriter:
    """`scalar`, `image`, `flush`, `close` as tf.summary's file writer has them."""

    def __init__(self, logdir, flush_s=10.0):
        self.logdir, self.flush_s = fs.as_path(logdir), flush_s
        self.path, self.data, self.unwritten, self.last_flush = None, b"", False, time.time()

    def _append(self, event):
        if self.path is None or len(self.data) > ROTATE_BYTES:
            self.flush()
            host, n = socket.gethostname(), next(_files)
            name = f"events.out.tfevents.{int(time.time()):010d}.{host}.{os.getpid()}.{n:04d}"
            self.path, self.data = self.logdir / name, b""
            start = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self.data = record(start.SerializeToString())
        self.data += record(event.SerializeToString())
        self.unwritten = True
        if time.time() - self.last_flush >= self.flush_s:
            self.flush()

    def _summary(self, step, value):
        summary = summary_pb2.Summary(value=[value])
        self._append(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, step, tag, value):
        self._summary(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def image(self, step, tag, image):
        """A uint8 HWC image (C = 1 or 3), written at once."""
        image = np.asarray(image)
        encoded = summary_pb2.Summary.Image(
            height=image.shape[0],
            width=image.shape[1],
            colorspace=image.shape[2],
            encoded_image_string=fs.png_bytes(image),
        )
        self._summary(step, summary_pb2.Summary.Value(tag=tag, image=encoded))
        self.flush()

    def flush(self):
        if self.unwritten:
            self.logdir.mkdir(parents=True, exist_ok=True)
            fs.write_bytes(self.path, self.data)
            self.unwritten = False
        self.last_flush = time.time()

    def close(self):
        self.flush()
