"""Memory benchmark for compressing models larger than memory (issue 6): peak RSS and time of the W4A8
recipe streamed block by block vs loaded whole, on random FLUX-width transformers of two depths, and the
time and peak RSS of loading the artifact vs the bf16 original.

    python tools/bench_memory.py --out bench/memory.json [--threads 2] [--small]   # also writes bench/memory.md

Models: random-initialised diffusers FluxTransformer2DModel at FLUX.1-dev's width (24 heads x 128 = hidden
3072, MLP 12288), 2 double + 4 single and 4 double + 8 single blocks (--depths), built in bf16 (no fp32 copy
is ever held) from a fixed seed and saved as sharded bf16 safetensors in diffusers layout. --small uses
4 heads x 64 (hidden 256): a quick run of the harness, not a measurement.

Compression rows: `python -m dicompress.cli run RECIPE --quiet`, one fresh subprocess per model and path.
RECIPE has the passes of recipes/flux_w4a8.yaml (smooth 0.5, ars 1.0, tlq 4-bit per channel with GPTQ,
act_quant 8-bit) on synthetic calibration (--seeds, --steps, --batch-size), fp32 on CPU, and
`streaming: {enabled: true, propagate: original}` (path streaming) or `streaming: {enabled: false}` (path
naive: the whole model is loaded first). Loading rows: `dicompress.load(artifact)` and
`FluxTransformer2DModel.from_pretrained(original, torch_dtype=torch.bfloat16)`, each in a fresh subprocess,
timing the load call alone and the call plus one read of every tensor (diffusers can return lazy mmaps).

Peak RSS of a child = the larger of (a) its RSS plus its descendants', sampled every 0.1 s with psutil, and
(b) the kernel's high-water mark for it (ru_maxrss from os.wait4). This process imports neither torch nor
diffusers (model building and shape counting run in subprocesses too), so its own memory stays small and
out of (b), which counts the parent's pages at the child's exec.

Summary: RSS growth when the depth doubles, streaming peak over the largest block's fp32 bytes, artifact vs
bf16 load time, and projections of peak RSS and time to FLUX.1-dev (19 double + 38 single blocks) and
Qwen-Image (60 dual-stream blocks), each criterion marked pass or fail.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from statistics import mean, median

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3

# the passes of recipes/flux_w4a8.yaml, with GPTQ on as in the tiny recipes
W4A8_PASSES = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}},
               {"tlq": {"bits": 4, "granularity": "channel", "gptq": True}}, {"act_quant": {"bits": 8}}]
STREAMING_KEY = {"streaming": {"enabled": True, "propagate": "original"}, "naive": {"enabled": False}}
FLUX_DEV_BLOCKS = {"double": 19, "single": 38}
QWEN_IMAGE_BLOCKS = 60
FLUX_1024PX_TOKENS = {"image": 4096, "text": 512}   # one calibration row of FLUX.1-dev at 1024 x 1024 px
CRITERIA = {"depth_doubling_rss_increase": 0.10, "streaming_peak_over_block_fp32": 2.5,
            "load_artifact_over_bf16_seconds": 1.0}


# ---------------------------------------------------------------------------------------------- children

def flux_config(n_double: int, n_single: int, small: bool) -> dict:
    """FLUX.1-dev's transformer at a given depth (MLP = 4 x hidden, diffusers' default); small: 4 heads x 64."""
    heads, head_dim, rope = (4, 64, (8, 28, 28)) if small else (24, 128, (16, 56, 56))
    return {"patch_size": 1, "in_channels": 64, "num_layers": n_double, "num_single_layers": n_single,
            "attention_head_dim": head_dim, "num_attention_heads": heads, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": rope}


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1"}


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:   # exited (or a zombie) between the listing and the read
            pass
    return total


def _kill_tree(proc: psutil.Process) -> None:
    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.Error:
        procs = [proc]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _failure_reason(returncode: int, timed_out: bool, timeout: float) -> str:
    if timed_out:
        return f"timed out after {timeout:.0f} s"
    if returncode < 0:   # SIGKILL with no timeout: most likely the kernel's OOM killer
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def run_child(cmd: list[str], log: Path, threads: int, timeout: float) -> dict:
    """Run `cmd` with stdout/stderr to `log`.stdout/.stderr; peak RSS sampled every 0.1 s and from wait4."""
    out, err = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    t0 = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads), stdout=fo, stderr=fe)
    watched, sampled, timed_out = psutil.Process(proc.pid), 0, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        sampled = max(sampled, _tree_rss(watched))
        if time.perf_counter() - t0 > timeout:
            _kill_tree(watched)
            _, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
    ru_maxrss = usage.ru_maxrss * 1024                     # KiB on Linux
    ok = proc.returncode == 0 and not timed_out
    stdout = out.read_text(errors="replace")
    reason = error = None
    if not ok:
        reason = _failure_reason(proc.returncode, timed_out, timeout)
        error = (err.read_text(errors="replace").strip() or stdout.strip())[-3000:]
    return {"ok": ok, "failure": reason, "error": error, "returncode": proc.returncode, "seconds": round(seconds, 2),
            "peak_rss_bytes": max(sampled, ru_maxrss), "peak_rss_sampled_bytes": sampled, "ru_maxrss_bytes": ru_maxrss,
            "stdout": stdout}


def last_json(stdout: str) -> dict:
    """The JSON object a worker prints as its last such line."""
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")), None)
    return json.loads(line) if line else {}


def worker_cmd(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "worker", *map(str, args)]


def run_worker(args, log: Path, *worker_args) -> dict:
    """A worker subprocess that must succeed; returns its printed JSON plus the run's timing and peak RSS."""
    res = run_child(worker_cmd(*worker_args), log, args.threads, args.timeout)
    if not res["ok"]:
        raise RuntimeError(f"worker {worker_args[0]} failed ({res['failure']}):\n{res['error']}")
    return {**last_json(res.pop("stdout")), "run": res}


