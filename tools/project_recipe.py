"""Project a real-model recipe as shipped: peak memory, temporary disk and time of each phase of a streamed
`dicompress run`, from the recipe, the model's config (no weights) and compute rates measured on this machine.

    python tools/project_recipe.py recipes/flux_w4a8.yaml --out bench/projection_flux_w4a8.json \
        [--set calibration.prompts=...] [--config path/to/transformer/config.json] [--gpu-tflops 400]

Writes JSON and a markdown table beside it (same name, .md).

What it counts, following the streaming code (dicompress/stream/sweep.py, calib/capture.py, calib/hessian.py):
- rows = prompts x seeds x steps (one per captured model call per sample); tokens per row = image tokens
  ((height/16) x (width/16): VAE /8, 2x2 patches) + text tokens (the family's max_sequence_length).
- capture: the sampling loop's forwards over the whole transformer, streamed block by block, storing the first
  block's inputs for every row (fp32: hidden_states + encoder_hidden_states + temb) and the model inputs.
- per block: one forward over every row (linear statistics + the next block's inputs, written to the work
  directory) and one more per Hessian phase (GPTQ's H = E[x^T x], `hessian_phases`), then per linear a GPTQ
  solve (Cholesky of the [in, in] Hessian + the column sweep, ~ in^3 + 2 out in^2 FLOPs).
- disk: the capture store + the current and the next block's inputs + the finished blocks' shards.
- memory: one block's fp32 weights + one Hessian phase + one chunk of `block_batch` rows with its activations,
  + RSS_OVERHEAD_GIB measured at FLUX width; CPU time per block + FIXED_BLOCK_CPU_SECONDS, measured there too.
- disk traffic: the bf16 checkpoint read once per streamed model call during the capture, each block's inputs
  read once per forward and the next block's written; at --disk-gbps (assumed).
- encode: the text encoders' parameters in bf16 plus one layer in fp32 (each layer computes in fp32 in turn),
  one forward per prompt at max_sequence_length tokens.
- stored block inputs in `calibration.store_dtype` (float32: 4 bytes, bfloat16: 2).

FLOPs become seconds with rates measured here in the same run (fp32 GEMM at the block's shapes, scaled dot-product
attention at the row's token count, the Cholesky at the widest Hessian); the GPU figure uses --gpu-tflops (bf16
dense, sustained), which is NOT measured unless you measured it: the output says which it is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
FP32 = 4
# What the FLOP count leaves out, measured at FLUX width (bench/flux_width.md: 1 double + 1 single block, 4 rows of
# 768 tokens, this project's AVX2 CPU, 2 threads): per block, measured seconds minus the FLOP model's (TLQ's grid
# search, the rotations, Python per layer: costs per layer, not per token), and the run's peak RSS minus the
# projected block memory (interpreter, libraries, temporaries). Not measured on a GPU: the GPU column leaves
# the per-layer costs out.
FIXED_BLOCK_CPU_SECONDS = {"double": 240.0, "single": 110.0}
RSS_OVERHEAD_GIB = 1.45

# the public configs of the families' released transformers (their config.json), and their text encoders
FAMILIES = {
    "black-forest-labs/FLUX.1-dev": {
        "class": "FluxTransformer2DModel",
        "config": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
        "text_tokens": 512,                                # FluxPipeline max_sequence_length (T5)
        # parameters, layers (the encode stage keeps them in bf16 and computes each layer in fp32)
        "encoders": {"t5-v1_1-xxl (encoder)": (4.762e9, 24), "clip-vit-large (text)": (1.23e8, 12)},
    },
    "Qwen/Qwen-Image": {
        "class": "QwenImageTransformer2DModel",
        "config": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                   "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]},
        "text_tokens": 256,          # a long calibration prompt after the template (QwenImagePipeline allows 1024)
        "encoders": {"qwen2.5-vl-7b (language model)": (7.07e9, 28)},
    },
}


# ---------------------------------------------------------------------------------------------- model shapes
def meta_model(class_name: str, config: dict) -> nn.Module:
    import diffusers
    cls = getattr(diffusers, class_name)
    with torch.device("meta"):
        return cls.from_config(config)


def block_linears(model: nn.Module) -> dict[str, list[tuple[str, int, int, bool]]]:
    """{block kind: [(linear, in, out, per token)]} for the first block of each kind; per token: False for the
    AdaLN modulation linears, which read the timestep embedding (one vector per row)."""
    from dicompress.arch import adapter_for
    out = {}
    for ref in adapter_for(model).blocks(model):
        if ref.stream in out:
            continue
        block = model.get_submodule(ref.name)
        out[ref.stream] = [(n, m.in_features, m.out_features, "norm" not in n)
                           for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    return out


def block_counts(model: nn.Module) -> dict[str, int]:
    from dicompress.arch import adapter_for
    counts: dict[str, int] = {}
    for ref in adapter_for(model).blocks(model):
        counts[ref.stream] = counts.get(ref.stream, 0) + 1
    return counts


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- the projection
def quantized(name: str, include_norm: bool = False) -> bool:
    return include_norm or "norm" not in name


def hessian_phase_count(linears, budget: int) -> int:
    from dicompress.calib.hessian import hessian_phases

    class L:                                                 # the shape is all hessian_phases reads
        def __init__(self, i):
            self.in_features = i
    q = {n: L(i) for n, i, o, tok in linears if quantized(n)}
    return len(hessian_phases(q, budget))


def project(recipe, family: dict, model: nn.Module, rates: dict) -> dict:
    from dicompress.calib.hessian import PHASE_BYTES
    from dicompress.calib.sources import read_prompts
    cfg = recipe.calibration
    prompts = len(read_prompts(cfg.prompts)) if cfg.source == "prompts" else cfg.batch_size
    rows = prompts * len(cfg.seeds) * cfg.steps
    img_tokens = (cfg.height // 16) * (cfg.width // 16)
    txt_tokens = family["text_tokens"]
    tokens = img_tokens + txt_tokens
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    block_batch = cfg.block_batch or cfg.batch_size

    kinds = block_linears(model)
    counts = block_counts(model)
    blocks = sum(counts.values())
    block_params = {k: sum(i * o for _, i, o, _ in ls) for k, ls in kinds.items()}
    token_params = {k: sum(i * o for _, i, o, tok in ls if tok) for k, ls in kinds.items()}
    # one row through one block: 2 FLOPs per multiply-add of the per-token linears; attention QK^T and AV
    linear_flops_row = {k: 2 * p * tokens for k, p in token_params.items()}
    attn_flops_row = 4 * tokens * tokens * hidden
    stored = 2 if getattr(cfg, "store_dtype", "float32") == "bfloat16" else FP32
    row_input_bytes = (tokens + 1) * hidden * stored          # hidden + encoder hidden states + temb
    phases = {k: hessian_phase_count(ls, PHASE_BYTES) for k, ls in kinds.items()}
    widest = max(i for ls in kinds.values() for _, i, _, _ in ls)
    solve_flops = {k: sum(i ** 3 + 2 * o * i * i for n, i, o, _ in ls if quantized(n)) for k, ls in kinds.items()}

    def seconds(lin, attn, solve=0.0, where="cpu"):
        if where == "cpu":
            return lin / rates["cpu_gemm_flops"] + attn / rates["cpu_sdpa_flops"] + solve / rates["cpu_solve_flops"]
        return (lin + attn + solve) / rates["gpu_flops"]

    # whole-model forwards of the sampling loop (CFG is distilled into FLUX-dev's guidance embedding: one
    # forward per step; the pipeline's other parts -- embedders, the final layer -- are < 1% and left out)
    cap_lin = rows * sum(counts[k] * linear_flops_row[k] for k in counts)
    cap_attn = rows * blocks * attn_flops_row
    per_block = {}
    for k in kinds:
        forwards = 1 + phases[k]
        per_block[k] = {"forwards_over_all_rows": forwards, "hessian_phases": phases[k],
                        "linear_flops": forwards * rows * linear_flops_row[k],
                        "attention_flops": forwards * rows * attn_flops_row, "gptq_solve_flops": solve_flops[k]}
    blocks_lin = sum(counts[k] * per_block[k]["linear_flops"] for k in kinds)
    blocks_attn = sum(counts[k] * per_block[k]["attention_flops"] for k in kinds)
    blocks_solve = sum(counts[k] * solve_flops[k] for k in kinds)
    fixed_cpu = sum(counts[k] * FIXED_BLOCK_CPU_SECONDS.get(k, max(FIXED_BLOCK_CPU_SECONDS.values()))
                    for k in kinds)

    store_bytes = rows * row_input_bytes                      # the first block's inputs (+ model inputs, small)
    model_in_bytes = rows * (img_tokens * model.config.in_channels + txt_tokens * model.config.joint_attention_dim
                             + 3 * 768) * FP32
    acts_bytes = rows * row_input_bytes                       # one block boundary's inputs in the work directory
    artifact_bytes = params_of(model) // 2 + sum(counts[k] * sum(o for _, _, o, _ in kinds[k]) for k in kinds) * 8
    largest_block = max(block_params.values()) * FP32
    chunk = block_batch * row_input_bytes
    # activations of one block forward on a chunk: the MLP's hidden (x3: input, GELU, output) dominates
    mlp_act = block_batch * tokens * max(o for ls in kinds.values() for _, _, o, tok in ls if tok) * FP32 * 3
    hess_phase_bytes = max(PHASE_BYTES, widest * widest * FP32)
    block_rss = largest_block + hess_phase_bytes + 2 * chunk + mlp_act + RSS_OVERHEAD_GIB * GIB
    enc = family["encoders"]
    # stored in bf16, each layer upcast to fp32 while it runs (calib/prompt_encoding.py compute_in)
    enc_bytes = {n: p * 2 + p / layers * FP32 for n, (p, layers) in enc.items()}
    enc_flops = {n: 2 * p * txt_tokens * prompts for n, (p, _) in enc.items()}

    phases_out = {
        "encode": {"peak_gib": sum(enc_bytes.values()) / GIB,
                   "cpu_seconds": sum(enc_flops.values()) / rates["cpu_gemm_flops"],
                   "gpu_seconds": sum(enc_flops.values()) / rates["gpu_flops"]},
        "capture": {"model_forwards": rows, "flops": cap_lin + cap_attn,
                    "store_gib": (store_bytes + model_in_bytes) / GIB,
                    "peak_gib": block_rss / GIB,
                    "cpu_seconds": seconds(cap_lin, cap_attn), "gpu_seconds": seconds(cap_lin, cap_attn, where="gpu")},
        "blocks": {"per_block": per_block, "flops": blocks_lin + blocks_attn + blocks_solve,
                   "work_dir_gib": 2 * acts_bytes / GIB, "peak_gib": block_rss / GIB,
                   "cpu_seconds": seconds(blocks_lin, blocks_attn, blocks_solve) + fixed_cpu,
                   "cpu_fixed_seconds": fixed_cpu,
                   "gpu_seconds": seconds(blocks_lin, blocks_attn, blocks_solve, where="gpu")},
        "write": {"artifact_gib": artifact_bytes / GIB},
    }
    # disk traffic: a streamed capture reads every block from the bf16 checkpoint once per model call; the block
    # phase reads each block once, its inputs once per forward, and writes the next block's inputs
    calls = cfg.steps * len(cfg.seeds) * -(-prompts // cfg.batch_size)
    ckpt = params_of(model) * 2
    io = {"capture_read_gib": calls * ckpt / GIB, "capture_write_gib": (store_bytes + model_in_bytes) / GIB,
          "blocks_read_gib": (ckpt + sum(counts[k] * per_block[k]["forwards_over_all_rows"] for k in kinds)
                              * acts_bytes) / GIB,
          "blocks_write_gib": blocks * acts_bytes / GIB + artifact_bytes / GIB}
    io_seconds = sum(io.values()) * GIB / rates["disk_bytes_per_s"]
    phases_out["io"] = {**io, "model_calls": calls, "cpu_seconds": io_seconds, "gpu_seconds": io_seconds}
    total = {w: sum(p.get(f"{w}_seconds", 0.0) for p in phases_out.values()) for w in ("cpu", "gpu")}
    return {
        "calibration": {"rows": rows, "prompts": prompts, "seeds": len(cfg.seeds), "steps": cfg.steps,
                        "image_tokens": img_tokens, "text_tokens": txt_tokens, "block_batch": block_batch,
                        "row_block_input_mib": row_input_bytes / 2 ** 20,
                        "store_dtype": getattr(cfg, "store_dtype", "float32")},
        "model": {"blocks": counts, "params": params_of(model), "fp32_gib": params_of(model) * FP32 / GIB,
                  "largest_block_fp32_gib": largest_block / GIB, "widest_linear_in": widest},
        "phases": phases_out,
        "peak_rss_gib": max(phases_out["encode"]["peak_gib"], block_rss / GIB),
        "temp_disk_gib": (store_bytes + model_in_bytes + 2 * acts_bytes + artifact_bytes) / GIB,
        "hours": {w: s / 3600 for w, s in total.items()},
    }


# ---------------------------------------------------------------------------------------------- rates
def _timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure_cpu_rates(hidden: int, tokens: int, heads: int, head_dim: int, widest: int, threads: int) -> dict:
    """fp32 FLOP/s of this CPU at the projection's shapes (torch, `threads` threads)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    m = min(tokens, 4096)
    x, w = torch.randn(m, hidden, generator=g), torch.randn(4 * hidden, hidden, generator=g)
    gemm = 2 * m * hidden * 4 * hidden / _timed(lambda: x @ w.T, 3)
    t = min(tokens, 2048)               # attention is quadratic: time a shorter sequence, same per-FLOP cost
    q = torch.randn(1, heads, t, head_dim, generator=g)
    sdpa = 4 * t * t * heads * head_dim / _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), 2)
    n = min(widest, 4096)
    a = torch.randn(n, n, generator=g)
    h = a @ a.T + n * torch.eye(n)
    solve = (n ** 3 / 3) / _timed(lambda: torch.linalg.cholesky(h), 2)
    return {"cpu_gemm_flops": gemm, "cpu_sdpa_flops": sdpa, "cpu_solve_flops": solve, "threads": threads,
            "shapes": {"gemm": [m, hidden, 4 * hidden], "sdpa_tokens": t, "cholesky": n}}


