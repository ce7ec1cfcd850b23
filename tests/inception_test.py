"""The FID Inception in JAX against the reference outputs in $DDPM_FID_DIR."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import fid_file

from ddpm_jax import inception


@pytest.fixture(scope="module")
def net():
    params = inception.load_params(fid_file())
    return params, jax.jit(inception.features), np.load(fid_file("reference.npz"))


def conv_layers():
    """{file name: (kernel, stride, padding)} of every ConvBN the Flax module applies."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, inception.ConvBN) and context.method_name == "__call__":
            seen[".".join(m.scope.path)] = (m.kernel, m.stride, m.padding())
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), x)
    return seen


def test_module_matches_the_network_file(net):
    variables, _, _ = net
    # Every parameter and statistic of the Flax module has the file's shape, and no more.
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32)
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, variables)
    # Every conv's kernel, stride and padding as layers.txt lists them.
    pattern = re.compile(
        r"^net\.layers\.(\S+)\tConv2dLayer\t.*kernel=\((\d+), (\d+)\) stride=(\d) padding=(.*)$"
    )
    rows = [pattern.match(line) for line in fid_file("layers.txt").read_text().splitlines()]
    rows = [m for m in rows if m]
    layers = conv_layers()
    assert len(rows) == len(layers) == 94
    for m in rows:
        name, kh, kw, stride, pad = m.groups()
        pad = [int(pad)] * 2 if pad.isdigit() else [int(v) for v in pad.strip("[]").split(",")]
        expected = ((int(kh), int(kw)), int(stride), ((pad[0], pad[0]), (pad[1], pad[1])))
        assert layers[name] == expected, name


def test_features_match_the_reference(net):
    params, features, ref = net
    out = np.asarray(features(params, inception.preprocess(ref["images"])))
    np.testing.assert_allclose(out, ref["features_f64"], atol=1e-4)
    # 32x32 images through the TF1-legacy resize, as for CIFAR10 samples.
    out32 = np.asarray(features(params, inception.preprocess(ref["images_32"])))
    np.testing.assert_allclose(out32, ref["features_32_nvresize"], atol=1e-4)
    assert (
        np.max(np.abs(out32 - ref["features_32_torch_bilinear"])) > 0.1
    )  # the other resize differs


def test_legacy_resize_matches_the_reference():
    ref = np.load(fid_file("reference.npz"))
    resized = np.asarray(inception.preprocess(ref["images_32"][[0, 4]])) * 128 + 128
    np.testing.assert_allclose(resized, ref["resized_32_nvresize_idx0_4"], atol=2e-3)
    np.testing.assert_allclose(inception.legacy_resize_matrix(299), np.eye(299), atol=1e-12)


def test_mnist_features(net):
    params, features, ref = net
    images = ref["mnist_images"]
    out = np.asarray(features(params, inception.preprocess(images[:8])))
    np.testing.assert_allclose(out, ref["mnist_features_nvresize_first8"], atol=1e-4)


def test_refuses_other_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not the TorchScript FID Inception"):
        inception.load_params(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="299"):
        inception.features({}, np.zeros((1, 32, 32, 3), np.float32))
