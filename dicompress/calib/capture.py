"""Hooks that record what a sampling loop feeds each block and each linear.

Forward hooks on named blocks are enough for DiTs (blocks are regular); no tracing.
"""
from __future__ import annotations

import torch
from torch import nn

from .store import StoreWriter, flatten


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


class Capture:
    """Context manager: while active, model forwards are recorded into a StoreWriter.

    `flush()` writes what was buffered since the last flush as one chunk per block (call it after
    each sampling batch so memory holds one batch x its timesteps at most).
    """

    def __init__(self, model: nn.Module, adapter, writer: StoreWriter, block_inputs: bool = True,
                 linear_stats: bool = True):
        self.model, self.adapter, self.writer = model, adapter, writer
        self.block_inputs, self.want_stats = block_inputs, linear_stats
        self.blocks = adapter.blocks(model)
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
                    per.setdefault(k, []).append(t.detach().float().cpu())
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
        for ref in self.blocks:
            block = self.model.get_submodule(ref.name)
            if self.block_inputs:
                h.append(block.register_forward_pre_hook(self._on_block(ref.name), with_kwargs=True))
            if self.want_stats:
                for sub, mod in block.named_modules():
                    if isinstance(mod, nn.Linear):
                        h.append(mod.register_forward_pre_hook(self._on_linear(f"{ref.name}.{sub}")))
        if self.block_inputs and self.blocks:
            last = self.model.get_submodule(self.blocks[-1].name)
            h.append(last.register_forward_hook(self._on_last_block, with_kwargs=True))
        return self

    def flush(self) -> None:
        for name, per in self._buf.items():
            self.writer.write_block_chunk(name, {k: torch.cat(v) for k, v in per.items()})
        if self._final:
            self.writer.write_chunk("final", {k: torch.cat(v) for k, v in self._final.items()})
        self._buf, self._final = {}, {}

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc[0] is None:
            self.flush()
            if self.want_stats:
                self.writer.write_linear_stats({n: s.tensors() for n, s in self.stats.items()})
