"""CLEAR attention processors for FLUX (double and single blocks) and Qwen-Image, and the run-time layout they need.

Each processor is diffusers' own (FluxAttnProcessor, QwenDoubleStreamAttnProcessor2_0: the same q/k/v projections,
qk-norms, RoPE, output projections) with `clear_attention` in place of dispatch_attention_fn. The window needs the
image token grid of the current call; a forward pre-hook on the transformer (`ClearContext`) reads it from FLUX's
`txt_ids` / `img_ids` (checking the image ids are a row-major grid, what FLUX pipelines build at any resolution) or
from Qwen-Image's `img_shapes`, and holds it for every processor of that model, so any resolution works without
configuration. A block run on its own (the write-time load check, block-wise calibration and quantization) has no
such call: it uses the grid the pass calibrated on (recorded in the manifest), the text tokens being the rest of the
sequence. Qwen-Image's text padding mask (`encoder_hidden_states_mask`) is honoured: padded text tokens are dropped
from each sample's keys (their own outputs are zero; nothing reads them: they are masked as keys in every block).
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


def shapes_layout(img_shapes, n_text: int) -> tuple[int, tuple[int, int]]:
    """(text tokens, (h, w)) from Qwen-Image's img_shapes: [(1, h, w)] per sample, or [[(1, h, w)]] per sample (what
    its pipelines pass; the model reads the first sample's). ValueError for several images per sample (the edit
    models' reference images) or several frames."""
    first = img_shapes[0] if isinstance(img_shapes, (list, tuple)) and len(img_shapes) else None
    images = list(first) if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)) \
        else [first]
    if len(images) != 1 or images[0] is None or len(images[0]) != 3 or int(images[0][0]) != 1:
        raise ValueError(f"CLEAR needs one image of one frame per sample (img_shapes [(1, h, w)]); got {img_shapes!r} "
                         "(Qwen-Image-Edit's reference images are not supported)")
    return int(n_text), (int(images[0][1]), int(images[0][2]))


class ClearContext:
    """The transformer's forward hooks: (n_text, grid) of the current call for its CLEAR processors, cleared when
    the call ends (a block run on its own afterwards never sees a stale grid)."""

    def __init__(self):
        self.n_text: int | None = None
        self.grid: tuple[int, int] | None = None

    def enter(self, module, args, kwargs):
        sig = inspect.signature(module.forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
        if "img_shapes" in sig.parameters:                                        # Qwen-Image
            shapes, enc = bound.get("img_shapes"), bound.get("encoder_hidden_states")
            if shapes is None or enc is None:
                raise ValueError("a CLEAR Qwen-Image model needs img_shapes and encoder_hidden_states in its forward "
                                 "call (the image token grid)")
            self.n_text, self.grid = shapes_layout(shapes, enc.shape[1])
            return None
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


class ClearProcessor(nn.Module):
    """What the CLEAR processors share: the window radius, the model's ClearContext, optional pooled keys / values
    (`pool`) and the calibration grid for blocks run on their own. A module, so the pooling weights are parameters
    of the attention module that owns it."""

    def __init__(self, radius: float, context: ClearContext, pool: KVPool | None = None,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        if radius <= 0:
            raise ValueError(f"CLEAR radius must be > 0, got {radius}")
        self.radius = float(radius)
        self.context = context
        self.pool = pool
        self.grid = tuple(grid) if grid is not None else None    # used by blocks run outside the model's forward

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_text: int,
               grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, H, D) in [text | image] order -> CLEAR attention, (B, N, H*D) in the query's dtype."""
        pk = pv = None
        if self.pool is not None:
            pk, pv = self.pool(key[:, n_text:], value[:, n_text:], grid)
        out = clear_attention(query, key, value, n_text=n_text, grid=grid, radius=self.radius, pooled_key=pk,
                              pooled_value=pv)
        return out.flatten(2, 3).to(query.dtype)

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}, grid={self.grid}"


class FluxClearAttnProcessor(ClearProcessor):
    """FluxAttnProcessor with CLEAR attention (window `radius` on the image grid, text global) and optional pooled
    keys / values."""

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
        out = self.attend(query, key, value, n_text, grid)
        if encoder_hidden_states is not None:
            enc_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                 out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(enc_out.contiguous())
        return out


