"""The training stream read in a child process, so that importing TensorFlow and building
the tf.data pipeline (seconds at every launch) run beside the parent's restore and compile
instead of before them; the parent never imports TensorFlow for training data.

    worker = DataWorker()         # first thing at launch: the child imports TensorFlow
    ...                           # (the parent imports JAX and parses its flags meanwhile)
    worker.start(config, batch_size, seed, process_index, process_count, prepare=True)
    ...                           # restore, compile
    worker.wait_ready()           # the dataset is prepared and its splits read, or a UserError
    batches = worker.batches(start_example)   # input_pipeline.train_iterator's batches

The child (`python -m ddpm_jax.data_worker`) runs input_pipeline.train_iterator, so the
batches are exactly those of the in-process iterator. It is in a session of its own (a
terminal's Ctrl-C reaches the parent only, which saves and then closes it), sees no GPU,
and ends when the parent closes the pipes or dies. Its errors reach the parent: a
UserError as the same one-line UserError, anything else with the child's traceback.
"""

import os
import pickle
import struct
import subprocess
import sys
import traceback

from ddpm_jax.errors import UserError

HEADER = struct.Struct("<cQ")  # kind, payload length
READY, BATCH, ERROR = b"R", b"B", b"E"


class DataWorker:
    """The parent's end: starts the child at once; `batches(start)` iterates its stream."""

    def __init__(self):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # TensorFlow: no GPU memory taken
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddpm_jax.data_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        self.ready = self.started = False

    def start(
        self, config, batch_size, seed, process_index=0, process_count=1, prepare=False,
        other_splits=(),
    ):  # fmt: skip
        """Give the child its job (it imports TensorFlow meanwhile). prepare: the dataset is
        prepared first if it is not; other_splits: splits to check besides the training
        split (e.g. the periodic evaluation's)."""
        job = dict(
            config=config, batch_size=batch_size, seed=seed, process_index=process_index,
            process_count=process_count, prepare=prepare, other_splits=tuple(other_splits),
        )  # fmt: skip
        self._send(job)
        self.started = True

    def _send(self, value):
        """value to the child; if it has ended (its error already written), that error."""
        try:
            self.proc.stdin.write(pickle.dumps(value))
            self.proc.stdin.flush()
        except BrokenPipeError:
            while True:  # its messages up to its ERROR, or a RuntimeError at their end
                self._receive()

    def _receive(self):
        """(kind, payload) of the child's next message; an ERROR is raised here."""
        header = self.proc.stdout.read(HEADER.size)
        if len(header) < HEADER.size:
            code = self.proc.wait()
            raise RuntimeError(f"the training data's reader (a child process) ended, exit {code}")
        kind, size = HEADER.unpack(header)
        payload = pickle.loads(self.proc.stdout.read(size))
        if kind == ERROR:
            user_error, text = payload
            raise UserError(text) if user_error else RuntimeError(f"reading data: {text}")
        return kind, payload

    def wait_ready(self):
        """Once the dataset is prepared and its split opens (or its UserError)."""
        if not self.ready:
            kind, _ = self._receive()
            assert kind == READY, kind
            self.ready = True

    def batches(self, start_example):
        """The stream from example `start_example` of this process's shard, batched (the
        child reads it as soon as it is READY; its errors are raised when the stream is
        read, or by wait_ready)."""
        self._send(start_example)
        return self._stream()

    def _stream(self):
        self.wait_ready()
        while True:
            yield self._receive()[1]

    def close(self):
        """Stop the child (it holds nothing that needs saving)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # the child is gone: a broken pipe
                pass


def _write(out, kind, value):
    payload = pickle.dumps(value, protocol=5)
    out.write(HEADER.pack(kind, len(payload)) + payload)
    out.flush()


def serve(stdin, out):
    """The child's work: import TensorFlow, read the job, prepare and check the dataset,
    say READY, read the start example, then write batches until the parent closes the pipe."""
    from absl import logging

    from ddpm_jax import data, input_pipeline

    job = pickle.load(stdin)
    config = job["config"]
    if job["prepare"]:
        data.ensure_prepared(config, log=logging.warning)
    for split in (config.data.train_split, *job["other_splits"]):
        input_pipeline.check_dataset(config, split)
    _write(out, READY, None)
    start_example = pickle.load(stdin)
    for batch in input_pipeline.train_iterator(
        config, job["batch_size"], job["seed"], start_example=start_example,
        process_index=job["process_index"], process_count=job["process_count"],
    ):  # fmt: skip
        _write(out, BATCH, batch)


def main():
    """Messages go to a private copy of stdout; anything a library prints goes to stderr."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stdin = sys.stdin.buffer
    try:
        serve(stdin, out)
    except (BrokenPipeError, EOFError):  # the parent closed its end or died: done
        pass
    except BaseException as e:
        message = str(e) if isinstance(e, UserError) else traceback.format_exc()
        try:
            _write(out, ERROR, (isinstance(e, UserError), message))
        except BrokenPipeError:
            pass


if __name__ == "__main__":
    main()
