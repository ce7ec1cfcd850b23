"""The rate / distortion plot of the paper's Fig. 5, drawn with PIL (no plotting library).

Two panels against the number of reverse process steps T - t: the rate (bits/dim
received so far) and the distortion (RMSE of x̂_0 on the [0, 255] scale).
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax import fs

PANEL_W, PANEL_H, MARGIN = 360, 260, 48
INK, GRID, LINE = (0, 0, 0), (220, 220, 220), (31, 119, 180)


def to_pixels(x, y, box, x_range, y_range):
    """Data coordinates -> pixel coordinates inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    fx = (np.asarray(x, float) - x_range[0]) / max(x_range[1] - x_range[0], 1e-12)
    fy = (np.asarray(y, float) - y_range[0]) / max(y_range[1] - y_range[0], 1e-12)
    return left + fx * (right - left), bottom - fy * (bottom - top)


def _ticks(lo, hi, n=5):
    return np.linspace(lo, hi, n)


def _panel(draw, font, origin, x, y, title, y_label):
    """One line plot with axes, 5 ticks per axis and a title, at origin (left, top)."""
    ox, oy = origin
    box = (ox + MARGIN, oy + 24, ox + PANEL_W - 12, oy + PANEL_H - 36)
    x_range = (0.0, float(x.max()))
    y_range = (0.0, float(y.max()) * 1.05 or 1.0)
    for tx, ty in zip(_ticks(*x_range), _ticks(*y_range), strict=True):
        px, _ = to_pixels(tx, 0, box, x_range, y_range)
        _, py = to_pixels(0, ty, box, x_range, y_range)
        draw.line([(px, box[1]), (px, box[3])], fill=GRID)
        draw.line([(box[0], py), (box[2], py)], fill=GRID)
        draw.text((px - 12, box[3] + 4), f"{tx:.4g}", fill=INK, font=font)
        draw.text((ox + 2, py - 6), f"{ty:.3g}", fill=INK, font=font)
    draw.rectangle(box, outline=INK)
    px, py = to_pixels(x, y, box, x_range, y_range)
    draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=LINE, width=2)
    draw.text((box[0], oy + 6), f"{title} ({y_label})", fill=INK, font=font)
    draw.text((box[0] + 80, box[3] + 18), "reverse process steps (T - t)", fill=INK, font=font)
    return box, x_range, y_range


def rate_distortion_png(path, rate_bpd, distortion_rmse):
    """Writes the two panels side by side to path; returns the panels' (box, x_range,
    y_range) so that a caller (or a test) can map data to pixels."""
    rate, distortion = np.asarray(rate_bpd, float), np.asarray(distortion_rmse, float)
    if rate.shape != distortion.shape or rate.ndim != 1 or rate.size < 2:
        raise ValueError(
            f"rate and distortion must be equal-length 1-D curves, got {rate.shape} and "
            f"{distortion.shape}"
        )
    steps = rate.size - np.arange(rate.size)  # index t = 0..T-1 is reached after T - t steps
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)  # scalable where PIL has FreeType: even spacing
    panels = [
        _panel(draw, font, (0, 0), steps, rate, "Rate", "bits/dim"),
        _panel(draw, font, (PANEL_W, 0), steps, distortion, "Distortion", "RMSE, [0, 255]"),
    ]
    fs.save_png(path, image)
    return panels
