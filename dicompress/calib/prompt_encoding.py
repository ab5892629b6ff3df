"""The `prompts` calibration source's first stage: the pipeline's text encoders alone encode every prompt once.

    check_prompt_pipeline(root)    before any weight is read: a supported pipeline with its text encoders and
                                   tokenizers on disk (what is missing is named)
    prompt_embeddings(...)         the embeddings file in the calibration cache: reused, or encoded now
    PromptEmbeddings(path)         its tensors, as the family's pipeline `__call__` takes them precomputed

Only the text encoders and tokenizers are loaded (the family's own pipeline class built with
`transformer=None, vae=None`, so its `encode_prompt`, prompt template and `max_sequence_length` are the ones
users run); the transformer samples later from the file, alone, streamed or not.

Encoders compute in the run's dtype (fp32 on CPU, where bf16 matmuls are ~250x slower; bf16 on CUDA) and stay
at rest in their checkpoint's dtype: each repeated layer (and each large linear outside them, e.g. a LM head)
is cast to the compute dtype when it runs and back when it returns (`compute_in`). Memory is then the
checkpoint's size plus one layer in fp32 (T5-XXL: 9.5 GB, not 19 GB), and the numbers are the fp32 model's
(bf16 -> fp32 is exact).
"""
from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CalibrationError

FORMAT = "dicompress.prompt_embeddings/1"
ENCODE_BATCH = 8            # prompts per encoder call: bounds activations (T5 attention, a LM head's logits)
HINT = ("point `model` at the whole diffusers pipeline directory (model_index.json with its text encoders and "
        "tokenizers; `huggingface-cli download <hub id>` fetches them all); without them only `source: synthetic` "
        "runs (plumbing-grade, weight-only passes)")


