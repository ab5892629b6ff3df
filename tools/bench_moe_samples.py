"""bench_moe's per-sample sidecar and its paired comparisons.

Each quality method's eval samples (the same noise and class at index i for every method: evaluate_digits' plan)
are kept as the classifier features of the student's samples and each sample's MSE against the teacher's, in
`<out>.samples.npz` (keys `<method>/features` [N, 128] float32, `<method>/mse` [N] float64,
`<method>/samples_per_class`; `real/features` is recomputed, not stored). From them, `comparisons` gives
dense2moe against each peer: the paired Frechet and pooled-PSNR differences with bootstrap intervals
(dicompress/eval/paired.py), so a gain is claimed only where its interval excludes 0.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dicompress.eval.paired import paired_frechet_difference, paired_psnr_difference, per_sample_mse

REFERENCE = "dense2moe"
NOT_PEERS = {REFERENCE, "dense2moe+mob"}     # MoB is dense2moe plus block skipping, not another way to split


def sidecar_path(out, partial: bool = False) -> Path:
    return Path(out).with_suffix(".partial.samples.npz" if partial else ".samples.npz")


class SampleScorer:
    """Per-sample data of one student's eval samples: classifier features and MSE against the teacher's."""

    def __init__(self, zoo_dir, teacher_images: torch.Tensor, samples_per_class: int):
        from dicompress.zoo import load_classifier
        self.classifier = load_classifier(zoo_dir)
        self.teacher = teacher_images
        self.samples_per_class = samples_per_class

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        return {"features": self.classifier.features(images).float().numpy(),
                "mse": per_sample_mse(images, self.teacher), "samples_per_class": self.samples_per_class}


@torch.no_grad()
def real_features(zoo_dir) -> np.ndarray:
    """The classifier features of the real digits (evaluate_digits' Frechet reference)."""
    from dicompress.zoo import load_classifier
    from dicompress.zoo.digits import load_digits_tensors
    return load_classifier(zoo_dir).features(load_digits_tensors("all")[0]).double().numpy()


def write_samples(path: Path, samples: dict[str, dict]) -> None:
    flat = {f"{m}/{k}": np.asarray(v) for m, d in samples.items() for k, v in d.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **flat)
    tmp.replace(path)


def read_samples(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    with np.load(path) as z:
        for key in z.files:
            m, _, k = key.rpartition("/")
            v = z[key]
            out.setdefault(m, {})[k] = int(v) if k == "samples_per_class" else v
    return out


@contextmanager
def locked(out: Path):
    """Exclusive lock for merging into `out` (two bench runs finishing together merge one after the other); the
    lock file lives in the temp directory, named by out's absolute path, so the repository stays clean."""
    out.parent.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"bench_moe-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def comparisons(methods: list[str], samples: dict[str, dict], real: np.ndarray, n_boot: int = 2000,
                level: float = 0.95, seed: int = 0) -> list[dict]:
    """dense2moe (b) against each other method (a): Frechet and PSNR of b minus a on the same samples, with
    `level` bootstrap intervals. A method without per-sample data (or sampled with another plan) gets
    available: false and the reason."""
    rows = []
    ref = samples.get(REFERENCE)
    for m in methods:
        if m in NOT_PEERS:
            continue
        row = {"kind": "comparison", "a": m, "b": REFERENCE}
        peer = samples.get(m)
        if ref is None or peer is None:
            missing = REFERENCE if ref is None else m
            rows.append({**row, "available": False, "reason": f"no per-sample data for {missing} (its row was "
                                                              "merged from a run that did not keep them)"})
            continue
        if ref["samples_per_class"] != peer["samples_per_class"]:
            rows.append({**row, "available": False, "reason": "sampled with another samples_per_class"})
            continue
        fd = paired_frechet_difference(peer["features"], ref["features"], real, n_boot=n_boot, level=level,
                                       seed=seed)
        ps = paired_psnr_difference(peer["mse"], ref["mse"], n_boot=n_boot, level=level, seed=seed)
        rows.append({**row, "available": True, "n": fd["n"], "level": level,
                     "frechet_a": round(fd["frechet_a"], 4), "frechet_b": round(fd["frechet_b"], 4),
                     "frechet_diff": round(fd["diff"], 4), "frechet_low": round(fd["low"], 4),
                     "frechet_high": round(fd["high"], 4), "frechet_b_lower": bool(fd["high"] < 0),
                     "psnr_diff_db": round(ps["diff_db"], 3), "psnr_low_db": round(ps["low_db"], 3),
                     "psnr_high_db": round(ps["high_db"], 3), "psnr_b_higher": bool(ps["low_db"] > 0)})
    return rows


def comparisons_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "Paired on the same eval samples (dense2moe minus the peer; 95% bootstrap intervals over the "
                 "sample indices; a gain only where the interval excludes 0):", "",
             "| dense2moe vs | Frechet (dense2moe / peer) | Frechet difference [95%] | PSNR difference dB [95%] |",
             "|---|---|---|---|"]
    for r in rows:
        if not r["available"]:
            lines.append(f"| {r['a']} | unavailable: {r['reason']} | | |")
            continue
        lines.append(f"| {r['a']} | {r['frechet_b']:.2f} / {r['frechet_a']:.2f} | {r['frechet_diff']:+.2f} "
                     f"[{r['frechet_low']:+.2f}, {r['frechet_high']:+.2f}]"
                     f"{' (lower)' if r['frechet_b_lower'] else ''} | {r['psnr_diff_db']:+.2f} "
                     f"[{r['psnr_low_db']:+.2f}, {r['psnr_high_db']:+.2f}]{' (higher)' if r['psnr_b_higher'] else ''} |")
    return lines
