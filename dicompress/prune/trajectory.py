"""The whole sampling trajectory, differentiable: rebuilt from the calibration's captured model inputs, replayed
with the pipeline's own flow-matching Euler loop, and differentiated either through one graph over every step
(plain backpropagation) or one step at a time (time-step gradient checkpointing, EcoDiff).

Captured rows (`CalibrationStore.model_inputs()`) are ordered per model call: a call is one sampling step of one
chunk of samples (its rows: the chunk's samples), and a chunk's T calls follow each other. FLUX and Qwen-Image
pipelines pass the transformer timestep = sigma (t / 1000), and FlowMatchEulerDiscreteScheduler steps
z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v_i, with a last sigma of 0. So a trajectory is its initial latent, its
conditions and its sigmas; `replay_error` checks that the loop rebuilt here reproduces the captured latents (it
would not where the pipeline steps with something else than the model's output, e.g. true classifier-free
guidance's combination of two calls).

Time-step gradient checkpointing: run the T steps without autograd keeping only the latents (T + 1 of them, the
size of the model's input each), take g = dL/dz_T, then walk back: recompute step i with autograd from z_i,
accumulate the parameters' gradient and carry g <- (dz_{i+1}/dz_i)^T g (`torch.autograd.grad` with
`grad_outputs=g`). Activation memory is one step's, whatever T; compute is one extra forward per step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..calib.encoding import to_module
from ..errors import CalibrationError
from .saved_tensors import SavedTensorMeter

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (z [B, ...], sigma [B]) -> v


@dataclass
class Trajectories:
    z0: torch.Tensor                 # [S, ...] initial latents
    sigmas: torch.Tensor             # [S, T + 1], decreasing, last 0
    cond: dict                       # per-sample kwargs at step 0 (tensors [S, ...] or lists of S)
    shared: dict                     # kwargs shared by every row (FLUX's img_ids / txt_ids ...)
    rows: torch.Tensor               # [S, T] the captured row of sample s at step i

    @property
    def samples(self) -> int:
        return self.z0.shape[0]

    @property
    def steps(self) -> int:
        return self.sigmas.shape[1] - 1

    def with_steps(self, steps: int) -> "Trajectories":
        """The same samples on a uniform schedule of `steps` steps (sigma 1 -> 1/steps, then 0): for measuring
        how cost grows with T beyond the captured schedule. `rows` no longer applies (empty)."""
        s = torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)]).to(self.sigmas)
        return replace(self, sigmas=s.expand(self.samples, -1).clone(), rows=torch.empty(self.samples, 0,
                                                                                          dtype=torch.long))


def _calls(ts: torch.Tensor) -> list[tuple[int, int]]:
    """(start, size) of each model call: runs of equal timestep (a sampling loop never calls twice in a row at
    one timestep unless it has one step, where every row is its own one-step trajectory anyway)."""
    out, start = [], 0
    for i in range(1, len(ts) + 1):
        if i == len(ts) or ts[i] != ts[start]:
            out.append((start, i - start))
            start = i
    return out


def trajectories_from_rows(model_inputs, meta: dict | None = None) -> Trajectories:
    """The captured sampling trajectories of a calibration store's model inputs (see the module docstring)."""
    if meta is not None and meta.get("source") == "synthetic":
        raise CalibrationError("calibration source 'synthetic' holds random inputs at a spread of timesteps, not "
                               "sampling trajectories", hint="use source: classes, embeddings or prompts")
    per = model_inputs.per_sample
    if "timestep" not in per or "hidden_states" not in per:
        raise CalibrationError("the captured model inputs have no per-row timestep / hidden_states")
    ts = model_inputs["timestep"].double()
    calls = _calls(ts)
    chunks: list[list[tuple[int, int]]] = []
    for c in calls:
        prev = chunks[-1][-1] if chunks else None
        if prev is not None and c[1] == prev[1] and ts[c[0]] < ts[prev[0]]:
            chunks[-1].append(c)
        else:
            chunks.append([c])
    steps = {len(ch) for ch in chunks}
    if len(steps) != 1:
        raise CalibrationError(f"the captured trajectories have different step counts {sorted(steps)}",
                               hint="capture with one `steps` setting")
    rows, sig = [], []
    for ch in chunks:
        for j in range(ch[0][1]):
            r = [start + j for start, _ in ch]
            rows.append(r)
            sig.append([float(ts[i]) for i in r] + [0.0])
    rows_t = torch.tensor(rows, dtype=torch.long)
    first = rows_t[:, 0]
    cond = {}
    for k in per - {"hidden_states", "timestep"}:
        v = model_inputs[k]
        cond[k] = v[first] if torch.is_tensor(v) else [v[i] for i in first.tolist()]
    shared = {k: v for k, v in model_inputs.items() if k not in per}
    return Trajectories(model_inputs["hidden_states"][first], torch.tensor(sig, dtype=torch.float32), cond,
                        shared, rows_t)


