"""How closely a LoRA's effect on a compressed model matches its effect on the original (issue 20 item 1).

    dicompress run recipes/tiny_flux_w4.yaml --output out/tiny_flux_w4 --set eval.enabled=false
    dicompress run recipes/tiny_flux_w4a8.yaml --output out/tiny_flux_w4a8 --set eval.enabled=false
    python tools/bench_lora.py --artifacts out/tiny_flux_w4 out/tiny_flux_w4a8 --scales 0.1 0.3 1.0 --out bench/lora.json

Each ARTIFACT is a dicompress artifact of the embedded model (e.g. from `dicompress run recipes/tiny_flux_w4.yaml`
and `recipes/tiny_flux_w4a8.yaml`). A random LoRA (peft, rank --rank on every attention / FFN / modulation linear,
B drawn like A and scaled by each of --scales) is made on the original model and saved with FluxPipeline.save_lora_weights.
For each artifact the LoRA is loaded three ways and its effect (output with LoRA minus output without, on
--batch synthetic inputs) compared with the original's: ||effect - effect_original|| / ||effect_original||.
  dicompress          pipe.load_lora_weights on the artifact as loaded (the branch on the original input)
  folds_ignored       the same, with the recorded fold scales dropped (the branch on what the linears see: what
                      a LoRA layer that ignores folded smoothing computes)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
           "norm1.linear", "norm1_context.linear", "norm.linear"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", nargs="+", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="B is drawn like A, times this")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import dicompress  # noqa: F401  (registers the loaders)
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from dicompress.arch import adapter_for
    from dicompress.io.verify import read_config
    from dicompress.lora.layer import CompressedLoraLinear
    from dicompress.models import resolve_model

    source = read_config(a.artifacts[0])["quantization_config"]["source"]["model"]
    original = resolve_model(source).path
    none = dict.fromkeys(["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])

    def out(model, kw):
        with torch.no_grad():
            return model(**kw).sample

    def effect(model, lora_dir, how="dicompress"):
        model.eval()
        kw = adapter_for(model).synthetic_inputs(model, a.batch, torch.Generator().manual_seed(3))
        base = out(model, kw)
        FluxPipeline(transformer=model, **none).load_lora_weights(lora_dir)
        if how == "folds_ignored":
            for m in model.modules():
                if isinstance(m, CompressedLoraLinear):
                    m.fold_in = m.fold_out = None
        return out(model, kw) - base, base

    runs = []
    for scale in a.scales:
        with tempfile.TemporaryDirectory() as tmp:
            lora = FluxTransformer2DModel.from_pretrained(original)
            torch.manual_seed(0)
            lora.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=TARGETS, init_lora_weights=False))
            with torch.no_grad():
                for m in lora.modules():
                    if hasattr(m, "lora_B"):
                        m.lora_B["default"].weight.mul_(scale)
            FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(lora))
            ref, base = effect(FluxTransformer2DModel.from_pretrained(original), tmp)
            rows = []
            for art in a.artifacts:
                row = {"artifact": str(art), "effect_over_output": round(float(ref.norm() / base.norm()), 4)}
                for how in ("dicompress", "folds_ignored"):
                    e, _ = effect(FluxTransformer2DModel.from_pretrained(art), tmp, how)
                    row[how] = round(float((e - ref).norm() / ref.norm()), 4)
                rows.append(row)
                print(json.dumps({"scale": scale, **row}), flush=True)
            runs.append({"scale": scale, "rows": rows})
    result = {"source": source, "rank": a.rank, "batch": a.batch, "runs": runs,
              "note": "CPU fp32, 1 thread; relative error of the LoRA's effect (output with LoRA minus without) on "
                      "the artifact vs on the original; folds_ignored: the branch on what the compressed linears see",
              "command": " ".join(["python", "tools/bench_lora.py", *sys.argv[1:]])}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
