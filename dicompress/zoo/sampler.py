"""Sampling the embedded model inside diffusers' own FluxPipeline.

The pipeline runs with precomputed prompt embeddings (the per-class conditioning tables), no text
encoders and no VAE (`output_type="latent"`): the 16x16 digit *is* the latent, so the pipeline's
denoising loop, scheduler and latent packing are the real ones and a compressed transformer is
proven to run where users run it.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from .conditioning import Conditioning  # re-exported: sample() takes one
from .digits import CHANNELS, SIZE, pack, unpack

# FluxPipeline without a VAE uses vae_scale_factor 8: height 128 px -> a 16x16 latent.
PIPELINE_PX = SIZE * 8
DEFAULT_STEPS = 16


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Static shift 1.0 (no resolution-dependent shift): the model is trained on uniform-in-logit sigmas.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def make_pipeline(transformer) -> FluxPipeline:
    return FluxPipeline(scheduler=make_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def initial_noise(seeds, device="cpu") -> torch.Tensor:
    """One fixed noise latent per seed ([B, 64, 4] packed), identical for teacher and student."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(1, CHANNELS, SIZE, SIZE, generator=g))
    return pack(torch.cat(out)).to(device)


@torch.no_grad()
def sample(transformer, conditioning: Conditioning, classes, seeds, steps: int = DEFAULT_STEPS,
           batch_size: int = 100, pipeline: FluxPipeline | None = None, progress: bool = False,
           callback=None) -> torch.Tensor:
    """Generate digits [B, 1, 16, 16] in (roughly) [-1, 1] for (class, seed) pairs.

    `callback(pipe, step, timestep, kwargs)` is FluxPipeline's callback_on_step_end, used by capture.
    """
    classes = torch.as_tensor(classes, dtype=torch.long)
    seeds = list(seeds)
    assert len(classes) == len(seeds), "one seed per class entry"
    pipe = pipeline or make_pipeline(transformer)
    pipe.set_progress_bar_config(disable=not progress)
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    outs = []
    for i in range(0, len(seeds), batch_size):
        c = classes[i:i + batch_size]
        pe, pooled = conditioning.for_classes(c)
        latents = initial_noise(seeds[i:i + batch_size], device)
        kw = dict(callback_on_step_end=callback) if callback else {}
        res = pipe(prompt_embeds=pe.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                   latents=latents.to(dtype), height=PIPELINE_PX, width=PIPELINE_PX,
                   num_inference_steps=steps, output_type="latent", return_dict=False, **kw)[0]
        outs.append(unpack(res.float().cpu()))
    return torch.cat(outs)
