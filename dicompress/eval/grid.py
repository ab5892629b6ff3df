"""Side-by-side sample grid: one row per class, teacher|student pairs across."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEPARATOR = (40, 110, 220)  # blue: never confused with the grey levels of a digit (or of noise)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """[1, H, W] or [H, W] in [-1, 1] -> uint8 [H, W]."""
    a = img.detach().float().cpu().reshape(img.shape[-2], img.shape[-1]).clamp(-1, 1)
    return ((a + 1.0) * 127.5).round().to(torch.uint8).numpy()


def grid_size(rows: int, pairs: int, h: int, w: int, scale: int = 4, sep: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `rows` x `pairs` teacher|student pairs of h x w images."""
    return pairs * 2 * w * scale + (pairs + 1) * sep, rows * h * scale + (rows + 1) * sep


def save_sample_grid(teacher: torch.Tensor, student: torch.Tensor, path, classes, per_class: int | None = None,
                     scale: int = 4, sep: int = 2) -> Path:
    """Write a PNG comparing teacher and student samples [N, 1, H, W] (same noise, same order).

    Rows are the distinct classes in `classes` (one label per sample), sorted; each row holds up to
    `per_class` teacher|student pairs, upscaled `scale`x (nearest) and framed by `sep`-pixel blue lines.
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} samples must align")
    labels = torch.as_tensor(classes).reshape(-1).tolist()
    if len(labels) != len(teacher):
        raise ValueError(f"{len(labels)} class labels for {len(teacher)} samples: give one label per sample")
    rows = sorted(set(labels))
    by_class = {c: [i for i, lab in enumerate(labels) if lab == c][:per_class] for c in rows}
    pairs = max(len(v) for v in by_class.values())
    h, w = teacher.shape[-2:]
    th, tw = h * scale, w * scale
    width, height = grid_size(len(rows), pairs, h, w, scale, sep)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = SEPARATOR
    for r, c in enumerate(rows):
        y = sep + r * (th + sep)
        for p, i in enumerate(by_class[c]):
            x = sep + p * (2 * tw + sep)
            for k, img in enumerate((teacher[i], student[i])):
                tile = np.kron(_to_uint8(img), np.ones((scale, scale), dtype=np.uint8))  # nearest upscale
                canvas[y:y + th, x + k * tw:x + (k + 1) * tw] = tile[..., None]
    if hasattr(path, "write"):          # a file-like object (e.g. BytesIO for an artifact's extra files)
        Image.fromarray(canvas).save(path, format="PNG")
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