class Family:
    """What one diffusers pipeline class needs to encode prompts and to sample from precomputed embeddings."""

    pipeline: str
    text_components: tuple[str, ...]        # model_index.json names loaded for encoding

    def encode(self, pipe, prompts: list[str], device, max_len: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def join(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def truncated(self, pipe, prompts: list[str], max_len: int) -> list[str]:
        """One line per text encoder that will cut some prompts short (as diffusers does)."""
        raise NotImplementedError

    def call_kwargs(self, pipe, tensors: dict[str, torch.Tensor], cfg, max_len: int) -> dict:
        raise NotImplementedError


def _too_long(tokenizer, texts: list[str], limit: int, drop: int = 0) -> int:
    return sum(len(ids) - drop > limit for ids in tokenizer(texts, truncation=False, verbose=False).input_ids)


class FluxPrompts(Family):
    """FLUX.1: T5 per-token embeddings (padded to max_sequence_length) + CLIP's pooled embedding."""

    pipeline = "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def encode(self, pipe, prompts, device, max_len):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_len)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def truncated(self, pipe, prompts, max_len):
        out = []
        n = _too_long(pipe.tokenizer_2, prompts, max_len)
        if n:
            out.append(f"{n} longer than max_sequence_length {max_len} T5 tokens (text_encoder_2)")
        n = _too_long(pipe.tokenizer, prompts, pipe.tokenizer_max_length)
        if n:
            out.append(f"{n} longer than CLIP's {pipe.tokenizer_max_length} tokens (text_encoder: the pooled "
                       "embedding)")
        return out

    def call_kwargs(self, pipe, tensors, cfg, max_len):
        return {"prompt_embeds": tensors["prompt_embeds"], "pooled_prompt_embeds": tensors["pooled_prompt_embeds"],
                "guidance_scale": cfg.guidance_scale, "max_sequence_length": max_len}


class QwenImagePrompts(Family):
    """Qwen-Image: Qwen2.5-VL's last hidden states of the prompt inside the pipeline's chat template (its system
    prompt dropped), with a mask; prompts of different lengths are zero-padded to the longest, mask 0."""

    pipeline = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")

    def encode(self, pipe, prompts, device, max_len):
        embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_len)
        if mask is None:            # the pipeline drops an all-ones mask; the set is padded as one, so keep it
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def join(self, parts):
        length = max(p["prompt_embeds"].shape[1] for p in parts)
        return {k: torch.cat([_pad(p[k], length) for p in parts]) for k in parts[0]}

    def truncated(self, pipe, prompts, max_len):
        limit = min(max_len, pipe.tokenizer_max_length)
        texts = [pipe.prompt_template_encode.format(p) for p in prompts]
        n = _too_long(pipe.tokenizer, texts, limit, drop=pipe.prompt_template_encode_start_idx)
        return [f"{n} longer than max_sequence_length {limit} tokens (text_encoder)"] if n else []

    def call_kwargs(self, pipe, tensors, cfg, max_len):
        # conditional branch only: no negative prompt, so no true CFG (true_cfg_scale 1); guidance_scale is an
        # input of guidance-distilled transformers alone (Qwen-Image is not one: diffusers warns if passed)
        guided = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        return {"prompt_embeds": tensors["prompt_embeds"], "prompt_embeds_mask": tensors["prompt_embeds_mask"],
                "true_cfg_scale": 1.0, "guidance_scale": cfg.guidance_scale if guided else None,
                "max_sequence_length": max_len}


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (text tokens) to `length`."""
    if t.shape[1] >= length:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))], dim=1)


def pad_text(tensors: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """Every text tensor of `tensors` (Qwen-Image's embeds and mask) `extra` tokens longer, zero-padded."""
    length = tensors["prompt_embeds"].shape[1] + extra
    return {k: _pad(v, length) for k, v in tensors.items()}


FAMILIES: dict[str, Family] = {f.pipeline: f for f in (FluxPrompts(), QwenImagePrompts())}


# -- checks (no weight read) ---------------------------------------------------------------------------------


def _index(root: Path) -> dict:
    try:
        index = json.loads((Path(root) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration source 'prompts': cannot read {root}/model_index.json: {e}",
                               hint=HINT) from None
    if not isinstance(index, dict):
        raise CalibrationError(f"calibration source 'prompts': {root}/model_index.json is not a mapping", hint=HINT)
    return index


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin"))


def check_prompt_pipeline(root: Path | None, model_path: Path | None = None) -> Family:
    """The family of the pipeline at `root`, after checking (from the file listing alone) that every text
    encoder and tokenizer it needs is there."""
    if root is None:
        raise CalibrationError(f"calibration source 'prompts' encodes the prompts with the model's text encoders, "
                               f"but {model_path} is a transformer directory without its pipeline "
                               "(no model_index.json beside it)", hint=HINT)
    root = Path(root)
    index = _index(root)
    cls = index.get("_class_name")
    family = FAMILIES.get(cls)
    if family is None:
        raise CalibrationError(f"calibration source 'prompts' does not know how to encode prompts for {cls} "
                               f"({root}); it supports {', '.join(FAMILIES)}",
                               hint="source: synthetic runs on any supported transformer (plumbing-grade, "
                                    "weight-only passes)")
    missing = []
    for name in family.text_components:
        entry, d = index.get(name), root / name
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            missing.append(f"{name} (not in model_index.json)")
        elif not d.is_dir():
            missing.append(f"{name}/ ({entry[1]}: no such folder)")
        elif name.startswith("text_encoder") and not ((d / "config.json").is_file() and _has_weights(d)):
            missing.append(f"{name}/ ({entry[1]}: no config.json and weights)")
        elif name.startswith("tokenizer") and not any(d.iterdir()):
            missing.append(f"{name}/ ({entry[1]}: empty)")
    if missing:
        raise CalibrationError(f"calibration source 'prompts' encodes the prompts with the pipeline's text encoders, "
                               f"but the pipeline directory {root} lacks: {'; '.join(missing)}", hint=HINT)
    return family


def default_max_length(family: Family) -> int:
    """The family pipeline's own `max_sequence_length` default (what `pipe(prompt=...)` uses)."""
    import diffusers
    return inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters["max_sequence_length"].default


# -- the cache -----------------------------------------------------------------------------------------------


def text_stamp(root: Path | None) -> list | None:
    """Every file of the pipeline's text encoders and tokenizers: (path, size, mtime), as the calibration key
    stamps the transformer's weights. None without a supported pipeline."""
    family = FAMILIES.get(_index(root).get("_class_name")) if root is not None else None
    if family is None:
        return None
    stamp = [family.pipeline, str(Path(root).resolve())]
    for name in family.text_components:
        for p in sorted((Path(root) / name).rglob("*")):
            if p.is_file():
                st = p.stat()
                stamp.append((str(p.relative_to(root)), st.st_size, int(st.st_mtime)))
    return stamp


def embeddings_key(root: Path, prompts: list[str], max_len: int, device: torch.device, dtype: torch.dtype) -> str:
    """What the embeddings depend on: the prompts, the text encoders' and tokenizers' files, the token limit,
    and where and in which dtype the encoders ran."""
    blob = json.dumps([FORMAT, text_stamp(root), prompts, max_len, torch.device(device).type, str(dtype)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prompt_embeddings(root: Path, prompts: list[str], cache_dir: Path, device, dtype: torch.dtype,
                      max_len: int | None = None, echo=print) -> Path:
    """The embeddings file of `prompts` through the pipeline at `root`: from `cache_dir` when the same prompts,
    encoders and settings were encoded before, else encoded now (encoders loaded, used, freed) and written
    atomically."""
    family = check_prompt_pipeline(root)
    max_len = max_len or default_max_length(family)
    device = torch.device(device)
    path = Path(cache_dir) / f"{embeddings_key(root, prompts, max_len, device, dtype)}.safetensors"
    if path.is_file():
        echo(f"calibration: reusing prompt embeddings {path}")
        return path
    t0 = time.perf_counter()
    tensors, notes = _encode(root, family, prompts, device, dtype, max_len, echo)
    for line in notes:
        echo(f"calibration: warning: of {len(prompts)} prompts, {line}: truncated, as diffusers does")
    meta = {"format": FORMAT, "pipeline": family.pipeline, "max_sequence_length": str(max_len),
            "dtype": str(dtype).removeprefix("torch."), "device": device.type, "prompts": json.dumps(prompts),
            "truncated": json.dumps(notes)}
    _write_atomic(path, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta)
    echo(f"calibration: encoded {len(prompts)} prompts in {time.perf_counter() - t0:.1f} s -> {path}")
    return path


def _write_atomic(path: Path, tensors: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- encoding ------------------------------------------------------------------------------------------------


def load_text_pipeline(root: Path, family: Family):
    """The family's pipeline with its text encoders and tokenizers only (checkpoint dtype, CPU); every other
    component None."""
    import diffusers
    import transformers
    index = _index(root)
    parts = {}
    for name in family.text_components:
        lib, cls_name = index[name]
        cls = getattr(transformers if lib == "transformers" else diffusers, cls_name)
        kw = {"dtype": "auto"} if name.startswith("text_encoder") else {}
        try:
            parts[name] = cls.from_pretrained(str(Path(root) / name), **kw)
        except (OSError, ValueError) as e:
            raise CalibrationError(f"cannot load {name} ({cls_name}) from {root}/{name}: {e}", hint=HINT) from None
    pipe_cls = getattr(diffusers, family.pipeline)
    names = [n for n in inspect.signature(pipe_cls.__init__).parameters if n != "self"]
    pipe = pipe_cls(**{n: parts.get(n) for n in names})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(root, family, prompts, device, dtype, max_len, echo):
    pipe = load_text_pipeline(root, family)
    try:
        encoders = {n: getattr(pipe, n) for n in family.text_components if n.startswith("text_encoder")}
        rest = sorted({str(p.dtype).removeprefix("torch.") for m in encoders.values() for p in m.parameters()})
        echo(f"calibration: encoding {len(prompts)} prompts with "
             + ", ".join(f"{n} ({type(m).__name__}, {_count(sum(p.numel() for p in m.parameters()))} parameters)"
                         for n, m in encoders.items())
             + f" on {device.type}, computing in {str(dtype).removeprefix('torch.')}, weights kept in "
               f"{'/'.join(rest)}")
        notes = family.truncated(pipe, prompts, max_len)
        parts = []
        # diffusers logs each truncated prompt's cut-off tail (padding included) per batch, and transformers that a
        # sequence is longer than the model's limit: `notes` says it once, in words
        with torch.no_grad(), _computing(encoders.values(), dtype, device), \
                _quiet(type(pipe).__module__, "transformers.tokenization_utils_base"):
            for i in range(0, len(prompts), ENCODE_BATCH):
                parts.append({k: v.cpu() for k, v in family.encode(pipe, prompts[i:i + ENCODE_BATCH], device,
                                                                     max_len).items()})
        return family.join(parts), notes
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def _quiet(*names: str):
    """Only errors from these loggers while active."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


@contextmanager
def _computing(models, dtype, device):
    with _stack([compute_in(m.to(device), dtype) for m in models]):
        yield


@contextmanager
def _stack(managers):
    if not managers:
        yield
        return
    with managers[0], _stack(managers[1:]):
        yield


def _units(module: nn.Module, min_linear: int = 2**24) -> list[nn.Module]:
    """The modules cast one at a time: the members of every list of like layers (outermost lists only), and
    every large linear outside them; not one whose parameters another module shares (a LM head tied to the
    embedding: the embedding would read the low-precision copy)."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            found.extend(m)
            continue
        if isinstance(m, nn.Linear) and m.weight.numel() >= min_linear:
            found.append(m)
            continue
        stack.extend(m.children())
    owners: dict[int, set[int]] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    units = []
    for u in found:
        inside = {id(m) for m in u.modules()}
        if all(owners[id(p)] <= inside for p in u.parameters()):
            units.append(u)
    return units


@contextmanager
def compute_in(model: nn.Module, dtype: torch.dtype):
    """While active, `model` computes in `dtype` with its layers at rest in their own dtype: every parameter
    outside the layers is cast now (embeddings, norms: small), each layer's when it runs, and back after."""
    units = _units(model)
    inside = {id(p) for u in units for p in u.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in inside and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    handles = []
    for unit in units:
        rest = {n: p.data for n, p in unit.named_parameters() if p.is_floating_point() and p.dtype != dtype}
        if not rest:
            continue
        params = dict(unit.named_parameters())

        def up(mod, args, rest=rest, params=params):
            for n, t in rest.items():
                params[n].data = t.to(dtype)

        def down(mod, args, out, rest=rest, params=params):
            for n, t in rest.items():
                params[n].data = t
        handles += [unit.register_forward_pre_hook(up), unit.register_forward_hook(down)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# -- sampling ------------------------------------------------------------------------------------------------


def sampling_pipeline(transformer, root: Path, family: Family):
    """The family's pipeline with `transformer` (whole, or streamed: on the meta device but for the block
    running) and the pipeline's own scheduler; no text encoders, no VAE (latents out). Built, never moved:
    `pipe.to` would copy the meta blocks."""
    import diffusers
    index = _index(root)
    lib, sched_cls = index.get("scheduler", [None, None])
    if lib != "diffusers" or not hasattr(diffusers, str(sched_cls)):
        raise CalibrationError(f"the pipeline {root} has no diffusers scheduler in model_index.json", hint=HINT)
    scheduler = getattr(diffusers, sched_cls).from_pretrained(str(Path(root) / "scheduler"))
    pipe_cls = getattr(diffusers, family.pipeline)
    names = [n for n in inspect.signature(pipe_cls.__init__).parameters if n != "self"]
    pipe = pipe_cls(**{n: None for n in names} | {"transformer": transformer, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- reading -------------------------------------------------------------------------------------------------


class PromptEmbeddings:
    """An embeddings file: the tensors (rows in prompt order) and what encoded them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), "pt") as f:
                self.meta = f.metadata() or {}
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as e:
            raise self._gone(e) from None
        if self.meta.get("format") != FORMAT:
            raise self._gone(f"format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.family = FAMILIES[self.meta["pipeline"]]
        self.max_len = int(self.meta["max_sequence_length"])
        self.prompts = json.loads(self.meta["prompts"])

    def _gone(self, why) -> CalibrationError:
        return CalibrationError(f"the prompt embeddings {self.path} cannot be read: {why}",
                                hint="delete the calibration cache entry and run again: the prompts are encoded anew")

    def rows(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The tensors, padded so that every sampling call of `batch_size` prompts passes the same inputs: with
        prompts of different lengths (a mask with zeros), a call whose prompts are all the longest would have no
        padding and the pipeline would drop its mask; one more padded token keeps a mask in every call (masked
        tokens change no other token's output)."""
        mask = self.tensors.get("prompt_embeds_mask")
        if mask is None or bool(mask.all()):
            return self.tensors
        full = [bool(mask[i:i + batch_size].all()) for i in range(0, mask.shape[0], batch_size)]
        return pad_text(self.tensors, 1) if any(full) else self.tensors
