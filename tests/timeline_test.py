"""timeline.mark: lines `name time` in order where $DDPM_TIMELINE is set, after the arrays it
waits for; nothing anywhere where it is not set."""

import time

import jax.numpy as jnp

from ddpm_jax import timeline


def test_marks_in_order_only_where_asked(tmp_path, monkeypatch):
    path = tmp_path / "timeline"
    monkeypatch.delenv("DDPM_TIMELINE", raising=False)
    timeline.mark("unasked")
    assert not path.exists()
    monkeypatch.setenv("DDPM_TIMELINE", str(path))
    before = time.time()
    timeline.mark("first")
    timeline.mark("second", jnp.ones(3) * 2)
    rows = [line.split() for line in path.read_text().splitlines()]
    assert [name for name, _ in rows] == ["first", "second"]
    times = [float(t) for _, t in rows]
    assert before <= times[0] <= times[1] <= time.time()
