"""diffusers folders: UNet2DModel parity (tests/data/diffusers_references.npz, made by
tests/fixtures/make_diffusers_references.py), pipelines as configs, export, refusals."""

import json
import pickle
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from ddpm_jax import (
    config_lib,
    diffusers_pipeline,
    diffusers_unet,
    sampling,
    torch_pickle,
    unet,
)
from ddpm_jax.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import diffusers_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "tests" / "data" / "diffusers_references.npz"
CASES = ("cifar", "six_levels", "heads", "scale_shift", "classes")


@pytest.fixture(scope="module")
def refs():
    with np.load(REFERENCES) as data:
        return {k: data[k] for k in data.files}


def case_state(refs, name):
    keys = [str(k) for k in refs[f"{name}/keys"]]
    shapes = json.loads(str(refs[f"{name}/shapes"]))
    return diffusers_weights.draw(keys, shapes, int(refs[f"{name}/seed"]))


def write_pipeline(folder, config_text, state, scheduler=None, weights="safetensors"):
    """A DDPMPipeline folder as diffusers writes it, with these weights."""
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(config_text)
    scheduler = {"_class_name": "DDPMScheduler", **(scheduler or {})}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if weights == "safetensors":
        save_file(state, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return folder


def forward(config, params, x, t, labels=None):
    setup = config_lib.build(config)
    return np.asarray(jax.jit(setup.model.apply)({"params": params}, x, t, labels))


def rel_l2(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_diffusers(refs, name, tmp_path):
    config_json = json.loads(str(refs[f"{name}/config"]))
    learned = config_json["out_channels"] == 2 * config_json["in_channels"]
    scheduler = {"variance_type": "learned_range"} if learned else None
    folder = write_pipeline(
        tmp_path, str(refs[f"{name}/config"]), case_state(refs, name), scheduler
    )
    config, params = diffusers_pipeline.load(folder, precision="highest")
    labels = refs.get(f"{name}/labels")
    got = forward(config, params, refs[f"{name}/x"], refs[f"{name}/t"], labels)
    assert rel_l2(got, refs[f"{name}/out64"]) <= 1e-5
    assert rel_l2(got, refs[f"{name}/out32"]) <= 1e-5


def test_options_reach_the_network(refs):
    """Each layout's distinguishing option is set (a loader ignoring one would differ from
    diffusers by far more than 1e-5 above; here: that the options are read at all)."""
    cfgs = {n: diffusers_unet.unet_config(json.loads(str(refs[f"{n}/config"])))[0] for n in CASES}
    assert cfgs["cifar"].attn_resolutions == (16,) and cfgs["cifar"].downsample_pad == "same"
    assert not cfgs["cifar"].time_flip and cfgs["cifar"].time_shift == 1
    assert cfgs["six_levels"].ch_mult == (1, 1, 2, 2, 4, 4)
    assert cfgs["six_levels"].attn_resolutions == (2,)
    heads = cfgs["heads"]
    assert (heads.attn_head_dim, heads.norm_groups, heads.norm_eps) == (16, 16, 1e-5)
    assert heads.time_flip and heads.time_shift == 0 and heads.downsample_pad == "symmetric"
    assert cfgs["scale_shift"].scale_shift and cfgs["scale_shift"].mid_attn_groups == -1
    assert cfgs["classes"].num_classes == 5 and cfgs["classes"].mid_attn_groups == 8


def test_old_attention_names_load(refs, tmp_path):
    """The 2022 spelling query/key/value/proj_attn is the same network."""
    renamed = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in case_state(refs, "cifar").items():
        for new, old in renamed.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert any(".query." in k for k in state)
    folder = write_pipeline(tmp_path, str(refs["cifar/config"]), state)
    config, params = diffusers_pipeline.load(folder, precision="highest")
    got = forward(config, params, refs["cifar/x"], refs["cifar/t"])
    assert rel_l2(got, refs["cifar/out64"]) <= 1e-5


@pytest.mark.parametrize("name", ["cifar10", "256px"])
def test_google_layouts_count(refs, name):
    """google/ddpm-cifar10-32 and the 256 px repos: the counts diffusers gives."""
    layouts = {
        "cifar10": ((128, 256, 256, 256), 32, 1),
        "256px": ((128, 128, 256, 256, 512, 512), 256, 4),
    }
    widths, size, attn_level = layouts[name]
    down = ["AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(len(widths))]
    config = dict(sample_size=size, block_out_channels=widths, down_block_types=down,
                  up_block_types=[d.replace("Down", "Up") for d in reversed(down)],
                  layers_per_block=2, attention_head_dim=None, norm_eps=1e-6,
                  flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)  # fmt: skip
    cfg, size = diffusers_unet.unet_config(config)
    x, t = (
        jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
        jax.ShapeDtypeStruct((1,), np.int32),
    )
    shapes = jax.eval_shape(unet.UNet(cfg).init, jax.random.key(0), x, t)["params"]
    count = sum(a.size for a in jax.tree.leaves(shapes))
    assert (
        count == int(refs[f"google/{name}"]) == {"cifar10": 35_746_307, "256px": 113_673_219}[name]
    )


def test_bin_reader_values(refs):
    """torch.save's zip format read without torch: strides, offsets, half, bfloat16, int."""
    state = torch_pickle.load(REFERENCES.parent / "tiny_state.bin")
    assert sorted(state) == sorted(k.removeprefix("bin/") for k in refs if k.startswith("bin/"))
    for key, value in state.items():
        np.testing.assert_array_equal(value, refs[f"bin/{key}"])
        assert value.dtype == (np.int64 if key == "steps" else np.float32)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_bin_reader_refuses_code(tmp_path):
    """A pickle whose reduce would run a command is refused by name; nothing runs."""
    marker = tmp_path / "ran"
    path = tmp_path / "diffusion_pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCommand(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"refused to load: its pickle names (posix|os)\.system"):
        torch_pickle.load(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCommand(marker), protocol=2))  # the pickle does run code
    assert marker.exists()


def test_bin_weights_in_a_folder_are_read(refs, tmp_path):
    """A folder with only the .bin is read through it (this one's tensors do not fit)."""
    folder = write_pipeline(tmp_path, str(refs["heads/config"]), {}, weights="bin")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        (REFERENCES.parent / "tiny_state.bin").read_bytes()
    )
    config = diffusers_pipeline.get_config(folder)
    with pytest.raises(UserError, match=r"(?s)missing: conv_in.weight.*unexpected: plain"):
        diffusers_pipeline.load_params(folder, config_lib.build(config))


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]),
         "CrossAttnDownBlock2D"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift='spatial'"),
        (dict(act_fn="gelu"), "act_fn='gelu'"),
        (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"]), "mirror"),
        (dict(block_out_channels=[32, 48, 64]), "block_out_channels"),
        (dict(some_new_option=1), "some_new_option=1"),
        (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused_by_name(refs, change, named):
    config = json.loads(str(refs["heads/config"])) | change
    with pytest.raises(UserError, match=r"^UNet2DModel config: .*" + re.escape(named)):
        diffusers_unet.unet_config(config)


def load_export_load(folder, tmp_path):
    config, params = diffusers_pipeline.load(folder)
    setup = config_lib.build(config)
    out = diffusers_pipeline.write(tmp_path / "exported", config, params)
    config_again, params_again = diffusers_pipeline.load(out)
    return (config, params, setup), (config_again, params_again, config_lib.build(config_again))


@pytest.mark.parametrize("name", ["classes", "scale_shift", "cifar"])
def test_load_export_load_is_the_identity(refs, name, tmp_path):
    text = str(refs[f"{name}/config"])
    learned = name == "scale_shift"
    variance = "learned_range" if learned else "fixed_large"
    scheduler = dict(variance_type=variance, beta_schedule="squaredcos_cap_v2",
                     prediction_type="v_prediction")  # fmt: skip
    folder = write_pipeline(tmp_path / "in", text, case_state(refs, name), scheduler)
    (config, params, setup), (_, params_again, setup_again) = load_export_load(folder, tmp_path)
    assert setup_again.unet == setup.unet and setup_again.diffusion == setup.diffusion
    np.testing.assert_allclose(setup_again.schedule.betas, setup.schedule.betas, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)
    exported = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
    original = json.loads(text)
    for key, value in exported.items():  # every setting diffusers reads, as it was
        if not key.startswith("_") and key != "dropout":
            assert original[key] == value, key


def test_trained_model_exports(tmp_path):
    """A network of this package (the tiny config, random weights) goes out and comes back."""
    config = config_lib.load_config("tiny")
    setup = config_lib.build(config)
    x = np.zeros((1, *setup.image_shape), np.float32)
    params = setup.model.init(jax.random.key(1), x, np.zeros((1,), np.int32))["params"]
    out = diffusers_pipeline.write(tmp_path / "out", config, params)
    config_again, params_again = diffusers_pipeline.load(out)
    setup_again = config_lib.build(config_again)
    assert setup_again.unet == setup.unet and setup_again.diffusion == setup.diffusion
    np.testing.assert_array_equal(config_lib.betas(config_again), config_lib.betas(config))
    jax.tree.map(np.testing.assert_array_equal, params_again, params)
    with pytest.raises(UserError, match="already exists"):
        diffusers_pipeline.write(out, config, params)


def test_export_refuses_what_unet2dmodel_lacks(tmp_path):
    config = config_lib.load_config("tiny")
    config.model.resamp_with_conv = False
    with pytest.raises(UserError, match="resamp_with_conv=False"):
        diffusers_pipeline.write(tmp_path / "a", config, {})
    config = config_lib.load_config("tiny")
    config.diffusion.mean_type = "xprev"
    with pytest.raises(UserError, match="xprev"):
        diffusers_pipeline.write(tmp_path / "b", config, {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "scheduler, expect",
    [
        ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
         dict(beta_schedule="scaled_linear")),
        ({"prediction_type": "v_prediction", "variance_type": "fixed_large",
          "clip_sample": False}, dict(mean_type="v", var_type="fixedlarge")),
        ({"prediction_type": "sample", "variance_type": "fixed_small_log"},
         dict(mean_type="x0", var_type="fixedsmall")),
    ],
)  # fmt: skip
def test_scheduler_settings(refs, scheduler, expect, tmp_path):
    folder = write_pipeline(tmp_path, str(refs["heads/config"]), {}, scheduler)
    config = diffusers_pipeline.get_config(folder)
    for key, value in expect.items():
        assert config.diffusion[key] == value
    assert config.sampling.clip_x0 == scheduler.get("clip_sample", True)
    betas = np.asarray(config_lib.build(config).schedule.betas, np.float64)
    if scheduler.get("beta_schedule") == "scaled_linear":  # linspace of √β, squared
        want = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        np.testing.assert_allclose(betas, want, rtol=1e-6)


def test_cosine_and_given_betas(refs, tmp_path):
    """squaredcos_cap_v2 is Nichol & Dhariwal's cosine (restated); trained_betas are used."""
    cosine = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 50}
    folder = write_pipeline(tmp_path / "a", str(refs["heads/config"]), {}, cosine)
    betas = np.asarray(config_lib.build(diffusers_pipeline.get_config(folder)).schedule.betas)
    f = lambda t: np.cos((t / 50 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    want = np.minimum(1 - f(np.arange(1, 51)) / f(np.arange(50)), 0.999)
    np.testing.assert_allclose(betas, want, rtol=1e-5)
    given = np.linspace(1e-3, 0.05, 20).tolist()
    folder = write_pipeline(tmp_path / "b", str(refs["heads/config"]), {},
                            {"trained_betas": given, "num_train_timesteps": 20})  # fmt: skip
    betas = np.asarray(config_lib.build(diffusers_pipeline.get_config(folder)).schedule.betas)
    np.testing.assert_allclose(betas, given, rtol=1e-6)


@pytest.mark.parametrize(
    "scheduler, named",
    [({"thresholding": True}, "thresholding"), ({"variance_type": "learned"}, "'learned'"),
     ({"_class_name": "PNDMScheduler"}, "PNDMScheduler"),
     ({"prediction_type": "flow"}, "prediction_type='flow'")],
)  # fmt: skip
def test_unsupported_scheduler_refused(refs, scheduler, named, tmp_path):
    folder = write_pipeline(tmp_path, str(refs["heads/config"]), {}, scheduler)
    with pytest.raises(UserError, match=re.escape(named)):
        diffusers_pipeline.get_config(folder)


def test_ddim_pipeline_samples_with_ddim(refs, tmp_path):
    folder = write_pipeline(tmp_path, str(refs["heads/config"]), {})
    index = json.loads((folder / "model_index.json").read_text()) | {"_class_name": "DDIMPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index))
    config = diffusers_pipeline.get_config(folder)
    assert (config.sampling.method, config.sampling.num_steps) == ("ddim", 50)


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot be reached"):
        diffusers_pipeline.resolve("google/ddpm-cifar10-32")
    assert time.perf_counter() - start < 10
    with pytest.raises(UserError, match="no such folder"):
        diffusers_pipeline.resolve(str(tmp_path / "missing" / "folder"))


def test_sample_py_pretrained(refs, tmp_path):
    """sample.py --pretrained FOLDER with overrides draws what the library draws; with
    --config as well it refuses, naming both."""
    folder = write_pipeline(tmp_path / "pipe", str(refs["heads/config"]), case_state(refs, "heads"))
    out = tmp_path / "s"
    overrides = ["--config.sampling.method=dpm++2m", "--config.sampling.num_steps=3"]
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--pretrained={folder}", "--num_samples=2",
           f"--out={out}", "--compilation_cache=", *overrides]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config, params = diffusers_pipeline.load(folder)
    config.sampling.update(method="dpm++2m", num_steps=3)
    want = sampling.make_sample_fn(config)(params, jax.random.PRNGKey(0), 2)
    np.testing.assert_array_equal(np.load(out.with_suffix(".npz"))["images"], want)
    both = subprocess.run([*cmd, "--config=tiny"], capture_output=True, text=True, timeout=600)
    assert both.returncode != 0 and "--pretrained FOLDER or --config, not both" in both.stderr
