"""Check tools/project_recipe.py's per-block figures against a measured run at FLUX.1-dev's width.

    python tools/bench_flux_width.py --out bench/flux_width.json [--size 256] [--steps 2] [--threads 2]

Builds a random pipeline with FLUX.1-dev's real widths and few layers (transformer: 24 heads x 128, MLP 12288,
joint attention 4096, 1 double + 1 single block; T5 encoder at XXL width, 2 layers: d_model 4096, 64 heads, d_ff
10240; tiny CLIP, VAE and tokenizers: dicompress.zoo.pipelines), runs `recipes/flux_w4a8.yaml` as shipped on it
(`dicompress run` in a subprocess: its wall time and peak RSS recorded) with only the size overrides (two prompts,
--size px, --steps steps), then runs the projection for the same recipe, overrides and config, and reports
measured / projected for what the projection of the real model is built from: the capture store's bytes, each
block's seconds and the run's peak RSS. Writes JSON and a markdown table beside it (same name, .md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

T5_XXL_WIDTH = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 2}
FLUX_WIDTH = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
              "axes_dims_rope": (16, 56, 56)}
PROMPTS = ["A close-up portrait of an elderly fisherman with a weathered face, soft window light",
           "A red fox sitting in fresh snow at dawn, breath visible in the cold air"]


def build(out: Path) -> Path:
    from dicompress.zoo.pipelines import make_tiny_flux_pipeline
    return make_tiny_flux_pipeline(out, t5=T5_XXL_WIDTH, transformer=FLUX_WIDTH)


def run(model: Path, work: Path, overrides: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "dicompress.cli", "run", str(ROOT / "recipes/flux_w4a8.yaml"), "--model", str(model),
           "--output", str(work / "out"), "--quiet"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    out = work / "out"
    report = json.loads(((out / "transformer") if (out / "transformer").is_dir() else out).joinpath(
        "report.json").read_text())
    store = next(p.parent for p in (work / "cache" / "calib").glob("*/meta.json"))
    return {"seconds": time.perf_counter() - t, "peak_rss_gib": usage.ru_maxrss * 1024 / 2 ** 30,
            "store_bytes": sum(f.stat().st_size for f in store.rglob("*.safetensors")),
            "blocks": [{"block": r["block"], "stream": r["stream"], "seconds": r["seconds"],
                        "peak_rss_gib": r["peak_rss_bytes"] / 2 ** 30} for r in report["streaming"]["blocks"]],
            "timings": report.get("seconds")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON at --out")
    a = ap.parse_args(argv)
    if a.render:
        print(render(Path(a.out)))
        return
    import torch
    torch.set_num_threads(a.threads)
    import project_recipe
    from dicompress.recipe import load_recipe
    with tempfile.TemporaryDirectory(prefix="bench_flux_width_") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        model = build(work / "pipe")
        build_s = time.perf_counter() - t
        (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        overrides = [f"calibration.height={a.size}", f"calibration.width={a.size}", f"calibration.steps={a.steps}",
                     f"calibration.prompts={work / 'prompts.txt'}", f"calibration.cache_dir={work / 'cache'}"]
        measured = run(model, work, overrides, a.threads)
        recipe = load_recipe(ROOT / "recipes/flux_w4a8.yaml", overrides)
        cfg = json.loads((model / "transformer" / "config.json").read_text())
        family = {**project_recipe.FAMILIES["black-forest-labs/FLUX.1-dev"], "class": cfg["_class_name"],
                  "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}
        meta = project_recipe.meta_model(family["class"], family["config"])
        widest = max(i for ls in project_recipe.block_linears(meta).values() for _, i, _, _ in ls)
        tokens = (a.size // 16) ** 2 + family["text_tokens"]
        rates = project_recipe.measure_cpu_rates(3072, tokens, 24, 128, widest, a.threads)
        rates.update(gpu_flops=4e14, disk_bytes_per_s=2e9)
        proj = project_recipe.project(recipe, family, meta, rates)
    per_kind = {}
    for k, v in proj["phases"]["blocks"]["per_block"].items():
        lin, attn, solve = v["linear_flops"], v["attention_flops"], v["gptq_solve_flops"]
        # the FLOP model alone: what project_recipe.FIXED_BLOCK_CPU_SECONDS is measured against
        per_kind[k] = lin / rates["cpu_gemm_flops"] + attn / rates["cpu_sdpa_flops"] + solve / rates["cpu_solve_flops"]
    rows = []
    for b in measured["blocks"]:
        rows.append({**b, "projected_seconds": per_kind[b["stream"]],
                     "measured_over_projected": b["seconds"] / per_kind[b["stream"]]})
    store_proj = proj["phases"]["capture"]["store_gib"] * 2 ** 30
    res = {"size": a.size, "steps": a.steps, "prompts": len(PROMPTS), "threads": a.threads, "build_seconds": build_s,
           "measured": measured, "projection": proj, "blocks": rows,
           "store": {"measured_bytes": measured["store_bytes"], "projected_bytes": store_proj,
                     "measured_over_projected": measured["store_bytes"] / store_proj},
           "peak_rss": {"measured_gib": measured["peak_rss_gib"], "projected_gib": proj["peak_rss_gib"],
                        "projected_blocks_gib": proj["phases"]["blocks"]["peak_gib"]},
           "rss_overhead_gib": project_recipe.RSS_OVERHEAD_GIB,
           "rates": rates, "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python tools/bench_flux_width.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(render(out))


def render(out: Path) -> str:
    """bench/flux_width.md from the JSON beside it."""
    res = json.loads(out.read_text())
    proj, measured, rows, rates = res["projection"], res["measured"], res["blocks"], res["rates"]
    store_proj = res["store"]["projected_bytes"]
    # without the measured overhead project_recipe adds (RSS_OVERHEAD_GIB): what that constant is measured against
    blocks_peak = proj["phases"]["blocks"]["peak_gib"] - res.get("rss_overhead_gib", 0.0)
    lines = ["# FLUX width: measured vs projected (`recipes/flux_w4a8.yaml`, 1 double + 1 single block)", "",
             f"`{res['command']}` ({res['date']}, {res['cpu']}, {res['threads']} threads): {res['prompts']} prompts "
             f"x {res['steps']} steps at {res['size']} px = {proj['calibration']['rows']} rows of "
             f"{proj['calibration']['image_tokens']} + {proj['calibration']['text_tokens']} tokens; T5 at XXL width "
             "(2 layers), so the encode phase is small here and the run's peak is the blocks'.", "",
             "| what | measured | projected (FLOP and byte model) | measured / projected |", "|---|---|---|---|",
             f"| capture store | {measured['store_bytes'] / 2**20:.1f} MiB | {store_proj / 2**20:.1f} MiB | "
             f"{res['store']['measured_over_projected']:.2f} |"]
    for r in rows:
        lines.append(f"| {r['block']} ({r['stream']}) seconds | {r['seconds']:.1f} | {r['projected_seconds']:.1f} | "
                     f"{r['measured_over_projected']:.2f} |")
    lines.append(f"| peak RSS of the run vs one block's projected | {measured['peak_rss_gib']:.2f} GiB | "
                 f"{blocks_peak:.2f} GiB | {measured['peak_rss_gib'] / blocks_peak:.2f} |")
    lines += ["", "project_recipe.py adds the differences as measured constants (FIXED_BLOCK_CPU_SECONDS, "
              "RSS_OVERHEAD_GIB): per-layer costs the FLOP count leaves out (TLQ's grid search, rotations), and "
              "the interpreter's and libraries' memory.", "", f"Run wall time {measured['seconds']:.0f} s (phases: {measured['timings']}); CPU rates measured in "
              f"this run: GEMM {rates['cpu_gemm_flops'] / 1e9:.0f}, attention {rates['cpu_sdpa_flops'] / 1e9:.0f}, "
              f"Cholesky {rates['cpu_solve_flops'] / 1e9:.0f} GFLOP/s."]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
