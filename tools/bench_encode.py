"""Prompt encoding on CPU: a T5 encoder at T5-XXL's width (d_model 4096, 64 heads, d_ff 10240, gated GELU) with
few layers, one prompt of 512 tokens, weights and compute in fp32, in bf16, and stored in bf16 but computed in fp32
one layer at a time (dicompress/calib/prompt_encoding.py `compute_in`, what `source: prompts` does on CPU).

    python tools/bench_encode.py --out bench/encode.json [--layers 2] [--threads 1] [--reps 2]

Writes JSON and a markdown table beside it (same name, .md); seconds per layer are the median forward time divided
by the layer count, and the 64-prompt figure multiplies by T5-XXL's 24 layers and 64 prompts.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicompress.calib.prompt_encoding import compute_in  # noqa: E402

XXL = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240}


def encoder(layers: int):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=1024, num_layers=layers, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
                                   **XXL)).eval()


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    fp32 = encoder(a.layers)
    ids = torch.randint(0, 1024, (1, a.tokens), generator=torch.Generator().manual_seed(1))
    ref = fp32(input_ids=ids).last_hidden_state
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    rows = {"fp32": timed(lambda: fp32(input_ids=ids), a.reps),
            "bf16": timed(lambda: bf16(input_ids=ids), a.reps)}
    with compute_in(bf16, torch.float32) as mixed:
        rows["bf16 stored, fp32 compute"] = timed(lambda: mixed(input_ids=ids), a.reps)
        mixed_out = mixed(input_ids=ids).last_hidden_state
    ref_rounded = encoder(a.layers).to(torch.bfloat16).float()(input_ids=ids).last_hidden_state
    res = {"layers": a.layers, "tokens": a.tokens, "threads": a.threads, "reps": a.reps,
           "seconds_per_layer": {k: v / a.layers for k, v in rows.items()},
           "t5_xxl_64_prompts_minutes": {k: v / a.layers * 24 * 64 / 60 for k, v in rows.items()},
           # compute_in must give what the same bf16 weights give in fp32: exact
           "mixed_equals_fp32_of_bf16_weights": bool(torch.equal(mixed_out, ref_rounded)),
           "fp32_vs_bf16_weights_max_abs": float((ref - ref_rounded).abs().max()),
           "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "command": "python tools/bench_encode.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Prompt encoding on CPU: T5-XXL-width layer, {a.tokens} tokens, {a.threads} thread(s)", "",
             f"`{res['command']}` ({res['date']}, {res['cpu']})", "",
             "| weights / compute | s per layer | 64 prompts through T5-XXL (24 layers) |", "|---|---|---|"]
    for k, v in res["seconds_per_layer"].items():
        lines.append(f"| {k} | {v:.2f} | {res['t5_xxl_64_prompts_minutes'][k]:.0f} min |")
    lines += ["", f"bf16 stored, fp32 compute equals the fp32 model of the same bf16 weights bit for bit: "
              f"{res['mixed_equals_fp32_of_bf16_weights']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
