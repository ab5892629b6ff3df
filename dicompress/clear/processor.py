"""CLEAR attention processors for FLUX double and single blocks, and the run-time layout they need.

The processor is diffusers' FluxAttnProcessor (same q/k/v projections, qk-norms, RoPE, output projections) with
`clear_attention` in place of dispatch_attention_fn. The window needs the number of text tokens and the image token
grid of the current call; a forward pre-hook on the transformer (`ClearContext`) reads them from `txt_ids` /
`img_ids`, checks the image ids are a row-major grid (what FLUX pipelines build at any resolution) and holds them for
every processor of that model, so any resolution works without configuration. A block run on its own (the write-time
load check, block-wise calibration and quantization) has no such call: it uses the grid the pass calibrated on
(recorded in the manifest), the text tokens being the rest of the sequence.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .attention import clear_attention
from .pooling import KVPool

CONTEXT_ATTR = "_clear_context"


def ids_layout(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[int, tuple[int, int]]:
    """(text tokens, (h, w)) from FLUX's position ids: img_ids (N, 3) = (0, row, col) row-major on an h x w grid.
    ValueError for ids that are no such grid (e.g. Kontext's reference-image tokens)."""
    if txt_ids.ndim == 3:     # diffusers' deprecated batched ids: the model reads the first
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    n = img_ids.shape[0]
    rows, cols = img_ids[:, 1].round().long(), img_ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    idx = torch.arange(n, device=img_ids.device)
    if h * w != n or not (torch.equal(rows - r0, idx // w) and torch.equal(cols - c0, idx % w)) \
            or bool((img_ids[:, 0] != img_ids[0, 0]).any()):
        raise ValueError(f"CLEAR needs the image tokens in row-major order on one grid (img_ids (0, row, col) as FLUX "
                         f"pipelines build them); these {n} img_ids span rows {r0}..{r0 + h - 1}, cols "
                         f"{c0}..{c0 + w - 1} in another order or with several images")
    return int(txt_ids.shape[0]), (h, w)


class ClearContext:
    """The transformer's forward hooks: (n_text, grid) of the current call for its CLEAR processors, cleared when
    the call ends (a block run on its own afterwards never sees a stale grid)."""

    def __init__(self):
        self.n_text: int | None = None
        self.grid: tuple[int, int] | None = None

    def enter(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        txt, img = bound.get("txt_ids"), bound.get("img_ids")
        if txt is None or img is None:
            raise ValueError("a CLEAR model needs txt_ids and img_ids in its forward call (the image token grid)")
        self.n_text, self.grid = ids_layout(txt, img)
        return None

    def exit(self, module, args, kwargs, output):
        self.n_text = self.grid = None
        return None

    def layout(self, n: int, fallback: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
        """(n_text, grid) for a call of `n` tokens: the transformer's current call, else `fallback` (the
        calibration grid; text = the other tokens)."""
        if self.grid is not None:
            n_text, grid = self.n_text, self.grid
        elif fallback is not None:
            grid = tuple(fallback)
            n_text = n - grid[0] * grid[1]
        else:
            raise RuntimeError("CLEAR attention ran outside the transformer's forward and has no calibration grid "
                               "to fall back on (call the transformer, whose pre-hook reads img_ids / txt_ids)")
        if n_text < 0 or n_text + grid[0] * grid[1] != n:
            raise RuntimeError(f"CLEAR attention got {n} tokens, which is not {n_text} text + {grid[0]}x{grid[1]} "
                               "image tokens (a block run on its own at another resolution than the calibration's?)")
        return n_text, grid


def context_of(model: nn.Module) -> ClearContext:
    """The model's ClearContext, registered as its forward pre-hook on first use (once per model)."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is None:
        ctx = ClearContext()
        setattr(model, CONTEXT_ATTR, ctx)
        model.register_forward_pre_hook(ctx.enter, with_kwargs=True)
        model.register_forward_hook(ctx.exit, with_kwargs=True, always_call=True)
    return ctx


class FluxClearAttnProcessor(nn.Module):
    """FluxAttnProcessor with CLEAR attention (window `radius` on the image grid, text global) and optional pooled
    keys / values (`pool`). A module, so the pooling weights are parameters of the attention module that owns it."""

    def __init__(self, radius: float, context: ClearContext, pool: KVPool | None = None,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        if radius <= 0:
            raise ValueError(f"CLEAR radius must be > 0, got {radius}")
        self.radius = float(radius)
        self.context = context
        self.pool = pool
        self.grid = tuple(grid) if grid is not None else None    # used by blocks run outside the model's forward

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # lazy: diffusers' model modules take seconds to import
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb
        if attention_mask is not None:
            raise ValueError("CLEAR attention takes no attention_mask (its mask is the local window)")
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states,
                                                                                 encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_query = attn.norm_added_q(enc_query.unflatten(-1, (-1, attn.head_dim)))
            enc_key = attn.norm_added_k(enc_key.unflatten(-1, (-1, attn.head_dim)))
            enc_value = enc_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_query, query], dim=1)
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_text, grid = self.context.layout(query.shape[1], self.grid)
        if encoder_hidden_states is not None and n_text != encoder_hidden_states.shape[1]:
            raise RuntimeError(f"CLEAR attention: {encoder_hidden_states.shape[1]} text tokens, the layout says {n_text}")
        pk = pv = None
        if self.pool is not None:
            pk, pv = self.pool(key[:, n_text:], value[:, n_text:], grid)
        out = clear_attention(query, key, value, n_text=n_text, grid=grid, radius=self.radius, pooled_key=pk,
                              pooled_value=pv)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                 out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(enc_out.contiguous())
        return out

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}, grid={self.grid}"


def is_flux_attention(module: nn.Module) -> bool:
    """A diffusers FluxAttention running the stock processor (or already a CLEAR one)."""
    return type(module).__name__ == "FluxAttention" and \
        type(getattr(module, "processor", None)).__name__ in ("FluxAttnProcessor", "FluxAttnProcessor2_0",
                                                              FluxClearAttnProcessor.__name__)


def install_clear(model: nn.Module, names: list[str], radius: float, pooling: int | None,
                  grid: tuple[int, int] | None = None) -> None:
    """Give each attention module in `names` a CLEAR processor (pooling weights at 1/f^2 on its device / dtype);
    `grid`: the calibration's, for blocks run outside the model's forward."""
    ctx = context_of(model)
    for name in names:
        attn = model.get_submodule(name)
        p = next(q for q in attn.parameters() if q.is_floating_point())
        pool = KVPool(attn.heads, pooling, device=p.device, dtype=p.dtype) if pooling else None
        attn.set_processor(FluxClearAttnProcessor(radius, ctx, pool, grid))
