"""Read a PyTorch state dict (`torch.save`'s zip format, a `.bin` file) without torch and
without running code from the file.

A `.bin` file is a zip archive: `ARCHIVE/data.pkl` is a pickle whose tensors refer to raw
storages `ARCHIVE/data/KEY` by persistent id ('storage', StorageClass, KEY, location,
numel). A pickle may name any global and call it; this reader allows only the few a state
dict needs (an ordered dict, the tensor rebuild function, the storage classes), each
replaced by a stand-in that builds NumPy arrays, and refuses any other with a UserError
naming it. Tensors come back as float32 (or the integer dtype) NumPy arrays.
"""

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

from ddpm_jax.errors import UserError

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A stand-in for a torch storage class: only its dtype is used."""

    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2 on a NumPy storage: a strided view, copied."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], tuple(size), tuple(s * item for s in stride)
    )
    array = np.array(view)
    wider = array.dtype in (np.float16, np.float64, np.dtype(ml_dtypes.bfloat16))
    return array.astype(np.float32) if wider else array


def _rebuild_parameter(data, *unused):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """read_storage(key, dtype, numel) -> the storage's bytes."""

    def __init__(self, file, read_storage, where):
        super().__init__(file)
        self.read_storage, self.where = read_storage, where

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise UserError(
                f"{self.where}: refused to load: its pickle names {module}.{name}, which a "
                "state dict of tensors does not need (the file may run code); convert it to "
                "safetensors with a trusted torch, or use the repository's .safetensors"
            )
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        # ('storage', type, key, location, numel), and a view's metadata (None) in the
        # legacy format
        legacy_view = len(pid) == 6 and pid[5] is None if isinstance(pid, tuple) else False
        if not (isinstance(pid, tuple) and pid[0] == "storage" and (len(pid) == 5 or legacy_view)):
            raise UserError(f"{self.where}: unknown persistent id {pid!r:.80} in the pickle")
        _, storage, key, _, numel = pid[:5]
        if not isinstance(storage, _Storage):
            raise UserError(f"{self.where}: storage of an unknown type in the pickle")
        data = self.read_storage(str(key), storage.dtype, int(numel))
        return np.frombuffer(data, storage.dtype, count=int(numel))


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch < 1.6's format


def _load_legacy(path) -> object:
    """The object of a file in torch's legacy format: pickles of the magic number, the
    protocol version and system information, the object (its storages by key), the sorted
    storage keys, then each storage as an int64 element count and its bytes. The object
    is read twice: first to learn each storage's dtype, then with the storages."""
    with open(path, "rb") as f:
        header = [_Unpickler(f, None, path).load() for _ in range(3)]
        if header[0] != LEGACY_MAGIC or header[1] != 1001 or not isinstance(header[2], dict):
            raise UserError(f"{path}: neither a zip-format nor a legacy torch file")
        start, dtypes = f.tell(), {}

        def note(key, dtype, numel):
            dtypes[key] = dtype
            return bytes(numel * dtype.itemsize)

        _Unpickler(f, note, path).load()
        keys, storages = _Unpickler(f, None, path).load(), {}
        for key in keys:
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            storages[key] = f.read(numel * dtypes[key].itemsize)
        f.seek(start)
        return _Unpickler(f, lambda key, *_: storages[key], path).load()


def load(path) -> dict[str, np.ndarray]:
    """{name: array} of a torch.save'd state dict at `path` (zip format, or the legacy
    format of torch < 1.6, as torchvision's VGG16 and LPIPS's weights are)."""
    path = str(path)
    if not zipfile.is_zipfile(path):
        return _checked(_load_legacy(path), path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UserError(f"{path}: expected one ARCHIVE/data.pkl in the zip, got {pickles}")
        prefix = pickles[0].removesuffix("data.pkl")
        order = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        if order.strip() != b"little":
            raise UserError(f"{path}: big-endian tensors are not supported")
        read = lambda key, *_: archive.read(f"{prefix}data/{key}")  # noqa: E731
        state = _Unpickler(io.BytesIO(archive.read(pickles[0])), read, path).load()
    return _checked(state, path)


def _checked(state, path) -> dict[str, np.ndarray]:
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return dict(state)
