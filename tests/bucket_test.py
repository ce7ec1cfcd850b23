"""A gs:// workdir end to end, against a fake bucket: train.py, its resume, sample.py and
evaluate.py with `--workdir gs://bucket/run` write into the bucket, and nothing under ./gs:;
sample.py launched again compiles nothing (the persistent compilation cache).

The bucket is a local GCS emulator (gcp-storage-emulator, on 127.0.0.1) that keeps its
objects as files under a directory, so the test can look at them. Every client is pointed
at it by its own setting: gcsfs (epath's gs:// backend once EPATH_USE_TF=false) and
google-cloud-storage (orbax's step listing) by STORAGE_EMULATOR_HOST, TensorStore (orbax's
arrays) by TENSORSTORE_GCS_HTTP_URL with a fixed test token. The code under test is not
patched: it sees gs:// paths only. The emulator is given one thing real GCS does: a
download's `x-goog-generation` header, which TensorStore reads. (The resumed state is the
one saved: restoring checks every array against the checksums recorded when it was saved.)
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from convert_test import tiny_tf_checkpoint
from etils.epath import gpath
from train_test import ROOT, train_command
from training_test import tiny_config

from ddpm_jax import checkpointing, convert, fs, workdir
from ddpm_jax.errors import UserError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_generation_header(download):
    """The emulator's download handler, also sending the object's generation as GCS does."""

    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the handler has answered 404
            return
        response["x-goog-generation"] = obj["generation"]

    return handler


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(environment for the entry points, the local directory holding gs://bucket)."""
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    plain = objects.download
    objects.download = with_generation_header(plain)  # objects.get(alt=media) calls it
    for _, methods in emulator.HANDLERS:
        for method, handler in methods.items():
            if handler is plain:
                methods[method] = objects.download
    create_server = emulator.create_server
    data_dir, port = tmp_path_factory.mktemp("gcs"), free_port()
    server = create_server("127.0.0.1", port, default_bucket="bucket", data_dir=str(data_dir))
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
        GOOGLE_CLOUD_PROJECT="test",
        EPATH_USE_TF="false",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",  # as train_test's runs
    )
    yield env, data_dir / ".cloudstorage" / "bucket"
    server.stop()
    objects.download = plain


def committed(run_dir):
    """The steps the bucket holds committed (the emulator leaves emptied folders behind)."""
    return sorted(
        int(p.name)
        for p in (run_dir / "checkpoints").iterdir()
        if (p / "commit_success.txt").is_file()
    )


def run(tool, env, cwd, *args):
    """An entry point run from `cwd` (where a wrongly local gs: folder would appear)."""
    if tool == "train":
        cmd, base = train_command(*args)
    else:
        cmd, base = [sys.executable, str(ROOT / f"{tool}.py"), *args], dict(os.environ)
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=dict(base, **env), cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_gs_workdir_trains_resumes_samples_and_evaluates_in_the_bucket(
    bucket, tmp_path, monkeypatch
):
    env, stored = bucket
    work = "gs://bucket/run"
    run("train", env, tmp_path, work, "--config.training.num_steps=4")
    assert committed(stored / "run") == [3, 4]
    resumed = run("train", env, tmp_path, work, "--config.training.num_steps=6")
    assert "resumed from step 4" in resumed.stderr
    config = ["--config", "tiny", "--workdir", work]
    sample = [*config, "--num_samples=4", "--out", f"{work}/out/s"]
    cache, entries = tmp_path / "cache", []  # a fresh compilation cache for sample.py
    for _ in range(2):
        run("sample", env, tmp_path, *sample, f"--compilation_cache={cache}")
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert len(entries[0]) >= 2 and entries[1] == entries[0]  # the relaunch compiled nothing
    data = f"--config.data.data_dir={tiny_config().data.data_dir}"
    run("evaluate", env, tmp_path, *config, "--eval=nll", "--max_batches=1", data)

    run_dir = stored / "run"
    assert committed(run_dir) == [4, 6]  # keep_checkpoints=2: step 3 deleted
    assert not [p for p in (run_dir / "checkpoints" / "3").rglob("*") if p.is_file()]
    assert (run_dir / "samples" / "step_00000006.png").is_file()
    assert fs.load_npz(run_dir / "out" / "s.npz")["images"].shape == (4, 8, 8, 1)
    assert (run_dir / "out" / "s.png").is_file()
    assert json.loads((run_dir / "eval" / "step_6.json").read_text())["step"] == 6
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3
    assert not (run_dir / "train.lock").exists()  # released at the end
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


@pytest.fixture
def in_the_bucket(bucket, monkeypatch):
    """This process's gs:// paths go to the fake bucket (through gcsfs) while the test runs."""
    env, stored = bucket
    for name, value in env.items():
        if name != "XLA_FLAGS":
            monkeypatch.setenv(name, value)
    gpath._is_tf_installed.cache_clear()  # epath decides once per process whether to use TF
    yield stored
    gpath._is_tf_installed.cache_clear()  # and decides again once the settings are undone


def test_lock_steps_and_moving_a_step_in_the_bucket(in_the_bucket):
    stored = in_the_bucket
    run = fs.as_path("gs://bucket/parts")
    lock = workdir.Lock(run).acquire()
    with pytest.raises(
        UserError, match=f"^workdir 'gs://bucket/parts' is being trained by pid {os.getpid()}"
    ):
        workdir.Lock(run).acquire()
    lock.release()
    assert not (stored / "parts" / "train.lock").exists()

    for name in ("7/commit_success.txt", "7/default/d/a", "5/default/d/a"):  # 5: unfinished
        (run / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / name).write_text(name)
    assert checkpointing.steps(run) == [7]
    fs.move(run / "checkpoints" / "7", run / "damaged_checkpoints" / "7")
    moved = stored / "parts" / "damaged_checkpoints" / "7"
    assert (moved / "default" / "d" / "a").read_text() == "7/default/d/a"
    assert (moved / "commit_success.txt").is_file() and checkpointing.steps(run) == []


def test_converted_params_are_written_to_and_read_from_the_bucket(
    in_the_bucket, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where a wrongly local gs: folder would appear
    ckpt, params = tiny_tf_checkpoint(tmp_path)
    args = ["--checkpoint", ckpt, "--config", "tiny", "--out", "gs://bucket/converted"]
    convert.main(args)
    assert (in_the_bucket / "converted" / "_CHECKPOINT_METADATA").is_file()
    restored = checkpointing.restore_converted("gs://bucket/converted")
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(SystemExit):  # never overwrite what the bucket holds
        convert.main(args)
    assert not (tmp_path / "gs:").exists()
