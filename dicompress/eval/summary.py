"""Plain-text summary of a run report (the dict written as report.json). Every section is optional."""
from __future__ import annotations

import math

MAX_FULL_LAYERS = 40       # print every layer up to this many ...
WORST, BEST = 10, 5        # ... else the worst and best by SQNR

LABELS = {  # column / row names; unknown keys are shown as they are
    "pass": "pass", "layers_quantized": "layers", "mean_sqnr_db": "mean SQNR dB", "min_sqnr_db": "min SQNR dB",
    "seconds": "seconds", "module": "module", "method": "method", "bits": "bits", "group_size": "group",
    "sqnr_db": "SQNR dB", "shape": "shape",
}
METRIC_ROWS = [  # (key, label); `key + "_teacher"` is the teacher column
    ("psnr_db", "PSNR vs teacher dB"), ("class_acc", "class accuracy"), ("frechet", "Frechet distance"),
    ("latency_ms_per_step", "latency ms/step"),
    ("latency_ms_per_step_int8", "latency ms/step, forced GEMM mode int8"),
]
METRIC_META = {"samples", "steps", "latency_ratio", "latency_gemm_mode"}


def fmt_value(v, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return "x".join(str(s) for s in v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if key.endswith("_db") or key.startswith("latency") or key in ("frechet", "frechet_teacher"):
            return f"{v:.2f}"
        if key.startswith("class_acc"):
            return f"{v:.3f}"
        if key == "seconds":
            return f"{v:.1f}"
        return f"{v:.4g}"
    return str(v)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def table(headers: list[str], rows: list[list[str]], indent: str = "  ", left: set[int] = frozenset({0})) -> list[str]:
    """Fixed-width columns: those in `left` left-aligned (text), the others right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        parts = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _columns(records: list[dict], first: str) -> list[str]:
    keys = [first] if any(first in r for r in records) else []
    for r in records:
        keys += [k for k in r if k not in keys]
    return keys


def _records_table(records: list[dict], first: str) -> list[str]:
    cols = _columns(records, first)
    text = {i for i, k in enumerate(cols) if any(isinstance(r.get(k), str) for r in records)}
    return table([LABELS.get(k, k) for k in cols], [[fmt_value(r.get(k), k) for k in cols] for r in records],
                 left=text | {0})


def _header(report: dict) -> list[str]:
    rows = [(k, report[k]) for k in ("model", "recipe", "output") if report.get(k) is not None]
    w = max((len(k) for k, _ in rows), default=0)
    return [f"  {k.ljust(w)}  {v}" for k, v in rows]


def _passes(passes: list[dict]) -> list[str]:
    """One line per pass: its name and time, then what it measured (the full config stays in report.json;
    passes report different keys, so a shared table would be mostly empty columns)."""
    lines = ["passes"]
    width = max((len(str(p.get("pass", ""))) for p in passes), default=0)
    for p in passes:
        secs = fmt_value(p.get("seconds"), "seconds")
        facts = ", ".join(f"{LABELS.get(k, k)} {fmt_value(v, k)}" for k, v in p.items()
                          if k not in ("pass", "seconds", "config")
                          and not (isinstance(v, (list, dict)) and len(str(v)) > 80))   # curves stay in report.json
        lines.append(f"  {str(p.get('pass', '?')).ljust(width)}  {secs:>6} s  {facts}".rstrip())
    return lines


def _metric_label(m: dict, key: str, label: str) -> str:
    """The latency row names the GEMM mode the student was measured in (auto resolves per machine, so the
    number means little without it)."""
    if key == "latency_ms_per_step" and m.get("latency_gemm_mode"):
        return f"{label} (GEMM mode {m['latency_gemm_mode']})"
    return label


def _metrics(m: dict) -> list[str]:
    extra = [(k, k) for k in m if k not in METRIC_META and not k.endswith("_teacher")
             and k not in {key for key, _ in METRIC_ROWS}]
    rows = [[_metric_label(m, k, label), fmt_value(m.get(k), k), fmt_value(m.get(k + "_teacher"), k)]
            for k, label in METRIC_ROWS + extra if k in m or k + "_teacher" in m]
    if "latency_ratio" in m:
        rows.append(["latency student/teacher", fmt_value(m["latency_ratio"], "latency_ratio") + "x", ""])
    plan = ", ".join(f"{m[k]} {k}" for k in ("samples", "steps") if k in m)
    return [f"quality ({plan})" if plan else "quality", *table(["metric", "student", "teacher"], rows)]


def _stages(stages: list[dict]) -> list[str]:
    """Quality after each stage of a recipe that restructured the model and went on (each vs the original)."""
    keys = [k for k, _ in METRIC_ROWS[:3]]
    rows = [[s["after"], *(fmt_value((s.get("metrics") or {}).get(k), k) for k in keys)] for s in stages]
    return ["quality after each stage (vs the original model)",
            *table(["after", *(label for _, label in METRIC_ROWS[:3])], rows)]


def _ratio(size, bf16) -> str:
    return f"{size / bf16:.2f}x" if size and bf16 else "-"


def _footprint(f: dict) -> list[str]:
    rows = []
    if "bytes_quantized_linears" in f or "bytes_quantized_linears_bf16" in f:
        q, qb = f.get("bytes_quantized_linears"), f.get("bytes_quantized_linears_bf16")
        ratio = f"{f['ratio_quantized_linears']:.2f}x" if f.get("ratio_quantized_linears") else _ratio(q, qb)
        rows.append(["quantized linears", fmt_bytes(q), fmt_bytes(qb), ratio])
    if "bytes_total" in f or "bytes_total_bf16" in f:
        t, tb = f.get("bytes_total"), f.get("bytes_total_bf16")
        rows.append(["whole model (memory)", fmt_bytes(t), fmt_bytes(tb), _ratio(t, tb)])
    if "bytes_on_disk" in f:
        d, tb = f["bytes_on_disk"], f.get("bytes_total_bf16")
        rows.append(["on disk", fmt_bytes(d), fmt_bytes(tb), _ratio(d, tb)])
    return ["footprint (bf16 = the uncompressed teacher in bf16)",
            *table(["", "size", "bf16", "size / bf16"], rows)]


def _sqnr_key(r: dict) -> float:
    v = r.get("sqnr_db")
    return math.inf if v is None else v  # unknown SQNR sorts after the best


# the per-layer columns the summary prints, when present (report.json keeps every key)
LAYER_COLUMNS = ("module", "method", "shape", "bits", "group_size", "eta", "percentile", "sqnr_db", "output_sqnr_db",
                 "J", "transform", "smoothing", "act_bits", "act_absmax", "act_rms", "importance", "importance_rank",
                 "cka_image", "cka_text")


# structural rows (width pruning: one per pruned block) have their own section and columns: the kept widths
BLOCK_COLUMNS = ("module", "method", "stream", "heads", "ff", "ff_context", "mlp", "img_mlp", "txt_mlp",
                 "params_before", "params_after", "removed_fraction")


def _is_block_row(r: dict) -> bool:
    return "params_before" in r and "params_after" in r


def _blocks(rows: list[dict]) -> list[str]:
    rows = [{k: r[k] for k in BLOCK_COLUMNS if k in r} for r in rows]
    return [f"blocks restructured ({len(rows)}; heads and FFN widths kept/before)", *_records_table(rows, "module")]


def _layers(layers: list[dict]) -> list[str]:
    layers = [{k: r[k] for k in LAYER_COLUMNS if k in r} for r in layers]
    ordered = sorted(layers, key=_sqnr_key)
    if len(ordered) <= MAX_FULL_LAYERS:
        return [f"layers ({len(ordered)}, sorted by SQNR, worst first)", *_records_table(ordered, "module")]
    shown = ordered[:WORST] + ordered[-BEST:]
    lines = _records_table(shown, "module")
    gap = f"  ... {len(ordered) - WORST - BEST} more ..."
    return [f"layers ({len(ordered)}, sorted by SQNR: the {WORST} worst and the {BEST} best)",
            *lines[:1 + WORST], gap, *lines[1 + WORST:]]


def _seconds(s: dict) -> list[str]:
    return ["time", "  " + ", ".join(f"{k} {fmt_value(float(v), 'seconds')} s" for k, v in s.items())]


def format_summary(report: dict) -> str:
    """A readable multi-section summary: header, passes, quality, footprint, per-layer SQNR, time."""
    sections = []
    head = _header(report)
    if head:
        sections.append(head)
    if report.get("passes"):
        sections.append(_passes(report["passes"]))
    if report.get("metrics"):
        sections.append(_metrics(report["metrics"]))
    if report.get("stages"):
        sections.append(_stages(report["stages"]))
    if report.get("footprint"):
        sections.append(_footprint(report["footprint"]))
    blocks = [r for r in report.get("layers") or () if _is_block_row(r)]
    layers = [r for r in report.get("layers") or () if not _is_block_row(r)]
    if blocks:
        sections.append(_blocks(blocks))
    if layers:
        sections.append(_layers(layers))
    if report.get("seconds"):
        sections.append(_seconds(report["seconds"]))
    if not sections:
        return "dicompress report\n  (empty: nothing was recorded)\n"
    return "dicompress report\n" + "\n\n".join("\n".join(s) for s in sections) + "\n"
