r"""Write a tiny random FLUX.1-dev or Qwen-Image pipeline directory (offline, a few seconds, ~1-2 MB).

Same layout and classes as the real checkpoints (model_index.json, transformer/, text encoders,
tokenizers, vae/, scheduler/), random weights: for trying the real-model recipes small and for tests,
never for quality numbers. For example (64 px, 2 steps: about 15 s on a CPU):

    python tools/make_tiny_pipeline.py flux /tmp/tiny-flux
    dicompress run recipes/flux_w4a8.yaml --model /tmp/tiny-flux --output /tmp/tiny-flux-w4a8 \
        --set calibration.height=64 --set calibration.width=64 --set calibration.steps=2 \
        --set streaming.enabled=false
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from dicompress.zoo.pipelines import make_tiny_flux_pipeline, make_tiny_qwenimage_pipeline  # noqa: E402

BUILDERS = {"flux": make_tiny_flux_pipeline, "qwenimage": make_tiny_qwenimage_pipeline}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _report(root: Path) -> int:
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"  {size:>10,}  {path.relative_to(root)}")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=sorted(BUILDERS))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype on disk (real: bf16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        ap.error(f"{args.out_dir} exists and is not empty")   # save_pretrained would mix old files in
    root = BUILDERS[args.family](args.out_dir, seed=args.seed, dtype=DTYPES[args.dtype])
    print(f"tiny {args.family} pipeline (random weights, {args.dtype}, seed {args.seed}) written to {root}:")
    print(f"  {_report(root):>10,}  bytes in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