class QwenClearAttnProcessor(ClearProcessor):
    """QwenDoubleStreamAttnProcessor2_0 with CLEAR attention over the joint [text | image] sequence; returns
    (image output, text output) as the stock processor does."""

    # diffusers' Attention passes a processor only the keyword arguments its __call__ names (nn.Module's is
    # (*args, **kwargs): the text mask and the rotary embedding would be dropped with a warning)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                attention_mask, image_rotary_emb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image CLEAR attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("CLEAR attention takes no attention_mask (its mask is the local window; pass "
                             "encoder_hidden_states_mask for padded text)")
        head_dim = attn.inner_dim // attn.heads

        def split(x):
            return x.unflatten(-1, (-1, head_dim))
        img_q, img_k, img_v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (split(f(encoder_hidden_states))
                               for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))

        def norm(layer, x):
            return x if layer is None else layer(x)
        img_q, img_k = norm(attn.norm_q, img_q), norm(attn.norm_k, img_k)
        txt_q, txt_k = norm(attn.norm_added_q, txt_q), norm(attn.norm_added_k, txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in (img_q, img_k))
            txt_q, txt_k = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (txt_q, txt_k))
        n_text, n_img = txt_q.shape[1], img_q.shape[1]
        grid = self.context.grid if self.context.grid is not None else self.grid
        if grid is None:
            raise RuntimeError("CLEAR attention ran outside the transformer's forward and has no calibration grid "
                               "to fall back on (call the transformer, whose pre-hook reads img_shapes)")
        if grid[0] * grid[1] != n_img:
            raise RuntimeError(f"CLEAR attention got {n_img} image tokens, not a {grid[0]}x{grid[1]} grid (a block "
                               "run on its own at another resolution than the calibration's?)")
        query, key, value = (torch.cat(p, dim=1) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        mask = encoder_hidden_states_mask
        if mask is None or bool(mask.bool().all()):
            out = self.attend(query, key, value, n_text, grid)
        else:
            # padded text tokens leave the key set: each sample runs on its own valid text + image tokens
            out = query.new_zeros(*query.shape[:2], query.shape[2] * query.shape[3])
            for b in range(query.shape[0]):
                keep = torch.cat([mask[b].bool(), mask.new_ones(n_img, dtype=torch.bool)]).nonzero().squeeze(1)
                n_b = int(mask[b].bool().sum())
                out[b, keep] = self.attend(*(x[b:b + 1, keep] for x in (query, key, value)), n_b, grid)[0]
        txt_out, img_out = out.split_with_sizes([n_text, n_img], dim=1)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


def standalone_grid(model: nn.Module) -> tuple[int, int] | None:
    """The grid the model's CLEAR processors assume when a block runs on its own (the calibration's), or None
    without CLEAR attention."""
    return next((m.grid for m in model.modules() if isinstance(m, ClearProcessor) and m.grid is not None), None)


FLUX_PROCESSORS = ("FluxAttnProcessor", "FluxAttnProcessor2_0", FluxClearAttnProcessor.__name__)
QWEN_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0", QwenClearAttnProcessor.__name__)


def clear_kind(module: nn.Module) -> str | None:
    """"flux" / "qwenimage" for a diffusers attention module running that model's stock processor (or already a
    CLEAR one), else None (another processor, e.g. a user's custom one, is not replaced silently)."""
    proc = type(getattr(module, "processor", None)).__name__
    if type(module).__name__ == "FluxAttention" and proc in FLUX_PROCESSORS:
        return "flux"
    if type(module).__name__ == "Attention" and proc in QWEN_PROCESSORS:
        return "qwenimage"
    return None


def install_clear(model: nn.Module, names: list[str], radius: float, pooling: int | None,
                  grid: tuple[int, int] | None = None) -> None:
    """Give each attention module in `names` a CLEAR processor of its kind (pooling weights at 1/f^2 on its device /
    dtype); `grid`: the calibration's, for blocks run outside the model's forward."""
    ctx = context_of(model)
    for name in names:
        attn = model.get_submodule(name)
        kind = clear_kind(attn)
        if kind is None:
            raise ValueError(f"{name} is a {type(attn).__name__} with processor "
                             f"{type(getattr(attn, 'processor', None)).__name__}: no CLEAR processor for it")
        p = next(q for q in attn.parameters() if q.is_floating_point())
        pool = KVPool(attn.heads, pooling, device=p.device, dtype=p.dtype) if pooling else None
        cls = FluxClearAttnProcessor if kind == "flux" else QwenClearAttnProcessor
        attn.set_processor(cls(radius, ctx, pool, grid))