def model_velocity(model, traj: Trajectories, idx: torch.Tensor) -> Velocity:
    """v(z, sigma) of `model` for samples `idx` of `traj`, on the model's device and dtype."""
    p = next(model.parameters())
    kw = {k: to_module(v, p.device, p.dtype, cast=False) for k, v in traj.shared.items()}
    for k, v in traj.cond.items():
        kw[k] = to_module(v[idx], p.device, p.dtype) if torch.is_tensor(v) else [v[i] for i in idx.tolist()]

    def velocity(z, sigma):
        return model(hidden_states=z, timestep=sigma, **kw, return_dict=False)[0]
    return velocity


def euler_step(velocity: Velocity, z: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
    """FlowMatch Euler: z + (sigma_{i+1} - sigma_i) v(z, sigma_i), per sample; as the scheduler does it, in fp32 at
    least (sigmas and sum), the result in the model's dtype."""
    v = velocity(z, sigmas[:, i].to(z.dtype))
    acc = torch.promote_types(z.dtype, torch.float32)
    dt = (sigmas[:, i + 1] - sigmas[:, i]).to(acc).view(-1, *([1] * (z.ndim - 1)))
    return (z.to(acc) + dt * v.to(acc)).to(v.dtype)


@torch.no_grad()
def run_latents(velocity: Velocity, z0: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """z_0 .. z_T, without autograd."""
    zs = [z0]
    for i in range(sigmas.shape[1] - 1):
        zs.append(euler_step(velocity, zs[-1], sigmas, i))
    return zs


def replay_error(model, traj: Trajectories, model_inputs, idx: torch.Tensor) -> float:
    """Largest |replayed latent - captured hidden_states| over steps 1..T-1 of samples `idx`, relative to the
    captured latents' largest magnitude."""
    p = next(model.parameters())
    sig = traj.sigmas[idx].to(p.device)
    zs = run_latents(model_velocity(model, traj, idx), traj.z0[idx].to(p.device, p.dtype), sig)
    err, scale = 0.0, 0.0
    for i in range(1, traj.steps):
        ref = model_inputs["hidden_states"][traj.rows[idx, i]].to(p.device, p.dtype)
        err = max(err, float((zs[i] - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return err / max(scale, 1e-12)


def check_replay(model, traj: Trajectories, model_inputs, samples: int = 2, rtol: float | None = None) -> float:
    """CalibrationError unless the teacher's replayed trajectories reproduce the captured ones (to `rtol` of their
    magnitude; default 1e-3 in fp32 / fp64, 3e-2 in half precision, whose rounding compounds over the steps)."""
    if rtol is None:
        rtol = 1e-3 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 3e-2
    err = replay_error(model, traj, model_inputs, torch.arange(min(samples, traj.samples)))
    if not err <= rtol:
        raise CalibrationError(
            f"the captured trajectories are not the model's flow-matching Euler trajectories (replayed latents off "
            f"by {err:.2e} of their magnitude): the pipeline does not step with the model's output as the velocity "
            "(e.g. true classifier-free guidance combines two calls per step), or it passes a timestep that is not "
            "sigma", hint="capture calibration without true CFG (FLUX: guidance-distilled models pass `guidance` "
                          "instead), or use loss: onestep")
    return err


# -- gradients ----------------------------------------------------------------------------------------------

def _accumulate(acc: list[torch.Tensor | None], grads) -> None:
    for j, g in enumerate(grads):
        if g is not None:
            acc[j] = g if acc[j] is None else acc[j] + g


def checkpointed_grad(velocity: Velocity, z0: torch.Tensor, sigmas: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor]):
    """(loss, [dL/dp]) over the whole trajectory, one step's activations at a time."""
    zs = run_latents(velocity, z0, sigmas)
    zt = zs[-1].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zt)
        g, = torch.autograd.grad(loss, zt)
    acc: list[torch.Tensor | None] = [None] * len(params)
    for i in reversed(range(len(zs) - 1)):
        z = zs[i].detach().requires_grad_(i > 0)
        with torch.enable_grad():
            out = euler_step(velocity, z, sigmas, i)
            wrt = ([z] if i > 0 else []) + list(params)
            grads = torch.autograd.grad(out, wrt, grad_outputs=g, allow_unused=True)
        if i > 0:
            g, grads = grads[0], grads[1:]
        _accumulate(acc, grads)
        del out
    return loss.detach(), [a if a is not None else torch.zeros_like(p) for a, p in zip(acc, params)]


def full_grad(velocity: Velocity, z0: torch.Tensor, sigmas: torch.Tensor,
              loss_fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor]):
    """(loss, [dL/dp]) by plain backpropagation through one graph over all T steps."""
    with torch.enable_grad():
        z = z0
        for i in range(sigmas.shape[1] - 1):
            z = euler_step(velocity, z, sigmas, i)
        loss = loss_fn(z)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


# -- activation memory -------------------------------------------------------------------------------------

def activation_peaks(model, make_velocity: Callable[[], Velocity], traj: Trajectories, idx: torch.Tensor,
                     params: Sequence[torch.Tensor], steps: Sequence[int] = (4, 8, 16, 32)) -> dict:
    """{"checkpointed": {T: bytes}, "plain": {T: bytes}}: peak activation memory (`SavedTensorMeter`) of one
    trajectory gradient at each T, the final latent's mean square as the loss. `make_velocity()` gives the
    (masked) velocity of samples `idx`."""
    p = next(model.parameters())
    exclude = list(model.parameters()) + list(model.buffers())
    out: dict[str, dict[int, int]] = {"checkpointed": {}, "plain": {}}
    for name, fn in (("checkpointed", checkpointed_grad), ("plain", full_grad)):
        for t in steps:
            tr = traj.with_steps(t)
            meter = SavedTensorMeter(exclude)
            with meter.metering():
                fn(make_velocity(), tr.z0[idx].to(p.device, p.dtype), tr.sigmas[idx].to(p.device),
                   lambda z: z.square().mean(), params)
            out[name][int(t)] = meter.peak
    return out


def peak_memory_by_steps(model, adapter, model_inputs, steps: Sequence[int] = (4, 8, 16, 32), samples: int = 1,
                         seed: int = 0) -> dict:
    """`activation_peaks` of mask training as `mask_prune` does it: a mask on every head and FFN neuron of every
    block (log_alpha at its initial value, one hard-concrete draw), the first `samples` captured trajectories put
    on uniform schedules of T steps; the mask logits' gradient, checkpointed and plain. Bytes of saved tensors
    (not RSS): deterministic on CPU, the same count a GPU allocator would hold for them."""
    from .masks import MaskSet
    from .width import layout_for
    refs = adapter.blocks(model)
    masks = MaskSet(model, adapter, refs, True, {r.name: tuple(f.key for f in layout_for(adapter, r.stream).ffns)
                                                 for r in refs})
    traj = trajectories_from_rows(model_inputs)
    idx = torch.arange(min(samples, traj.samples))
    u = masks.noise(torch.Generator().manual_seed(seed))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with masks.applied(model):
            def make():
                v0 = model_velocity(model, traj, idx)

                def vel(z, sigma):
                    masks.gates = masks.sampled(u)
                    return v0(z, sigma)
                return vel
            return activation_peaks(model, make, traj, idx, list(masks.log_alpha), steps)
    finally:
        for p, w in frozen:
            p.requires_grad_(w)
