"""Paths on any filesystem: a local path, or a bucket (gs://BUCKET/...), through etils.epath.

Every file this project reads or writes outside a dataset goes through here or through
epath directly (orbax speaks epath too, and TensorStore reaches buckets itself), so a
workdir, an output path or a cache directory may be either. Local paths are expanded
(~) and made absolute; bucket URLs are taken as they are.
"""

import io
import os

import numpy as np
from etils import epath


def is_local(path):
    return "://" not in str(path)


def as_path(path):
    """epath.Path of `path`: local ones expanded and absolute, URLs untouched."""
    path = epath.Path(path)
    return path.expanduser().resolve() if is_local(path) else path


def write_bytes(path, data):
    """Write the file whole: a reader never sees it partial (locally a temporary file is
    renamed over it; an object in a bucket appears whole when its upload ends)."""
    path = as_path(path)
    if not is_local(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def move(src, dst):
    """Move a directory. In a bucket, where directories are only names, every file is
    copied first and the originals are removed after: nothing is lost if it is cut short."""
    src, dst = as_path(src), as_path(dst)
    if is_local(src):
        src.rename(dst)
        return
    files = list(_files(src))
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.copy(target)
    for f in files:
        f.unlink()


def _files(directory):
    """Every file under directory (bucket clients refuse `**` globs)."""
    for p in directory.iterdir():
        if p.is_dir():
            yield from _files(p)
        else:
            yield p


def save_npz(path, compress=False, **arrays):
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path):
    """{name: array} of an .npz file."""
    with np.load(io.BytesIO(as_path(path).read_bytes())) as data:
        return dict(data)


def png_bytes(image):
    """A uint8 HWC (C = 1 or 3) array, or a PIL image, encoded as PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def save_png(path, image):
    write_bytes(path, png_bytes(image))
