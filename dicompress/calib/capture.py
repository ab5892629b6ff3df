"""Hooks that record what a sampling loop feeds each block and each linear.

Forward hooks on named blocks are enough for DiTs (blocks are regular); no tracing.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import CalibrationError
from .encoding import encode_value, flatten, shared_input_names, split_model_input
from .store import StoreWriter

# model kwargs that are not inputs (how to return) and never stored
_NOT_INPUTS = ("return_dict",)


class LinearStats:
    """Running per-input-channel absmax and sum of squares of a linear's inputs."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        amax, ssq = x.abs().amax(0).cpu(), x.pow(2).sum(0).cpu()
        if self.absmax is None:
            self.absmax, self.sumsq = amax, ssq
        else:
            torch.maximum(self.absmax, amax, out=self.absmax)
            self.sumsq += ssq
        self.count += x.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax, "sumsq": self.sumsq, "count": torch.tensor([float(self.count)])}


class StopForward(Exception):
    """Raised inside the model's forward once the wanted block inputs are recorded (data-free calibration,
    whose model outputs nothing uses): the rest of the forward is not run."""


class Capture:
    """Context manager: while active, model forwards are recorded into a StoreWriter.

    Every model call is flushed when it returns: one chunk per block per call (or per `chunk_rows` rows of
    it), so memory holds one call's activations, and block-by-block work later reads the rows in the same
    batches the model ran them in; chunk i of every block, of the final outputs and of the model inputs
    hold the same samples.
    `only_blocks`: capture the inputs of these blocks alone (the streaming pipeline captures the first
    block's and computes the rest block by block); final outputs are then not captured. `stop_early`: raise
    StopForward once the last of `only_blocks` has its inputs (the caller catches it and calls `flush`).
    """

    def __init__(self, model: nn.Module, adapter, writer: StoreWriter, block_inputs: bool = True,
                 linear_stats: bool = True, model_inputs: bool | None = None, only_blocks: list[str] | None = None,
                 stop_early: bool = False, chunk_rows: int | None = None,
                 store_dtype: torch.dtype = torch.float32):
        self.model, self.adapter, self.writer = model, adapter, writer
        self.store_dtype = store_dtype                        # floating block inputs as stored (masks: fp32)
        self.chunk_rows = chunk_rows                          # rows per stored chunk (None: one per call)
        self.block_inputs, self.want_stats = block_inputs, linear_stats
        # the model's own kwargs: wanted by the same (distillation / pruning) passes as the block inputs
        self.model_inputs = block_inputs if model_inputs is None else model_inputs
        self._mi_buf: dict[str, list[torch.Tensor]] = {}
        self._mi_kind: dict[str, str] = {}                    # kwarg -> per_sample | shared (first call decides)
        self._mi_shared: dict[str, torch.Tensor] = {}         # flat shared tensors
        self._mi_values: dict[str, dict] = {"shared": {}, "per_sample": {}}
        self._signature = None
        self.blocks = adapter.blocks(model)
        self.only_blocks = None if only_blocks is None else set(only_blocks)
        self.stop_at = only_blocks[-1] if stop_early and only_blocks else None
        self.stats: dict[str, LinearStats] = {}
        self._buf: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._final: dict[str, list[torch.Tensor]] = {}
        self._shared_done: set[str] = set()
        self._timestep: torch.Tensor | None = None
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        t = kwargs.get("timestep")
        self._timestep = None if t is None else t.detach().float().reshape(-1).cpu()
        if self.model_inputs:
            if args:   # bind positional arguments to their names
                self._signature = self._signature or inspect.signature(module.forward)
                kwargs = self._signature.bind_partial(*args, **kwargs).arguments
            self._record_model_inputs(kwargs)

    def _record_model_inputs(self, kwargs: dict) -> None:
        hs = kwargs.get("hidden_states")
        if not torch.is_tensor(hs):
            raise CalibrationError("the transformer was called without a `hidden_states` tensor; model inputs "
                                   "cannot be split per sample")
        batch = hs.shape[0]
        shared_names = shared_input_names(self.adapter)
        for name, v in kwargs.items():
            if v is None or name in _NOT_INPUTS:
                continue
            kind = split_model_input(name, v, batch, shared_names)
            if self._mi_kind.setdefault(name, kind) != kind:
                raise CalibrationError(f"model input {name!r} is {self._mi_kind[name]} at the first call but "
                                       f"{kind} now (batch {batch}); it cannot be stored consistently",
                                       hint="use a calibration batch_size that differs from the token counts")
            if torch.is_tensor(v):
                v = v.detach().cpu()
                v = v.float() if v.is_floating_point() else v
                if kind == "per_sample":
                    self._mi_buf.setdefault(name, []).append(v.expand(batch).clone() if v.ndim == 0 else v)
                else:
                    self._keep_shared(name, v)
            else:
                self._keep_value(name, v, kind)

    def _keep_shared(self, name: str, v: torch.Tensor) -> None:
        old = self._mi_shared.setdefault(name, v)
        if old is not v and not (old.shape == v.shape and torch.equal(old, v)):
            raise CalibrationError(f"model input {name!r} has no batch dimension but changes between calls; "
                                   "it cannot be stored once for all samples",
                                   hint="capture calibration at one resolution / sequence length per recipe")

    def _keep_value(self, name: str, v, kind: str) -> None:
        try:
            encode_value(v)
        except TypeError as e:
            raise CalibrationError(f"model input {name!r} cannot be stored ({e})",
                                   hint="this pipeline passes a kwarg calibration cannot record; capture without "
                                        "block inputs or report the kwarg") from None
        if kind == "per_sample":
            self._mi_values["per_sample"].setdefault(name, []).extend(v)
        elif self._mi_values["shared"].setdefault(name, v) != v:
            raise CalibrationError(f"model input {name!r} changes between calls: {self._mi_values['shared'][name]!r} "
                                   f"then {v!r}", hint="capture with one setting of it per recipe")

    def _on_block(self, name):
        def hook(module, args, kwargs):
            per = self._buf.setdefault(name, {})
            batch = None
            for key in self.adapter.per_sample_inputs:
                v = kwargs.get(key)
                if v is None:
                    continue
                flat: dict = {}
                flatten(key, v, flat)
                for k, t in flat.items():
                    t = t.detach()
                    per.setdefault(k, []).append((t.to(self.store_dtype) if t.is_floating_point() else t.float()).cpu())
                    batch = t.shape[0]
            if batch is not None and self._timestep is not None:
                ts = self._timestep.expand(batch) if self._timestep.numel() == 1 else self._timestep
                per.setdefault("timestep", []).append(ts.clone())
            if name not in self._shared_done:
                shared: dict = {}
                for key in self.adapter.shared_inputs:
                    flatten(key, kwargs.get(key), shared)
                self.writer.write_shared(name, {k: t.detach().float().cpu() for k, t in shared.items()})
                self._shared_done.add(name)
            if name == self.stop_at:
                raise StopForward
        return hook

    def _on_last_block(self, module, args, kwargs, output):
        enc, hid = output
        self._final.setdefault("hidden_states", []).append(hid.detach().float().cpu())
        self._final.setdefault("encoder_hidden_states", []).append(enc.detach().float().cpu())

    def _on_linear(self, name):
        def hook(module, args):
            self.stats.setdefault(name, LinearStats()).update(args[0])
        return hook

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        h.append(self.model.register_forward_hook(lambda *a: self.flush()))
        for ref in self.blocks:
            block = self.model.get_submodule(ref.name)
            if self.block_inputs and (self.only_blocks is None or ref.name in self.only_blocks):
                # first: it only reads the inputs, and with stop_early a block read from disk on call never loads
                h.append(block.register_forward_pre_hook(self._on_block(ref.name), with_kwargs=True, prepend=True))
            if self.want_stats:
                for sub, mod in block.named_modules():
                    if isinstance(mod, nn.Linear):
                        h.append(mod.register_forward_pre_hook(self._on_linear(f"{ref.name}.{sub}")))
        if self.block_inputs and self.blocks and self.only_blocks is None:
            last = self.model.get_submodule(self.blocks[-1].name)
            h.append(last.register_forward_hook(self._on_last_block, with_kwargs=True))
        return self

    def flush(self) -> None:
        for name, per in self._buf.items():
            for piece in self._pieces({k: torch.cat(v) for k, v in per.items()}):
                self.writer.write_block_chunk(name, piece)
        if self._final:
            for piece in self._pieces({k: torch.cat(v) for k, v in self._final.items()}):
                self.writer.write_chunk("final", piece)
        if self._mi_buf:
            flat: dict = {}
            for k, v in self._mi_buf.items():
                flatten(k, torch.cat(v), flat)
            for piece in self._pieces(flat):
                self.writer.write_chunk("model_inputs", piece)
        self._buf, self._final, self._mi_buf = {}, {}, {}

    def _pieces(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """One call's per-sample tensors (all [batch, ...]) cut into chunks of at most chunk_rows rows."""
        rows = next(iter(tensors.values())).shape[0] if tensors else 0
        step = self.chunk_rows or rows
        if rows <= step:
            return [tensors]
        return [{k: v[i:i + step].clone() for k, v in tensors.items()} for i in range(0, rows, step)]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc[0] is None:
            self.flush()
            if self.want_stats:
                self.writer.write_linear_stats({n: s.tensors() for n, s in self.stats.items()})
            if self.model_inputs and self._mi_kind:
                flat: dict = {}
                for k, v in self._mi_shared.items():
                    flatten(k, v, flat)
                self.writer.write_model_inputs_shared(flat, self._mi_values)


@contextmanager
def chunked_blocks(model: nn.Module, adapter, rows: int | None):
    """While active, every block of `model` runs its per-sample inputs (adapter.per_sample_inputs, split along
    dim 0) at most `rows` samples at a time and concatenates the outputs: a model call on a large batch keeps
    one chunk's activations per block, and a block read from the checkpoint on call (streaming) is read once
    for the whole batch. Hooks on the blocks still see the whole batch. rows None: nothing changes."""
    if rows is None:
        yield model
        return
    patched = []
    for ref in adapter.blocks(model):
        block = model.get_submodule(ref.name)
        # a forward already set on the instance (accelerate's offload hooks do that) is wrapped and put back
        patched.append((block, block.__dict__.get("forward")))
        block.forward = _chunked_forward(block.forward, adapter.per_sample_inputs, rows)
    try:
        yield model
    finally:
        for block, own in patched:
            if own is None:
                del block.forward                # back to the class's forward
            else:
                block.forward = own


def _chunked_forward(forward, per_sample: tuple[str, ...], rows: int):
    signature = inspect.signature(forward)

    def run(*args, **kwargs):
        named = _by_name(signature, args, kwargs) if args else kwargs
        lead = None if named is None else next((named[k] for k in per_sample if torch.is_tensor(named.get(k))), None)
        batch = 0 if lead is None else lead.shape[0]
        if batch <= rows:
            return forward(*args, **kwargs)
        split = {k for k in per_sample if torch.is_tensor(named.get(k)) and named[k].shape[0] == batch}
        return _concat([forward(**{k: (v[i:i + rows] if k in split else v) for k, v in named.items()})
                        for i in range(0, batch, rows)])
    return run


def _by_name(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """A call's arguments as keywords; None when some cannot be named (extra positional ones)."""
    named = {}
    for k, v in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[k].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if v:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(v)
        else:
            named[k] = v
    return named


def _concat(outs: list):
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    if first is None:
        return None
    raise CalibrationError(f"a block returned {type(first).__name__}; calibration's block_batch can only join "
                           "tensors and tuples of tensors", hint="unset calibration.block_batch for this model")