# ----------------------------------------------------------------------------------------------- workers
# Run as `python tools/bench_memory.py worker KIND ...`: the only code here that imports torch / diffusers.

def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def worker_shapes(configs_json: str) -> dict:
    """Parameter counts on the meta device (no memory): each bench config, FLUX.1-dev and Qwen-Image at
    their real widths, and the tokens per row of the synthetic calibration."""
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from dicompress.arch import adapter_for

    def flux(cfg):
        with torch.device("meta"):
            m = FluxTransformer2DModel(**cfg)
        return m, {"params": _params(m), "double_block_params": _params(m.transformer_blocks[0]),
                   "single_block_params": _params(m.single_transformer_blocks[0])}

    bench = []
    for cfg in json.loads(configs_json):
        m, stats = flux(cfg)
        kw = adapter_for(m).synthetic_inputs(m, 1, torch.Generator().manual_seed(0))   # reads the config only
        bench.append({**stats, "block_params_max": max(_params(b) for b in (*m.transformer_blocks,
                                                                             *m.single_transformer_blocks)),
                      "tokens_per_row": {"image": kw["hidden_states"].shape[1],
                                         "text": kw["encoder_hidden_states"].shape[1]}})
    _, dev = flux(flux_config(FLUX_DEV_BLOCKS["double"], FLUX_DEV_BLOCKS["single"], small=False))
    try:   # Qwen-Image's real widths are diffusers' defaults: 24 heads x 128, MLP 4 x 3072
        with torch.device("meta"):
            q = QwenImageTransformer2DModel(num_layers=QWEN_IMAGE_BLOCKS)
        qwen = {"params": _params(q), "block_params": _params(q.transformer_blocks[0])}
    except Exception as e:   # noqa: BLE001 - recorded; the projection then states its assumption
        qwen = {"error": f"{type(e).__name__}: {e}"}
    return {"bench": bench, "flux1_dev": dev, "qwen_image": qwen}


