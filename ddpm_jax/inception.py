"""The FID Inception-v3 (TF `inception-2015-12-05` graph) in JAX: 2048-d pool3 features.

Weights come from the TorchScript copy of the network (see ../shared/fid/README.md), read
with the standard library and NumPy only. Every conv layer is
relu((conv(x, W) - mean) / sqrt(var + 1e-3) + beta): no conv bias, no BN scale.

Input convention (exact, as the TF graph): RGB pixels p in 0..255, resized to 299x299 with
TF1's legacy bilinear resize (no half-pixel centres), then x = (p - 128) / 128.
"""

import collections
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

NUM_TENSORS, NUM_VALUES = 376, 21_802_784
_STORAGE_DTYPES = {"FloatStorage": np.float32}


class _Module:
    """Stand-in for a pickled TorchScript module: keeps its state dict."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state


def _unpickler(zf, root):
    def persistent_load(pid):  # ('storage', type, key, location, numel)
        _, storage_type, key, _, numel = pid
        dtype = _STORAGE_DTYPES[
            storage_type if isinstance(storage_type, str) else storage_type.__name__
        ]
        return np.frombuffer(zf.read(f"{root}/data/{key}"), dtype=dtype, count=numel)

    def rebuild_tensor(storage, offset, size, stride, *_):
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=[s * itemsize for s in stride]
        )
        return view.copy()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild_tensor
            if (module, name) == ("torch._utils", "_rebuild_parameter"):
                return lambda data, *_: data
            if module == "torch" and name.endswith("Storage"):
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module.startswith("__torch__"):
                return type(name, (_Module,), {})
            if module == "torch.jit._pickle" and name.startswith("build_"):
                return lambda x: x  # int / float / bool lists of module attributes
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the network file")

    unpickler = Unpickler(zf.open(f"{root}/data.pkl"))
    unpickler.persistent_load = persistent_load
    return unpickler


def load_params(path):
    """{'mixed_4.tower.conv_1': {'kernel' (HWIO), 'beta', 'mean', 'var'}, ...} from the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            root = zf.namelist()[0].split("/")[0]
            top = _unpickler(zf, root).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError) as e:
        raise ValueError(f"{path} is not the TorchScript FID Inception network: {e}") from e
    flat = {}

    def walk(obj, prefix):
        for key, value in (obj.state if isinstance(obj, _Module) else {}).items():
            if isinstance(value, np.ndarray):
                flat[prefix + key] = value
            elif isinstance(value, _Module):
                walk(value, prefix + key + ".")

    walk(top, "")
    return params_from_tensors(flat, path)


def _short_name(name):
    """'net.layers.mixed_4.tower.conv_1.weight' -> 'mixed_4.tower.conv_1.weight'."""
    return name.removeprefix("net.").removeprefix("layers.")


def params_from_tensors(flat, path="the network file"):
    """Checks the tensor names and counts, and transposes conv kernels OIHW -> HWIO. The
    1008-way classifier ('output.weight' (1008, 2048) and 'output.bias'), present in files
    that keep it, becomes params['output'] = {'kernel' (2048, 1008)}."""
    flat = {_short_name(k): v for k, v in flat.items()}
    classifier = {k: flat.pop(k) for k in ("output.weight", "output.bias") if k in flat}
    count, values = len(flat), sum(a.size for a in flat.values())
    if count != NUM_TENSORS or values != NUM_VALUES:
        raise ValueError(
            f"{path} holds {count} tensors / {values} values besides the classifier; the FID "
            f"Inception network has {NUM_TENSORS} / {NUM_VALUES}"
        )
    params = collections.defaultdict(dict)
    for name, value in flat.items():
        layer, leaf = name.rsplit(".", 1)
        if leaf not in ("weight", "beta", "mean", "var"):
            raise ValueError(f"{path}: unexpected tensor {name!r} in the FID Inception network")
        params[layer]["kernel" if leaf == "weight" else leaf] = (
            np.transpose(value, (2, 3, 1, 0)) if leaf == "weight" else value
        )
    if classifier:
        if classifier.get("output.weight", np.zeros(0)).shape != (1008, 2048):
            raise ValueError(
                f"{path}: the classifier must be 'output.weight' of shape (1008, 2048)"
            )
        params["output"] = {"kernel": classifier["output.weight"].T}  # the bias is unused
    return dict(params)


def has_classifier(params):
    return "output" in params


def class_probabilities(params, pool3):
    """p(y|x) over the 1008 outputs, softmax(pool3 · W) without the bias, as the original
    Inception Score code (and NVIDIA's) computes it."""
    if not has_classifier(params):
        raise ValueError(
            "the Inception Score needs the network's 1008-way classifier, which this network "
            "file lacks (../shared/fid's copy is features only); pass --inception_path to a "
            "copy that keeps it, e.g. NVIDIA's metrics file inception-2015-12-05.pt"
        )
    return jax.nn.softmax(pool3 @ params["output"]["kernel"], axis=-1)


# ---- The network ------------------------------------------------------------------------

_STRIDE_2 = {
    "conv",
    "mixed_3.conv",
    "mixed_3.tower.conv_2",
    "mixed_8.tower.conv_1",
    "mixed_8.tower_1.conv_3",
}
_VALID = {"conv", "conv_1", "conv_3", "conv_4"}  # stem convs without padding


