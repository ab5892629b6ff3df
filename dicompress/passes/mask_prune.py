"""`mask_prune` pass (EcoDiff, arXiv 2412.02852): learn a hard-concrete mask per attention head and FFN neuron of
the selected blocks on the final latent of the whole sampling trajectory, against the unpruned model's from the
same initial noise and conditions, plus `beta` x the L0 term; binarise to the budget; remove physically.

- the masks and their hooks: `prune.masks`; the trajectories (rebuilt from the calibration's captured model inputs,
  replayed and checked against them), time-step gradient checkpointing and plain backpropagation:
  `prune.trajectory`;
- loss: relative squared error of the final latent, ||z_T(masks) - z_T||^2 / ||z_T||^2 (`trajectory`), or of the
  velocity at every row of the same trajectories (`onestep`: mask pruning without the trajectory loss);
- L0 term: the expected fraction of the selected blocks' parameters kept (each unit's P(gate != 0) weighted by
  the parameters it holds), so `beta` trades loss against a fraction whatever the model's size, and heads (which
  hold ~100x a neuron's parameters) pay for what they cost;
- binarise: `ratio` (exact budget: the planners of `width_prune` with the learned log_alpha as scores) or
  `threshold` (deterministic gate above `threshold`; the reached fraction must be within `tolerance` of `ratio`);
- removal: `prune_width` (torch-pruning's pruning functions), manifest `width` entries, as `width_prune`.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..errors import RecipeError
from ..prune.masks import MaskSet
from ..prune.trajectory import (check_replay, checkpointed_grad, euler_step, full_grad, model_velocity,
                                trajectories_from_rows)
from ..prune.width_plan import plan_threshold, removed_params
from .base import register_pass
from .width_prune import WidthBudgetConfig, WidthPass


class MaskPruneConfig(WidthBudgetConfig):
    heads: bool = Field(False, description="mask and prune attention heads too (embedded model, 20%, heads and FFN "
                                           "neurons competing globally: 5 heads removed, Frechet 27.0 vs 20.8 for "
                                           "FFN neurons alone)")
    loss: Literal["trajectory", "onestep"] = Field(
        "trajectory", description="trajectory: the final latent of the whole sampling trajectory vs the unpruned "
                                  "model's (EcoDiff) | onestep: the velocity at each captured row of the teacher's "
                                  "trajectories vs the teacher's (the baseline without the trajectory loss)")
    beta: float = Field(1.0, ge=0, description="weight of the L0 term (expected kept fraction of the selected "
                                               "blocks' parameters) against the relative squared error. EcoDiff's "
                                               "0.01 is for its own loss scale: here it left the masks where they "
                                               "start (embedded model, 60 steps: expected kept 0.996, Frechet 44.3 "
                                               "at 20%); 1 gave 20.8, 10 gave 25.0")
    steps: int = Field(60, ge=1, description="optimisation steps")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the mask logits (log_alpha)")
    batch: int = Field(4, ge=1, description="trajectories per step (onestep: their rows, all sampling steps)")
    binarize: Literal["ratio", "threshold"] = Field(
        "ratio", description="ratio: remove exactly the budget, lowest learned log_alpha first (per `allocation`) | "
                             "threshold: remove the units whose deterministic gate is at most `threshold`")
    threshold: float = Field(0.5, gt=0, lt=1, description="binarize: threshold: the gate below which a unit goes")
    tolerance: float = Field(0.05, gt=0, lt=1, description="binarize: threshold: how far the removed fraction may "
                                                           "be from `ratio` (else an error, nothing removed)")
    checkpointing: bool = Field(True, description="time-step gradient checkpointing (activation memory of one "
                                                  "sampling step); false: plain backpropagation through all steps")
    seed: int = Field(0, ge=0, description="trajectory batches and the hard-concrete noise")


@register_pass
class MaskPrune(WidthPass):
    name = "mask_prune"
    Config = MaskPruneConfig
    needs_calibration = True
    needs_model_inputs = True      # the trajectories are rebuilt from the model inputs alone
    needs_sampling_loop = True     # the trajectories are rebuilt from the captured rows: `synthetic` has none
    normalise_scores = False       # log_alpha of every unit trained against one L0 term in parameters: comparable

    def apply(self, state) -> None:
        c = self.config
        model, adapter = state.model, state.adapter
        refs, shapes, ffns = self._budget(model, adapter)
        store = self.calibration(state)
        inputs = store.model_inputs()
        traj = trajectories_from_rows(inputs, store.meta)
        if c.loss == "trajectory":
            check_replay(model, traj, inputs)
        t0 = time.perf_counter()
        masks = MaskSet(model, adapter, refs, c.heads, ffns)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            curve = self._train(state, masks, traj, inputs)
        finally:
            for p, w in frozen:
                p.requires_grad_(w)
        seconds = time.perf_counter() - t0
        scores = masks.scores()
        if c.binarize == "threshold":
            gates = {b: {k: g.detach().float().cpu() for (bb, k), g in masks.deterministic().items() if bb == b}
                     for b in shapes}
            keep = plan_threshold(shapes, gates, c.threshold)
            reached = removed_params(shapes, keep) / sum(s.params for s in shapes.values())
            if abs(reached - c.ratio) > c.tolerance:
                raise RecipeError(f"gates above {c.threshold} remove {reached:.3f} of the selected blocks' "
                                  f"parameters, not {c.ratio} (tolerance {c.tolerance}); nothing was removed",
                                  key=f"{self.name}.beta", hint="binarize: ratio meets the budget exactly; or raise "
                                  "beta (removes more) / lower it (removes less)")
            keep = self._plan_or_error(adapter, refs, shapes, ffns, scores, keep)
        else:
            keep = self._plan_or_error(adapter, refs, shapes, ffns, scores)
        every = self._block_params(model, adapter)
        self._remove(state, keep)
        self._report(state, refs, shapes, keep, every, {
            "loss": c.loss, "binarize": c.binarize, "allocation": c.allocation, "steps": c.steps,
            "batch": c.batch, "beta": c.beta, "lr": c.lr, "checkpointing": c.checkpointing,
            "trajectories": traj.samples, "sampling_steps": traj.steps,
            "loss_first": round(curve[0][0], 6), "loss_last": round(curve[-1][0], 6),
            "kept_fraction_expected_last": round(curve[-1][1], 4),
            "loss_curve": [round(x, 6) for x, _ in curve], "train_seconds": round(seconds, 1)})

    # -- training -----------------------------------------------------------------------------------------
    def _targets(self, model, traj, inputs) -> torch.Tensor:
        """trajectory: the teacher's final latents [S, ...] (its last captured row, one Euler step on); onestep:
        the teacher's velocity at every captured row [S, T, ...]."""
        p = next(model.parameters())
        onestep = self.config.loss == "onestep"
        z_at = lambda idx, step: inputs["hidden_states"][traj.rows[idx, step]].to(p.device, p.dtype)  # noqa: E731
        out = torch.empty((traj.samples,) + ((traj.steps,) if onestep else ()) + tuple(traj.z0.shape[1:]))
        with torch.no_grad():
            for i in range(0, traj.samples, self.config.batch):
                idx = torch.arange(i, min(i + self.config.batch, traj.samples))
                vel = model_velocity(model, traj, idx)
                sig = traj.sigmas[idx].to(p.device)
                if onestep:
                    for step in range(traj.steps):
                        out[idx, step] = vel(z_at(idx, step), sig[:, step].to(p.dtype)).float().cpu()
                else:
                    out[idx] = euler_step(vel, z_at(idx, traj.steps - 1), sig, traj.steps - 1).float().cpu()
        return out

    def _train(self, state, masks: MaskSet, traj, inputs) -> list[tuple[float, float]]:
        c, model = self.config, state.model
        p = next(model.parameters())
        targets = self._targets(model, traj, inputs)
        params = list(masks.log_alpha)
        opt = torch.optim.Adam(params, lr=c.lr)
        gen = torch.Generator().manual_seed(c.seed)
        grad_fn = checkpointed_grad if c.checkpointing else full_grad
        curve = []
        bar = tqdm(total=c.steps, desc="mask_prune", unit="step", disable=not state.progress)
        with masks.applied(model):
            for _ in range(c.steps):
                idx = torch.randperm(traj.samples, generator=gen)[:c.batch]
                u = masks.noise(gen)
                vel0 = model_velocity(model, traj, idx)

                def vel(z, sigma):
                    masks.gates = masks.sampled(u)    # inside each step's graph: d gates / d log_alpha
                    return vel0(z, sigma)
                sig = traj.sigmas[idx].to(p.device)
                if c.loss == "trajectory":
                    tgt = targets[idx].to(p.device, p.dtype)
                    norm = tgt.square().sum()
                    loss, grads = grad_fn(vel, traj.z0[idx].to(p.device, p.dtype), sig,
                                          lambda z: (z - tgt).square().sum() / norm, params)
                else:
                    loss, grads = self._onestep_grad(vel, traj, inputs, idx, targets, sig, params)
                with torch.enable_grad():
                    kept = masks.expected_kept_fraction()
                    l0 = torch.autograd.grad(kept, params)
                for prm, g, g0 in zip(params, grads, l0):
                    prm.grad = g + c.beta * g0
                opt.step()
                opt.zero_grad(set_to_none=True)
                curve.append((float(loss), float(kept.detach())))
                bar.set_postfix(loss=f"{float(loss):.4g}", kept=f"{float(kept.detach()):.3f}")
                bar.update(1)
        bar.close()
        return curve

    @staticmethod
    def _onestep_grad(vel, traj, inputs, idx, targets, sig, params):
        p = params[0]
        acc = [torch.zeros_like(q) for q in params]
        total = 0.0
        tgt = targets[idx].to(p.device, p.dtype)
        norm = tgt.square().sum()
        for step in range(traj.steps):
            z = inputs["hidden_states"][traj.rows[idx, step]].to(p.device, p.dtype)
            with torch.enable_grad():
                loss = (vel(z, sig[:, step].to(p.dtype)) - tgt[:, step]).square().sum() / norm
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += g
            total += float(loss.detach())
        return torch.tensor(total), acc
