"""What a smaller (or cheaper-to-store) calibration costs in quality: one recipe run with several calibration
variants on the embedded model, every artifact evaluated on the same samples, each compared with the first
variant as a paired difference of pooled PSNR with a bootstrap interval (dicompress/eval/paired.py).

    python tools/bench_calibration.py --out bench/calibration.json \
        --variant "10x8: calibration.seeds=[0,1,2,3,4,5,6,7]" --variant "10x2: calibration.seeds=[0,1]" \
        --variant "10x1: calibration.seeds=[0]"

A variant is `NAME: KEY=VALUE; KEY=VALUE ...` (`dicompress run --set` texts) applied to --recipe (default
recipes/tiny_flux_w4a8.yaml). Each run is `python -m dicompress.cli run` in a fresh subprocess (its wall time
and peak RSS recorded, a fresh calibration cache each); the evaluation samples --samples-per-class per class of
the teacher and of each artifact from the same noise (evaluation seeds 1000+, disjoint from calibration's).
Writes JSON and a markdown table beside it (same name, .md).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dicompress  # noqa: E402
from dicompress.eval.digits_eval import eval_plan, sample_batches  # noqa: E402
from dicompress.eval.paired import paired_psnr_difference, per_sample_mse, pooled_psnr  # noqa: E402
from dicompress.models import load_transformer, resolve_model  # noqa: E402
from dicompress.recipe import load_recipe  # noqa: E402
from dicompress.zoo import load_conditioning  # noqa: E402
from dicompress.zoo.sampler import DEFAULT_STEPS  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    if not name.strip() or not _:
        raise SystemExit(f"--variant {text!r}: expected 'NAME: KEY=VALUE; KEY=VALUE ...'")
    return name.strip(), [s.strip() for s in sets.split(";") if s.strip()]


def run_variant(recipe: str, sets: list[str], out: Path, cache: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "dicompress.cli", "run", recipe, "--output", str(out), "--quiet",
           "--set", f"calibration.cache_dir={cache}", "--set", "eval.enabled=false"]    # evaluated here
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    calib = report.get("calibration") or {}
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / 2 ** 30,
            "rows": calib.get("rows"), "calibration": {k: v for k, v in calib.items() if not isinstance(v, dict)}}


def markdown(res: dict) -> str:
    lines = [f"# Calibration variants: `{res['recipe']}`", "",
             f"`{res['command']}` ({res['date']}, {res['cpu']}, {res['threads']} thread(s))", "",
             f"{res['samples']} evaluation samples ({res['samples_per_class']} per class), the same for every "
             f"variant; difference = pooled PSNR of the variant minus that of `{res['variants'][0]['name']}`, "
             f"{int(res['level'] * 100)}% paired bootstrap interval ({res['n_boot']} resamples).", "",
             "| variant | --set | rows | pooled PSNR dB | difference dB [interval] | run s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for v in res["variants"]:
        d = v.get("vs_first")
        diff = "-" if d is None else (f"{d['diff_db']:+.2f} [{d['low_db']:+.2f}, {d['high_db']:+.2f}]"
                                      + ("" if d["excludes_zero"] else " (includes 0)"))
        lines.append(f"| {v['name']} | `{'; '.join(v['sets'])}` | {v['rows']} | {v['psnr_db']:.2f} | {diff} | "
                     f"{v['seconds']:.0f} | {v['peak_rss_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/tiny_flux_w4a8.yaml")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--samples-per-class", type=int, default=50)
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = [parse_variant(v) for v in a.variant]
    recipe = load_recipe(a.recipe)
    info = resolve_model(recipe.model)
    if not info.is_zoo:
        raise SystemExit("the evaluation samples the embedded model's classes: use a recipe on zoo:tiny-flux-digits")
    teacher = load_transformer(info)
    conditioning = load_conditioning(info.path)
    labels, seeds = eval_plan(conditioning.prompt_embeds.shape[0], a.samples_per_class, seed_base=1000)
    steps = recipe.eval.steps or DEFAULT_STEPS
    ref = sample_batches(teacher, conditioning, labels, seeds, steps, "teacher", False)
    rows, mses = [], []
    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as work:
        for i, (name, sets) in enumerate(variants):
            run = run_variant(a.recipe, sets, Path(work) / name, Path(work) / f"cache_{i}", a.threads)
            student = dicompress.load(Path(work) / name)
            got = sample_batches(student, conditioning, labels, seeds, steps, name, False)
            mse = per_sample_mse(got, ref)
            mses.append(mse)
            entry = {"name": name, "sets": sets, **run, "psnr_db": pooled_psnr(mse)}
            if i > 0:
                entry["vs_first"] = paired_psnr_difference(mses[0], mse, n_boot=a.n_boot, level=a.level)
            rows.append(entry)
            print(f"{name}: {entry['psnr_db']:.2f} dB, {run['seconds']:.0f} s", flush=True)
    cmd = "python tools/bench_calibration.py " + " ".join(
        f'"{x}"' if " " in x else x for x in (sys.argv[1:] if argv is None else argv))
    res = {"recipe": a.recipe, "variants": rows, "samples": len(seeds), "samples_per_class": a.samples_per_class,
           "n_boot": a.n_boot, "level": a.level, "threads": a.threads, "command": cmd,
           "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
