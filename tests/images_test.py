"""images.py (pixels and grids) and progress.py (the one progress bar)."""

import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from ddpm_jax import images, progress


def test_image_grid_layout():
    pics = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
    grid = images.image_grid(pics)
    assert grid.shape == (4, 6, 1)  # 3 columns, 2 rows
    np.testing.assert_array_equal(grid[2:4, 0:2], pics[3])
    np.testing.assert_array_equal(grid[0:2, 4:6], pics[2])
    assert not grid[2:4, 4:6].any()  # blank padding after the last image
    np.testing.assert_array_equal(
        images.to_uint8(jnp.array([-1.0, 0.0, 1.0, 1.5])), [0, 128, 255, 255]
    )
    # k = round((x + 1) · 127.5): the pixel a saved image has, from its [-1, 1] value.
    k = np.arange(256)
    np.testing.assert_array_equal(images.to_uint8(k / 127.5 - 1), k)


def test_progress_counts_from_the_first_finished_piece(capsys):
    """The bar appears at the first update, with that piece counted, and reaches the
    total; disabled, it shows nothing."""
    bar = progress.Progress(6, True, "steps")
    assert not bar.shown
    bar.update(2, jnp.ones(3))
    assert bar.shown and bar.bar.n == 2
    bar.update(4, jnp.ones(3))
    bar.close()
    assert "6/6" in capsys.readouterr().err
    quiet = progress.Progress(6, False)
    quiet.update(6, jnp.ones(3))
    quiet.close()
    assert not quiet.shown and capsys.readouterr().err == ""


def test_work_done_in_one_piece_shows_no_bar(capsys):
    bar = progress.Progress(1, True, "batches")
    bar.update(1, jnp.ones(3))
    bar.close()
    assert not bar.shown and capsys.readouterr().err == ""


def test_log_lines_go_above_a_shown_bar():
    """While a bar is shown, absl's handler writes through tqdm (above the bar, not into
    its line); afterwards it writes where it did before."""
    handler = absl_logging.get_absl_handler().python_handler
    before = handler.stream
    bar = progress.Progress(4, True)
    bar.start()
    assert isinstance(handler.stream, progress._AboveTheBar) and handler.stream.stream is before
    bar.close()
    assert handler.stream is before


def test_progress_advances_to_a_step_with_metrics(capsys):
    bar = progress.Progress(10, True)
    bar.start(3)
    bar.advance_to(7, "loss 0.5")
    assert bar.bar.n == 7
    bar.close()
    err = capsys.readouterr().err
    assert "7/10" in err and "loss 0.5" in err
