"""Memory of quantize-on-load (issue 20 item 2) vs a plain load of the same checkpoint.

    python tools/bench_on_load.py --out bench/on_load.json [--heads 24] [--double 1] [--single 2] [--shard 400MB]

Builds a random FluxTransformer2DModel (default FLUX.1-dev's width: 24 heads x 128 = hidden 3072; 1 double + 2
single blocks), saves it as sharded bf16 safetensors, then loads it in fresh subprocesses, one per row:
  bf16      from_pretrained(dir, torch_dtype=bfloat16)                    (what FLUX.1-dev users do)
  fp32      from_pretrained(dir, torch_dtype=float32)
  rtn4      from_pretrained(dir, torch_dtype=bfloat16, quantization_config=DicompressConfig(passes=[rtn 4-bit]))
  tlq4      the same with tlq 4-bit per channel (optional row: --rows ... tlq4)
Each child reads every tensor once after loading (diffusers may hand out lazy memory maps) and reports: load
seconds, peak RSS (VmHWM: includes the memory-mapped checkpoint pages a load touches, which are page cache the
kernel can drop), peak anonymous RSS (RssAnon sampled every 2 ms: memory that only the process holds), RSS
after loading, and the model's tensor bytes. One thread per child.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD = """
import sys, torch
torch.set_num_threads(1)
from diffusers import FluxTransformer2DModel
heads, double, single, shard, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
with torch.device("cpu"):
    m = FluxTransformer2DModel(num_layers=double, num_single_layers=single, num_attention_heads=heads,
                               attention_head_dim=128).to(torch.bfloat16)
m.save_pretrained(out, max_shard_size=shard)
print(sum(p.numel() for p in m.parameters()))
"""

CHILD = """
import sys, json, time, threading, gc, torch
torch.set_num_threads(1)
def status():
    return {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') if l.split(':')[0] in
            ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile')}
import dicompress
from diffusers import FluxTransformer2DModel
from dicompress.io.diffusers_plugin import DicompressConfig
row, path = sys.argv[1], sys.argv[2]
# every row imports the same modules before the baseline is taken (the quantizers' first use imports more)
from dicompress.io.on_load import OnLoadQuantizer
from dicompress.quant.uniform import rtn_quantize
rtn_quantize(torch.randn(8, 64), 4)
peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], status()['RssAnon'])
        time.sleep(0.002)
start = status()
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
kw = {"torch_dtype": torch.float32 if row == "fp32" else torch.bfloat16}
if row in ("rtn4", "tlq4"):
    kw["quantization_config"] = DicompressConfig(passes=[{row[:3]: {"bits": 4}}])
m = FluxTransformer2DModel.from_pretrained(path, **kw)
load_s = time.perf_counter() - t0
touched = sum(float(x.float().sum()) for x in m.state_dict().values())   # read every tensor once
gc.collect()
stop[0] = True; t.join()
end = status()
tensor_bytes = sum(x.numel() * x.element_size() for x in m.state_dict().values())
mib = lambda kb: round(kb / 1024, 1)
print(json.dumps({"row": row, "load_s": round(load_s, 2), "peak_rss_mib": mib(end['VmHWM']),
                  "peak_anon_mib": mib(peak[0]), "start_anon_mib": mib(start['RssAnon']),
                  "anon_growth_peak_mib": mib(peak[0] - start['RssAnon']),
                  "rss_after_mib": mib(end['VmRSS']), "tensor_mib": round(tensor_bytes / 2**20, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--shard", default="400MB")
    ap.add_argument("--rows", nargs="+", default=["bf16", "fp32", "rtn4"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-on-load-") as tmp:
        ckpt = Path(tmp) / "model"
        built = subprocess.run([sys.executable, "-c", BUILD, str(a.heads), str(a.double), str(a.single), a.shard,
                                str(ckpt)], capture_output=True, text=True, check=True)
        params = int(built.stdout.strip().splitlines()[-1])
        shards = len(list(ckpt.glob("*.safetensors")))
        rows = []
        for row in a.rows:
            out = subprocess.run([sys.executable, "-c", CHILD, row, str(ckpt)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"model": {"heads": a.heads, "hidden": a.heads * 128, "double": a.double, "single": a.single,
                        "parameters": params, "bf16_mib": round(params * 2 / 2**20, 1), "shards": shards},
              "rows": rows, "command": " ".join(["python", "tools/bench_on_load.py", *sys.argv[1:]])}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["model"]))


if __name__ == "__main__":
    main()