def worker_build(config_json: str, out_dir: str, seed: str) -> dict:
    """Random-initialise the model in bf16 (default dtype switched during construction) and save it."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(int(seed))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = FluxTransformer2DModel(**json.loads(config_json))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out_dir, max_shard_size="2GB")
    return {"dtype": str(next(model.parameters()).dtype)}


def worker_load(kind: str, path: str) -> dict:
    """Time one load call (`artifact`: dicompress.load; `bf16`: the diffusers original), both with bf16 kept
    weights, then one read (a copy) of every tensor: diffusers leaves weights of the checkpoint's dtype as lazy
    safetensors mmaps, so the call alone can return before any weight is read."""
    import torch
    from diffusers import FluxTransformer2DModel   # imported before the clock starts on both paths
    if kind == "artifact":
        import dicompress
        dicompress.io.register_with_diffusers()
        t = time.perf_counter()
        model = dicompress.load(path, torch_dtype=torch.bfloat16)
    else:
        t = time.perf_counter()
        model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    call = time.perf_counter() - t
    with torch.no_grad():     # a copy reads every byte at memory speed whatever the dtype (a uint8 sum does not)
        for tensor in (*model.parameters(), *model.buffers()):
            torch.empty_like(tensor).copy_(tensor)
    return {"seconds": round(call, 3), "seconds_until_read": round(time.perf_counter() - t, 3),
            "torch_threads": torch.get_num_threads()}


def worker_main(argv: list[str]) -> None:
    kind, *rest = argv
    fn = {"shapes": worker_shapes, "build": worker_build,
          "load_artifact": lambda p: worker_load("artifact", p), "load_bf16": lambda p: worker_load("bf16", p)}[kind]
    print(json.dumps(fn(*rest)), flush=True)


# -------------------------------------------------------------------------------------------- the bench

def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file()) if path.exists() else 0


def recipe_for(args, path: str, model_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    recipe = {"model": str(model_dir), "output": str(out_dir), "device": "cpu", "dtype": "float32",
              "overwrite": True, "eval": {"enabled": False},
              "calibration": {"source": "synthetic", "seeds": args.seeds, "steps": args.steps,
                              "batch_size": args.batch_size, "cache_dir": str(cache_dir)},
              "passes": W4A8_PASSES}
    if not args.no_streaming_key:
        recipe["streaming"] = STREAMING_KEY[path]
    return recipe


def block_seconds(report: dict) -> dict:
    """Per-block compression seconds from the streaming section of a run's report (absent: all None)."""
    blocks = (report.get("streaming") or {}).get("blocks") or []
    by_stream = {s: [b["seconds"] for b in blocks if b.get("stream") == s] for s in ("double", "single")}
    return {f"seconds_per_{s}_block": round(mean(v), 3) if v else None for s, v in by_stream.items()} | {
        "block_seconds_total": round(sum(b["seconds"] for b in blocks), 3) if blocks else None}