# ---------------------------------------------------------------------------------------------- output
def markdown(res: dict, cmd: str) -> str:
    c, p, r = res["calibration"], res["phases"], res["rates"]
    lines = [f"# Projection: `{res['recipe']}` on {res['model_id']}", "",
             f"`{cmd}` ({res['date']}, {r['cpu']}, {r['threads']} threads)", "",
             f"Calibration: {c['prompts']} prompts x {c['seeds']} seed(s) x {c['steps']} steps = {c['rows']} rows of "
             f"{c['image_tokens']} image + {c['text_tokens']} text tokens; one row's block inputs "
             f"{c['row_block_input_mib']:.1f} MiB ({c['store_dtype']}).", "",
             "| phase | peak RSS GiB | disk GiB | this CPU | GPU |", "|---|---|---|---|---|"]

    def t(s):
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"
    e = p["encode"]
    lines.append(f"| encode prompts (encoders in bf16, one layer at a time in fp32) | {e['peak_gib']:.1f} | - | "
                 f"{t(e['cpu_seconds'])} | {t(e['gpu_seconds'])} |")
    cp = p["capture"]
    lines.append(f"| capture ({cp['model_forwards']} model forwards) | {cp['peak_gib']:.1f} | {cp['store_gib']:.1f} "
                 f"(store) | {t(cp['cpu_seconds'])} | {t(cp['gpu_seconds'])} |")
    b = p["blocks"]
    fw = ", ".join(f"{k}: {v['forwards_over_all_rows']}" for k, v in b["per_block"].items())
    lines.append(f"| blocks (forwards per block over all rows: {fw}) | {b['peak_gib']:.1f} | {b['work_dir_gib']:.1f} "
                 f"(work dir) | {t(b['cpu_seconds'])} | {t(b['gpu_seconds'])} |")
    lines.append(f"| write | - | {p['write']['artifact_gib']:.1f} (artifact) | - | - |")
    io = p["io"]
    lines.append(f"| disk traffic, upper bound ({io['model_calls']} streamed model calls: "
                 f"{io['capture_read_gib']:.0f} GiB of checkpoint reads; blocks: {io['blocks_read_gib']:.0f} GiB "
                 f"read, {io['blocks_write_gib']:.0f} GiB written) | - | - | {t(io['cpu_seconds'])} | "
                 f"{t(io['gpu_seconds'])} |")
    lines.append(f"| **total** | **{res['peak_rss_gib']:.1f}** | **{res['temp_disk_gib']:.1f}** | "
                 f"**{res['hours']['cpu']:.1f} h** | **{res['hours']['gpu']:.2f} h** |")
    lines += ["", f"Rates: CPU fp32 GEMM {r['cpu_gemm_flops'] / 1e9:.0f} GFLOP/s, attention "
              f"{r['cpu_sdpa_flops'] / 1e9:.0f} GFLOP/s, Cholesky {r['cpu_solve_flops'] / 1e9:.0f} GFLOP/s (measured "
              f"in this run); GPU {r['gpu_flops'] / 1e12:.0f} TFLOP/s ({r['gpu_source']}); disk "
              f"{r['disk_bytes_per_s'] / 1e9:.1f} GB/s (assumed, not measured: --disk-gbps; a page cache larger than "
              f"the checkpoint removes the repeated reads)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--config", help="the transformer's config.json (default: the recipe's model, if known)")
    ap.add_argument("--gpu-tflops", type=float, default=400.0,
                    help="sustained bf16 TFLOP/s of the GPU (default 400: an assumption for one H100/H200, "
                         "40%% of the 989 dense peak; pass a measured figure)")
    ap.add_argument("--gpu-measured", action="store_true", help="--gpu-tflops was measured (says so in the output)")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="sequential disk GB/s (default 2.0: an NVMe SSD)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from dicompress.recipe import load_recipe
    recipe = load_recipe(a.recipe, a.overrides)
    if recipe.model not in FAMILIES and not a.config:
        raise SystemExit(f"unknown model {recipe.model}: pass --config (known: {', '.join(FAMILIES)})")
    family = dict(FAMILIES.get(recipe.model) or next(iter(FAMILIES.values())))
    if a.config:
        cfg = json.loads(Path(a.config).read_text())
        family = {**family, "class": cfg["_class_name"],
                  "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}
    model = meta_model(family["class"], family["config"])
    kinds = block_linears(model)
    widest = max(i for ls in kinds.values() for _, i, _, _ in ls)
    cal = recipe.calibration
    tokens = (cal.height // 16) * (cal.width // 16) + family["text_tokens"]
    rates = measure_cpu_rates(model.config.num_attention_heads * model.config.attention_head_dim, tokens,
                              model.config.num_attention_heads, model.config.attention_head_dim, widest, a.threads)
    rates.update(gpu_flops=a.gpu_tflops * 1e12, disk_bytes_per_s=a.disk_gbps * 1e9,
                 cpu=torch.backends.cpu.get_cpu_capability(),
                 gpu_source="measured" if a.gpu_measured else "assumed, not measured: --gpu-tflops")
    res = project(recipe, family, model, rates)
    cmd = "python tools/project_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res.update(recipe=a.recipe, overrides=a.overrides, model_id=recipe.model, rates=rates, command=cmd,
               date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.machine(),
               torch=torch.__version__)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res, cmd))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
