"""Train the embedded default model: a diffusers FluxTransformer2DModel on scikit-learn's digits.

Rectified flow (flow matching): x_s = (1 - s) x0 + s * eps, the model predicts eps - x0, sigmas drawn
logit-normal. The digit class conditions the model through learned per-class `encoder_hidden_states`
and `pooled_projections` tables that ship beside it. Also trains the digit classifier used to score
samples. Reproduces dicompress/zoo/tiny_flux_digits/ on 2 CPU cores in about 35 minutes:

    python tools/train_tiny_flux.py --out dicompress/zoo/tiny_flux_digits
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from dicompress.zoo.classifier import DigitClassifier
from dicompress.zoo.digits import NUM_CLASSES, image_ids, load_digits_tensors, pack
from dicompress.zoo.sampler import DEFAULT_STEPS, Conditioning, sample

MODEL_CONFIG = dict(patch_size=1, in_channels=4, num_layers=4, num_single_layers=8, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                    guidance_embeds=False, axes_dims_rope=(8, 12, 12))
TEXT_TOKENS = 4


def train_classifier(seed: int, epochs: int = 60):
    torch.manual_seed(seed)
    xtr, ytr = load_digits_tensors("train")
    xte, yte = load_digits_tensors("test")
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), 2e-3, weight_decay=1e-4)
    for ep in range(epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            # Light noise so the classifier is not brittle on slightly imperfect generated digits.
            x = xtr[b] + 0.1 * torch.randn_like(xtr[b])
            loss = F.cross_entropy(clf(x), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    return clf, acc


def train_dit(steps: int, batch: int, lr: float, seed: int, ema_decay: float, log_every: int = 50):
    torch.manual_seed(seed)
    x0_all, y_all = load_digits_tensors("train")
    tokens_all = pack(x0_all)
    model = FluxTransformer2DModel(**MODEL_CONFIG)
    d_txt, d_pool = MODEL_CONFIG["joint_attention_dim"], MODEL_CONFIG["pooled_projection_dim"]
    cond_txt = torch.nn.Parameter(torch.randn(NUM_CLASSES, TEXT_TOKENS, d_txt))
    cond_pool = torch.nn.Parameter(torch.randn(NUM_CLASSES, d_pool))
    params = list(model.parameters()) + [cond_txt, cond_pool]
    opt = torch.optim.AdamW(params, lr, betas=(0.9, 0.99), weight_decay=0.0)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_txt, ema_pool = cond_txt.detach().clone(), cond_pool.detach().clone()
    img_ids, txt_ids = image_ids(), torch.zeros(TEXT_TOKENS, 3)
    t0, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch,))
        x0, y = tokens_all[idx], y_all[idx]
        eps = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(batch))            # logit-normal sigmas, as SD3 / FLUX training
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        pred = model(hidden_states=xs, encoder_hidden_states=cond_txt[y], pooled_projections=cond_pool[y],
                     timestep=s, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
            ema_txt.lerp_(cond_txt, 1 - d)
            ema_pool.lerp_(cond_pool, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}/{steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el:.0f}s (eta {el / (step + 1) * (steps - step - 1):.0f}s)", flush=True)
    return ema, Conditioning(ema_txt, ema_pool)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dicompress/zoo/tiny_flux_digits")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-per-class", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()

    clf, clf_acc = train_classifier(args.seed)
    print(f"classifier held-out accuracy: {clf_acc:.4f}", flush=True)
    model, cond = train_dit(args.steps, args.batch, args.lr, args.seed, args.ema)
    model.eval()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_file({"prompt_embeds": cond.prompt_embeds.contiguous(),
               "pooled_prompt_embeds": cond.pooled_prompt_embeds.contiguous()}, str(out / "conditioning.safetensors"))
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / "classifier.safetensors"))

    # Score the model's own samples at the default step count (classes x seeds disjoint from calibration).
    n = args.eval_per_class
    classes = torch.arange(NUM_CLASSES).repeat_interleave(n)
    seeds = [10_000 + i for i in range(len(classes))]
    acc = {}
    for steps in (8, DEFAULT_STEPS, 32):
        imgs = sample(model, cond, classes, seeds, steps=steps)
        with torch.no_grad():
            acc[steps] = (clf(imgs).argmax(1) == classes).float().mean().item()
        print(f"sample class accuracy at {steps} steps: {acc[steps]:.4f}", flush=True)
    meta = {"model_config": MODEL_CONFIG, "text_tokens": TEXT_TOKENS, "train": vars(args),
            "classifier_heldout_accuracy": clf_acc, "sample_class_accuracy": acc,
            "default_steps": DEFAULT_STEPS, "train_seconds": round(time.time() - start, 1),
            "torch": torch.__version__}
    (out / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