def compress_row(args, model: dict, path: str, work: Path) -> dict:
    """One compression in a fresh subprocess; each run has its own calibration cache, so none reuses another's."""
    name = f"{model['name']}-{path}"
    out_dir, cache_dir, recipe_file = work / f"out-{name}", work / f"cache-{name}", work / f"{name}.yaml"
    shutil.rmtree(cache_dir, ignore_errors=True)
    recipe_file.write_text(yaml.safe_dump(recipe_for(args, path, model["dir"], out_dir, cache_dir), sort_keys=False))
    cmd = [sys.executable, "-m", "dicompress.cli", "run", str(recipe_file), "--quiet"]
    print(f"[{name}] compressing ...", flush=True)
    res = run_child(cmd, work / name, args.threads, args.timeout)
    res.pop("stdout")
    report_file = out_dir / "report.json"
    report = json.loads(report_file.read_text()) if res["ok"] and report_file.exists() else {}
    block_fp32 = 4 * model["block_params_max"]
    shape = {k: model[k] for k in ("blocks", "double", "single", "hidden", "heads", "head_dim", "mlp_hidden")}
    row = {"path": path, **shape, **res, "block_fp32_bytes": block_fp32, "model_fp32_bytes": 4 * model["params"],
           "model_bf16_bytes": 2 * model["params"], "checkpoint_bytes": model["checkpoint_bytes"],
           "artifact_bytes": dir_bytes(out_dir) if res["ok"] else None, **block_seconds(report),
           "peak_over_block_fp32": round(res["peak_rss_bytes"] / block_fp32, 3) if res["ok"] else None,
           "report_seconds": report.get("seconds"), "calibration": report.get("calibration"),
           "artifact": str(out_dir) if res["ok"] else None, "command": " ".join(cmd)}
    print(f"[{name}] {'ok' if row['ok'] else 'FAILED'}: {row['seconds']:.1f} s, "
          f"peak {row['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
    return row


def load_rows(args, model: dict, compress_rows: list[dict], work: Path) -> list[dict]:
    """Load the streamed artifact (else the naive one) and the bf16 original, each in a fresh subprocess,
    `--load-repeats` times in alternating order; a row holds the medians and every sample."""
    done = {r["path"]: r for r in compress_rows if r["blocks"] == model["blocks"] and r["ok"]}
    source = next((p for p in ("streaming", "naive") if p in done), None)
    targets = [("load_bf16", model["dir"], None)]
    if source:
        targets.insert(0, ("load_artifact", Path(done[source]["artifact"]), source))
    samples: dict[str, list[tuple[dict, dict]]] = {kind: [] for kind, _, _ in targets}
    for rep in range(args.load_repeats):
        for kind, target, _ in (targets if rep % 2 == 0 else targets[::-1]):
            res = run_child(worker_cmd(kind, target), work / f"{model['name']}-{kind}-{rep}", args.threads,
                            args.timeout)
            samples[kind].append((res, last_json(res.pop("stdout")) if res["ok"] else {}))
    rows = []
    for kind, target, src in targets:
        ok = [(r, c) for r, c in samples[kind] if r["ok"]]
        res = dict(ok[-1][0] if ok else samples[kind][-1][0])

        def med(key, runs=ok):
            vals = [c.get(key) for _, c in runs if c.get(key) is not None]
            return round(median(vals), 3) if vals else None
        rows.append({"path": kind, "blocks": model["blocks"], "artifact_of": src, "seconds": med("seconds"),
                     "seconds_until_read": med("seconds_until_read"), "process_seconds": res.pop("seconds"),
                     **res, "peak_rss_bytes": max((r["peak_rss_bytes"] for r, _ in ok), default=res["peak_rss_bytes"]),
                     "ok": bool(ok), "repeats": len(samples[kind]),
                     "samples": [{k: c.get(k) for k in ("seconds", "seconds_until_read")} for _, c in ok],
                     "torch_threads": ok[-1][1].get("torch_threads") if ok else None,
                     "bytes_on_disk": dir_bytes(target)})
        r = rows[-1]
        print(f"[{model['name']}-{kind}] {'ok' if r['ok'] else 'FAILED'}: median {r['seconds']} s "
              f"({r['seconds_until_read']} s with every tensor read) over {len(ok)} runs, "
              f"peak {r['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
    return rows


def build_model(args, n_double: int, n_single: int, stats: dict, work: Path) -> dict:
    cfg = flux_config(n_double, n_single, args.small)
    name = f"d{n_double}s{n_single}"
    model_dir = work / f"model-{name}"
    shutil.rmtree(model_dir, ignore_errors=True)
    print(f"[{name}] building ({stats['params'] / 1e9:.2f} B parameters, bf16) ...", flush=True)
    built = run_worker(args, work / f"{name}-build", "build", json.dumps(cfg), model_dir, args.model_seed)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return {"name": name, "dir": model_dir, "double": n_double, "single": n_single, "blocks": n_double + n_single,
            "hidden": hidden, "heads": cfg["num_attention_heads"], "head_dim": cfg["attention_head_dim"],
            "mlp_hidden": 4 * hidden, "config": cfg, **stats, "checkpoint_bytes": dir_bytes(model_dir, "*.safetensors"),
            "build": {"seconds": built["run"]["seconds"], "peak_rss_bytes": built["run"]["peak_rss_bytes"],
                      "dtype": built["dtype"]}}


# ------------------------------------------------------------------------------------------------ summary

def _ratio(a, b, minus: float = 0.0):
    return round(a / b - minus, 4) if a is not None and b else None


def _check(name: str, value, limit: float, what: str) -> dict:
    return {"criterion": name, "what": what, "value": value, "limit": limit,
            "pass": None if value is None else bool(value <= limit)}


def projections(deep: dict | None, shapes: dict, tokens: dict, rows_per_run: int) -> dict:
    """Peak RSS and time at full depth, from the deepest streaming run (peak does not grow with depth)."""
    calib = {"rows": rows_per_run, "tokens_per_row": tokens["image"] + tokens["text"], **{
        f"{k}_tokens_per_row": v for k, v in tokens.items()}}
    if not deep or deep["seconds_per_double_block"] is None:
        return {"calibration": calib, "note": "needs a successful streaming run with per-block seconds"}
    s_double, s_single = deep["seconds_per_double_block"], deep["seconds_per_single_block"] or 0.0
    overhead = deep["seconds"] - deep["block_seconds_total"]
    dev, qwen = shapes["flux1_dev"], shapes["qwen_image"]
    flux_seconds = overhead + FLUX_DEV_BLOCKS["double"] * s_double + FLUX_DEV_BLOCKS["single"] * s_single
    if "block_params" in qwen:
        qwen_ratio, assumption = qwen["block_params"] / dev["double_block_params"], None
    else:
        qwen_ratio = 1.0
        assumption = (f"QwenImageTransformer2DModel was not constructible ({qwen['error']}): its block is taken "
                      "to cost as much as a FLUX double block (both dual-stream, hidden 3072, MLP 12288)")
    return {"calibration": calib, "from_blocks": deep["blocks"], "fixed_overhead_seconds": round(overhead, 2),
            "flux1_dev": {**FLUX_DEV_BLOCKS, "peak_rss_bytes": deep["peak_rss_bytes"],
                          "seconds": round(flux_seconds, 1), "model_fp32_bytes": 4 * dev["params"],
                          "model_bf16_bytes": 2 * dev["params"]},
            "qwen_image": {"blocks": QWEN_IMAGE_BLOCKS, "peak_rss_bytes": deep["peak_rss_bytes"],
                           "block_over_flux_double_params": round(qwen_ratio, 4),
                           "seconds": round(overhead + QWEN_IMAGE_BLOCKS * s_double * qwen_ratio, 1),
                           "model_fp32_bytes": 4 * qwen["params"] if "params" in qwen else None,
                           "assumption": assumption}}


def load_ratios(loads: list[dict], key: str) -> dict:
    """Per model depth: artifact load seconds / bf16 original load seconds."""
    by_blocks: dict[int, dict] = {}
    for r in loads:
        by_blocks.setdefault(r["blocks"], {})[r["path"]] = r[key] if r["ok"] else None
    return {str(b): _ratio(v.get("load_artifact"), v.get("load_bf16")) for b, v in sorted(by_blocks.items())}


def summarize(compress: list[dict], loads: list[dict], shapes: dict, args) -> dict:
    streamed = sorted((r for r in compress if r["path"] == "streaming" and r["ok"]), key=lambda r: r["blocks"])
    shallow, deep = (streamed[0], streamed[-1]) if len(streamed) > 1 else (None, streamed[-1] if streamed else None)
    increase = _ratio(deep["peak_rss_bytes"], shallow["peak_rss_bytes"], 1.0) if shallow else None
    over_block = {str(r["blocks"]): r["peak_over_block_fp32"] for r in streamed}
    load_ratio, call_ratio = load_ratios(loads, "seconds_until_read"), load_ratios(loads, "seconds")
    checks = [_check("depth_doubling_rss_increase", increase, CRITERIA["depth_doubling_rss_increase"],
                     f"streaming peak RSS, {deep['blocks'] if deep else '?'} vs "
                     f"{shallow['blocks'] if shallow else '?'} blocks, minus 1")]
    checks += [_check("streaming_peak_over_block_fp32", v, CRITERIA["streaming_peak_over_block_fp32"],
                      f"{b} blocks") for b, v in over_block.items()]
    checks += [_check("load_artifact_over_bf16_seconds", v, CRITERIA["load_artifact_over_bf16_seconds"],
                      f"{b} blocks, load call + one read of every tensor") for b, v in load_ratio.items()]
    rows_per_run = len(args.seeds) * args.batch_size * args.steps
    return {"depth_doubling_rss_increase": increase,
            "depths_compared": [shallow["blocks"], deep["blocks"]] if shallow else None,
            "streaming_peak_over_block_fp32": over_block, "load_artifact_over_bf16_seconds": load_ratio,
            "load_artifact_over_bf16_seconds_call_only": call_ratio,
            "criteria": checks,
            "projection": projections(deep, shapes, shapes["bench"][-1]["tokens_per_row"], rows_per_run)}


# ------------------------------------------------------------------------------------------------ output

def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _num(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def projection_text(proj: dict, small: bool) -> list[str]:
    c = proj["calibration"]
    setting = (f"calibration {c['rows']} rows (seeds x batch x steps) of {c['tokens_per_row']} tokens "
               f"({c['image_tokens_per_row']} image + {c['text_tokens_per_row']} text)")
    if "flux1_dev" not in proj:
        return [f"Projection: not available ({proj['note']}); {setting}."]
    f, q = proj["flux1_dev"], proj["qwen_image"]
    qwen_whole = "" if q["model_fp32_bytes"] is None else \
        f"; the whole model is {_gib(q['model_fp32_bytes'])} GiB in fp32"
    row_1024 = sum(FLUX_1024PX_TOKENS.values())
    lines = [(f"Projection from the {proj['from_blocks']}-block streaming run ({setting}; fixed overhead "
              f"{proj['fixed_overhead_seconds']:.1f} s = process wall time minus the per-block seconds):"), "",
             (f"- FLUX.1-dev ({f['double']} double + {f['single']} single blocks): peak RSS "
              f"{_gib(f['peak_rss_bytes'])} GiB (the streaming peak does not grow with depth; the whole model is "
              f"{_gib(f['model_fp32_bytes'])} GiB in fp32, {_gib(f['model_bf16_bytes'])} GiB in bf16), time about "
              f"{f['seconds'] / 60:.1f} min."),
             (f"- Qwen-Image ({q['blocks']} dual-stream blocks, each {q['block_over_flux_double_params']:.3f}x a FLUX "
              f"double block's parameters, its time scaled by that ratio): peak RSS {_gib(q['peak_rss_bytes'])} GiB"
              f"{qwen_whole}, time about {q['seconds'] / 60:.1f} min."),
             ("- Time scales with calibration: the captured forwards and GPTQ's Hessian accumulation grow linearly "
              "with the calibration tokens (rows x tokens per row); a 1024 px FLUX row has "
              f"{FLUX_1024PX_TOKENS['image']} image + {FLUX_1024PX_TOKENS['text']} text tokens, "
              f"{row_1024 / c['tokens_per_row']:.0f}x this run's. GPTQ's per-layer solve does not depend on the "
              "token count. The projected peak holds at this calibration setting.")]
    if q["assumption"]:
        lines.append(f"- Assumption: {q['assumption']}.")
    if small:
        lines.append("- A --small run (hidden width far below FLUX's): its per-block times, and so the projected "
                     "times, are not representative.")
    return lines


def _failure(row: dict) -> str:
    """A failed row's table cell: why, and the last line of its error output (a Python error's message)."""
    lines = (row["error"] or "").strip().splitlines()
    return f"failed ({row['failure']})" + (": " + lines[-1][:160].replace("|", "/") if lines else "")


def compress_table(rows: list[dict]) -> list[str]:
    lines = [("| path | blocks (double+single) | peak RSS GiB | block fp32 GiB | peak / block fp32 | seconds "
              "| s/double | s/single |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ok"]:
            cells = [_gib(r["peak_rss_bytes"]), _gib(r["block_fp32_bytes"]), _num(r["peak_over_block_fp32"], ".2f"),
                     _num(r["seconds"]), _num(r["seconds_per_double_block"], ".2f"),
                     _num(r["seconds_per_single_block"], ".2f")]
        else:
            cells = [_failure(r)] + [""] * 5
        lines.append(f"| {r['path']} | {r['blocks']} ({r['double']}+{r['single']}) | " + " | ".join(cells) + " |")
    return lines


def load_table(rows: list[dict]) -> list[str]:
    lines = [("| load | blocks | seconds (load call) | seconds (+ one read of every tensor) | peak RSS GiB "
              "| on disk GiB |"), "|---|---|---|---|---|---|"]
    for r in rows:
        what = r["path"] + (f" ({r['artifact_of']} artifact)" if r["artifact_of"] else "")
        if r["ok"]:
            cells = [_num(r["seconds"], ".2f"), _num(r["seconds_until_read"], ".2f"), _gib(r["peak_rss_bytes"]),
                     _gib(r["bytes_on_disk"])]
        else:
            cells = [_failure(r)] + [""] * 3
        lines.append(f"| {what} | {r['blocks']} | " + " | ".join(cells) + " |")
    return lines


def criteria_lines(checks: list[dict]) -> list[str]:
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    return [f"- {verdict[c['pass']]}: {c['criterion']} ({c['what']}) = {_num(c['value'], '.3f')}, limit {c['limit']}"
            for c in checks]


def markdown(res: dict) -> str:
    env, summary = res["environment"], res["summary"]
    m = res["models"][0] if res["models"] else {}
    head = (f"Random FLUX-width transformers (hidden {m.get('hidden')} = {m.get('heads')} heads x "
            f"{m.get('head_dim')}, MLP {m.get('mlp_hidden')}), W4A8 recipe passes with GPTQ, synthetic calibration, "
            f"fp32 on CPU, {env['threads']} threads, {env['date']}: `{env['command']}`")
    lines = ["# Memory: block-by-block streaming compression vs the whole model (issue 6)", "", head, "",
             *compress_table(res["rows"]), "", *load_table(res["load_rows"]), "", "Criteria:", "",
             *criteria_lines(summary["criteria"]), "",
             *projection_text(summary["projection"], res["settings"]["small"])]
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    return {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "git": git.stdout.strip() + ("-dirty" if dirty.stdout.strip() else ""),
            "threads": args.threads, "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "python": platform.python_version(),
            **{pkg: metadata.version(pkg) for pkg in ("torch", "diffusers", "dicompress")}}


def write_results(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")


def run(args) -> dict:
    t0 = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    res = {"environment": environment(args), "settings": {
        "small": args.small, "depths": args.depths, "paths": args.paths, "naive_depths": args.naive_depths,
        "streaming_key": not args.no_streaming_key,
        "passes": W4A8_PASSES, "calibration": {"source": "synthetic", "seeds": args.seeds, "steps": args.steps,
                                                "batch_size": args.batch_size}, "model_seed": args.model_seed},
        "models": [], "rows": [], "load_rows": []}
    partial = args.out.with_suffix(".partial.json")   # a crash late in the run keeps the rows so far
    try:
        configs = [flux_config(d, s, args.small) for d, s in args.depths]
        shapes = run_worker(args, work / "shapes", "shapes", json.dumps(configs))
        for (n_double, n_single), stats in zip(args.depths, shapes["bench"]):
            model = build_model(args, n_double, n_single, stats, work)
            res["models"].append(model)
            for path in args.paths:
                if path == "naive" and args.naive_depths and n_double + n_single not in args.naive_depths:
                    continue
                res["rows"].append(compress_row(args, model, path, work))
                write_results(res, partial)
            res["load_rows"] += load_rows(args, model, res["rows"], work)
            write_results(res, partial)
        res["shapes"] = {k: v for k, v in shapes.items() if k != "run"}
        res["summary"] = summarize(res["rows"], res["load_rows"], shapes, args)
        res["environment"]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        if args.keep:
            print(f"kept the work directory {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if not any(args.work_dir.iterdir()):
                args.work_dir.rmdir()
    partial.unlink(missing_ok=True)
    return res


def _depth(text: str) -> tuple[int, int]:
    double, single = text.split(":")
    return int(double), int(single)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/memory.json", help="JSON results (and the .md beside it)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL (so torch) threads of every child")
    ap.add_argument("--small", action="store_true", help="4 heads x 64 instead of 24 x 128: a quick harness check")
    ap.add_argument("--depths", type=_depth, nargs="+", default=[(2, 4), (4, 8)], metavar="DOUBLE:SINGLE",
                    help="model depths, shallow to deep (default: 2:4 4:8)")
    ap.add_argument("--paths", type=lambda s: s.split(","), default=["streaming", "naive"],
                    help="comma-separated, of: streaming, naive")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                    help="calibration seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=2, help="calibration sampling steps")
    ap.add_argument("--batch-size", type=int, default=2, help="calibration batch size")
    ap.add_argument("--model-seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench/.work_memory",
                    help="models, artifacts and logs go in a fresh run-* directory here")
    ap.add_argument("--keep", action="store_true", help="keep the run's work directory")
    ap.add_argument("--naive-depths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    metavar="BLOCKS", help="run the naive (whole model) path only at these total block counts, "
                                           "comma-separated (default: at every depth)")
    ap.add_argument("--load-repeats", type=int, default=3, help="loads of each kind (fresh process each); medians")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per child before it is killed")
    ap.add_argument("--no-streaming-key", action="store_true",
                    help="debugging: leave the recipe's `streaming` key out (every path then runs the default)")
    args = ap.parse_args(argv)
    unknown = set(args.paths) - set(STREAMING_KEY)
    if unknown:
        ap.error(f"unknown path(s) {sorted(unknown)}; choose from {sorted(STREAMING_KEY)}")
    return args


def main():
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
        return
    args = parse_args()
    res = run(args)
    write_results(res, args.out)
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
