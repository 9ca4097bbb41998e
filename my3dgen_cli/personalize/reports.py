"""Pictures a personalization leaves behind: preview grid and loss curve (Pillow only, no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from my3dgen_cli.fileio import atomic_path

COLOURS = {"loss": (30, 30, 30), "mse": (31, 119, 180), "lpips": (255, 127, 14), "sym": (44, 160, 44)}


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def preview_grid(rows: Sequence[Sequence[torch.Tensor]], tile: int = 256, labels: Sequence[str] = ()) -> Image.Image:
    """Columns of image batches side by side: rows[k] is column k (e.g. photos, base, personalized).

    Each column is a list/tensor of [3, H, W] images in [-1, 1]; one grid row per photo.
    """
    n_cols, n_rows = len(rows), max(len(c) for c in rows)
    head = 18 if labels else 0
    grid = Image.new("RGB", (n_cols * tile, head + n_rows * tile), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, column in enumerate(rows):
        if k < len(labels):
            draw.text((k * tile + 4, 3), labels[k], fill=(0, 0, 0))
        for r, image in enumerate(column):
            grid.paste(to_pil(image).resize((tile, tile), Image.Resampling.BICUBIC), (k * tile, head + r * tile))
    return grid


def loss_plot(log: Sequence[dict[str, float]], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Loss curves (log scale) of a training log: total, mse, lpips and sym (on the steps that have it)."""
    w, h = size
    left, right, top, bottom = 56, 12, 24, 32
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    series = {key: [(r["step"], r[key]) for r in log if key in r and r[key] > 0] for key in COLOURS}
    values = [v for pts in series.values() for _, v in pts]
    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    if not values:
        draw.text((left + 8, top + 8), "no steps logged", fill=(0, 0, 0))
        return img
    lo, hi = math.log10(min(values)), math.log10(max(values))
    hi = hi if hi > lo else lo + 1
    last = max(r["step"] for r in log)
    first = min(r["step"] for r in log)
    span = max(last - first, 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / span * (w - left - right)
        y = top + (hi - math.log10(value)) / (hi - lo) * (h - top - bottom)
        return x, y

    for frac in (0.0, 0.5, 1.0):
        value = 10 ** (hi - frac * (hi - lo))
        y = top + frac * (h - top - bottom)
        draw.text((4, y - 6), f"{value:.3g}", fill=(80, 80, 80))
    draw.text((left, h - bottom + 6), str(first), fill=(80, 80, 80))
    draw.text((w - right - 40, h - bottom + 6), f"step {last}", fill=(80, 80, 80))
    legend_x = left + 8
    for key, pts in series.items():
        if not pts:
            continue
        colour = COLOURS[key]
        if len(pts) > 1:
            draw.line([xy(s, v) for s, v in pts], fill=colour, width=2)
        else:
            x, y = xy(*pts[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((legend_x, 6), key, fill=colour)
        legend_x += 8 * len(key) + 16
    return img
