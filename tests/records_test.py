"""records.py: what a checkpoint records and the checks of a step read back."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, records


def test_fingerprint_is_two_wrapping_sums_of_the_words():
    x = np.array([[1.5, -2.0], [np.pi, 1e30]], np.float32)
    words = x.view(np.uint32).ravel().astype(np.uint64)
    want = [int(words.sum() % 2**32), int((words * np.arange(1, 5)).sum() % 2**32)]
    assert records.fingerprint({"a": jnp.asarray(x)}) == {"a": want}
    flipped = x.copy().view(np.uint32)
    flipped[1, 0] ^= 1 << 7  # one bit of one mantissa
    swapped = x[::-1].copy()
    for other in (flipped.view(np.float32), swapped):
        assert records.fingerprint({"a": jnp.asarray(other)}) != {"a": want}
    half = jnp.asarray([1, 2, 3], jnp.bfloat16)  # 2-byte words count too
    assert records.fingerprint({"h": half})["h"][0] == sum(
        int(w) for w in np.asarray(half).view(np.uint16)
    )


def test_non_finite_leaves_are_named_alongside_the_fingerprint():
    tree = {"ok": jnp.ones(3), "bad": jnp.array([1.0, jnp.inf]), "nan": jnp.array([jnp.nan])}
    tree["ints"] = jnp.arange(3)  # integers are always finite
    prints, nonfinite = records.summarize(tree)
    assert sorted(prints) == ["bad", "ints", "nan", "ok"] and sorted(nonfinite) == ["bad", "nan"]
    with pytest.raises(records.Damaged, match="arrays hold NaN or inf: bad, nan"):
        records.verify(tree, None)
    with pytest.raises(records.Damaged, match="arrays differ from their fingerprint: ok"):
        records.verify({"ok": jnp.zeros(3)}, {"fingerprint": prints})


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "its record is not JSON"),
        ("[]", "not a checkpoint record"),
        ('{"step": 4, "settings": "x", "fingerprint": {}}', "not a checkpoint record"),
        ('{"step": "4", "settings": {}, "fingerprint": {}}', "not a checkpoint record"),
        ('{"step": 4, "settings": {}, "fingerprint": {"a": 7}}', "not a checkpoint record"),
        ('{"step": 24, "settings": {}, "fingerprint": {}}', "it holds step 24, not 4"),
    ],
)
def test_a_record_must_be_one_of_its_step(tmp_path, text, reason):
    (tmp_path / "4" / "record").mkdir(parents=True)
    (tmp_path / "4" / "record" / "metadata").write_text(text)
    with pytest.raises(records.Damaged, match=reason):
        records.read_record(tmp_path / "4")
    good = {"step": 4, "settings": {}, "fingerprint": {"a": [1, 2]}}
    (tmp_path / "4" / "record" / "metadata").write_text(json.dumps(good))
    assert records.read_record(tmp_path / "4") == good
    assert records.read_record(tmp_path / "5") is None  # a step saved without a record


def test_differences_name_each_setting_and_skip_ones_absent_from_both():
    config = config_lib.load_config("tiny")
    recorded = records.settings(config)
    assert records.differences(recorded, config) == []
    assert recorded["autoencoder.latent_size"] == 0 and recorded["loss.disc_ch"] is None
    changed = dict(recorded, **{"model.ch": 64, "loss.old": 3, "loss.gone": None})
    assert records.differences(changed, config) == [
        "model.ch=64 (this config: 32)",
        "loss.old=3 (not a setting of this config)",
    ]
