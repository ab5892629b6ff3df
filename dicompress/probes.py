"""What the write-time load check compares (io/load_check.py): probes of the model as it is in memory, taken
just before it is written.

- `model_probes`: the whole model, its first and its last block, on the architecture's small synthetic inputs
  (one sample, fixed seed): the in-memory path, and `dicompress.save`. A model with CLEAR attention gets them on
  its calibration grid: the loaded blocks, run on their own, assume that grid (clear/processor.py).
- `block_probe`: one streamed block on the first row of its calibration inputs, while it is in memory.
"""
from __future__ import annotations

import torch
from torch import nn

from .calib.store import read_file, to_module, unflatten
from .io.load_check import Probe, record_probes

SEED = 0


def model_probes(model: nn.Module, adapter) -> list[Probe]:
    from .clear.processor import standalone_grid
    p = next(model.parameters())
    grid = standalone_grid(model)
    inputs = adapter.synthetic_inputs(model, 1, torch.Generator().manual_seed(SEED),
                                      **({"grid": grid} if grid else {}))
    inputs = to_module(inputs, p.device, p.dtype)
    blocks = [b.name for b in adapter.blocks(model)]
    names = ["", *dict.fromkeys([blocks[0], blocks[-1]])] if blocks else [""]
    return record_probes(model, names, lambda: model(**inputs, return_dict=False))


def block_probe(block: nn.Module, name: str, adapter, inputs, device, dtype: torch.dtype) -> Probe | None:
    """`block` (named `name` in the model; computing in `dtype` on `device`) on row 0 of the first chunk of
    `inputs` (stream.blockdata.BlockInputs); None without inputs."""
    if not inputs.files:
        return None
    row = {k: v[:1] for k, v in read_file(inputs.files[0]).items()}
    shared = read_file(inputs.shared) if inputs.shared is not None and inputs.shared.exists() else {}
    kwargs = to_module(unflatten({**row, **shared}), device, dtype)
    probes = record_probes(block, [""], lambda: adapter.run_block(block, kwargs))
    return Probe(name, probes[0].args, probes[0].kwargs, probes[0].output) if probes else None