def conv_settings(name, kernel_shape):
    """(stride, ((pad_h, pad_h), (pad_w, pad_w))): stride-2 and stem convs are unpadded,
    every other conv keeps the spatial size (symmetric k // 2 padding)."""
    stride = 2 if name in _STRIDE_2 else 1
    if stride == 2 or name in _VALID:
        return stride, ((0, 0), (0, 0))
    kh, kw = kernel_shape[:2]
    return 1, ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _conv(params, name, x):
    p = params[name]
    stride, padding = conv_settings(name, p["kernel"].shape)
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return jax.nn.relu((y - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-3) + p["beta"])


def _max_pool(x, stride=2, pad=0):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding
    )


def _avg_pool_same(x):
    """3x3 stride-1 average over the valid (unpadded) neighbours only (count_include_pad=False)."""
    window = lambda a: jax.lax.reduce_window(
        a, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"
    )
    return window(x) / window(jnp.ones_like(x[..., :1]))


def _block_a(params, n, x):
    c = lambda name, h: _conv(params, f"{n}.{name}", h)
    return [c("conv", x), c("tower.conv_1", c("tower.conv", x)),
            c("tower_1.conv_2", c("tower_1.conv_1", c("tower_1.conv", x))),
            c("tower_2.conv", _avg_pool_same(x))]  # fmt: skip


def _block_b(params, n, x):
    c = lambda name, h: _conv(params, f"{n}.{name}", h)
    return [c("conv", x), c("tower.conv_2", c("tower.conv_1", c("tower.conv", x))), _max_pool(x)]


def _block_c(params, n, x):
    c = lambda name, h: _conv(params, f"{n}.{name}", h)
    t1 = x
    for i in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
        t1 = c(f"tower_1.{i}", t1)
    return [c("conv", x), c("tower.conv_2", c("tower.conv_1", c("tower.conv", x))), t1,
            c("tower_2.conv", _avg_pool_same(x))]  # fmt: skip


def _block_d(params, n, x):
    c = lambda name, h: _conv(params, f"{n}.{name}", h)
    t1 = x
    for i in ("conv", "conv_1", "conv_2", "conv_3"):
        t1 = c(f"tower_1.{i}", t1)
    return [c("tower.conv_1", c("tower.conv", x)), t1, _max_pool(x)]


def _block_e(params, n, x, max_pool):
    c = lambda name, h: _conv(params, f"{n}.{name}", h)
    a, b = c("tower_conv", x), c("tower_1_conv_1", c("tower_1_conv", x))
    pooled = _max_pool(x, stride=1, pad=1) if max_pool else _avg_pool_same(x)
    return [c("conv", x), c("tower_mixed_conv", a), c("tower_mixed_conv_1", a),
            c("tower_1_mixed_conv", b), c("tower_1_mixed_conv_1", b),
            c("tower_2_conv", pooled)]  # fmt: skip


def features(params, x):
    """pool3 features (B, 2048) of NHWC float images x = (p - 128) / 128, 299x299x3."""
    if x.shape[1:] != (299, 299, 3):
        raise ValueError(
            f"the FID network takes (B, 299, 299, 3) inputs, got {x.shape}; resize first"
        )
    h = _conv(params, "conv_2", _conv(params, "conv_1", _conv(params, "conv", x)))
    h = _max_pool(h)
    h = _max_pool(_conv(params, "conv_4", _conv(params, "conv_3", h)))
    blocks = [
        (_block_a, "mixed"),
        (_block_a, "mixed_1"),
        (_block_a, "mixed_2"),
        (_block_b, "mixed_3"),
    ]
    blocks += [(_block_c, f"mixed_{i}") for i in range(4, 8)] + [(_block_d, "mixed_8")]
    for block, name in blocks:
        h = jnp.concatenate(block(params, name, h), axis=-1)
    for name, max_pool in (("mixed_9", False), ("mixed_10", True)):
        h = jnp.concatenate(_block_e(params, name, h, max_pool), axis=-1)
    return jnp.mean(h, axis=(1, 2))  # the 8x8 average pool


def legacy_resize_matrix(size_in, size_out=299):
    """(out, in) matrix of TF1's bilinear resize without half-pixel centres: output i reads
    s = i·in/out, lerps x[floor(s)] and x[min(floor(s)+1, in-1)]."""
    s = np.arange(size_out) * size_in / size_out
    i0 = np.floor(s).astype(int)
    i1 = np.minimum(i0 + 1, size_in - 1)
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), i0), 1 - (s - i0))
    np.add.at(m, (np.arange(size_out), i1), s - i0)
    return m


def preprocess(images_uint8):
    """uint8 NHWC (grey or RGB) -> the network's input: resized to 299, (p - 128) / 128."""
    x = jnp.asarray(images_uint8, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (299, 299):
        mh = jnp.asarray(legacy_resize_matrix(x.shape[1]), jnp.float32)
        mw = jnp.asarray(legacy_resize_matrix(x.shape[2]), jnp.float32)
        x = jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)
    return (x - 128.0) / 128.0
