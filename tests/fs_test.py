"""Paths on any filesystem (the bucket side is in bucket_test.py): local paths expanded,
URLs untouched, whole-file writes, npz and PNG round trips, moving a directory."""

import numpy as np
from PIL import Image

from ddpm_jax import fs


def test_local_paths_are_absolute_and_urls_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert str(fs.as_path("~/run")) == str(tmp_path / "run")
    assert str(fs.as_path("rel/run")) == str(tmp_path / "rel" / "run")
    assert str(fs.as_path("gs://bucket/a/../run")) == "gs://bucket/a/../run"
    assert fs.is_local(tmp_path) and not fs.is_local("gs://bucket/run")


def test_write_bytes_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    fs.write_bytes(path, b"old")
    fs.write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_npz_and_png_round_trip(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    fs.save_npz(tmp_path / "a.npz", compress=True, images=images, n=np.int64(2))
    loaded = fs.load_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded["images"], images)
    assert int(loaded["n"]) == 2
    fs.save_png(tmp_path / "g.png", images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), images[0, ..., 0])


def test_move_keeps_every_file(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x").write_text("1")
    (tmp_path / "b").mkdir()
    fs.move(tmp_path / "a", tmp_path / "b" / "a")
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b" / "a" / "sub" / "x").read_text() == "1"
