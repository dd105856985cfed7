"""The one-cycle schedule computed on the device, for a training step that runs as a CUDA graph.

A replayed graph repeats the kernels it captured with the arguments they had then: OneCycleLR, which
writes Python floats (the learning rate, and Adam's beta1 when it cycles momentum) into the
optimiser's param groups on the host, would be frozen at its capture-time values. DeviceOneCycle
keeps the step count in a device tensor and computes both values from it with tensor ops, then
writes them in place into the tensors the optimiser reads (`lr` and `betas[0]`, which
`Adam(capturable=True)` accepts as tensors), and advances the count: all inside the graph.

The numbers are OneCycleLR's (torch.optim.lr_scheduler), phase by phase: the same phase boundaries,
the same cosine or linear interpolation, in float64, so the two agree to rounding at every step
(tests/test_device_schedule.py holds them to it step by step). The "constant" schedule is one value.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


class DeviceOneCycle:
    """OneCycleLR over `total_steps` for `opt`, computed on `device` from a step counter tensor.

    `step()` sets the values for the current step into the optimiser's tensors and advances the
    counter (call it where OneCycleLR's `step()` would go: after `opt.step()`; the values for step 0
    are set at construction, as OneCycleLR does). `values(step)` gives (lr, beta1) for any step, for
    checks and plots. `constant=True` is the "constant" schedule: lr = max_lr throughout, beta1 as
    given."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        *,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        anneal: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        constant: bool = False,
        device=None,
    ):
        if total_steps < 1:
            raise ValueError(f"DeviceOneCycle: total_steps must be at least 1, got {total_steps}")
        if anneal not in ("cos", "linear"):
            raise ValueError(f"DeviceOneCycle: anneal must be 'cos' or 'linear', got {anneal!r}")
        self.opt, self.total_steps, self.constant, self.anneal = opt, total_steps, constant, anneal
        self.cycle_momentum = cycle_momentum and not constant
        if self.cycle_momentum and not all("betas" in g for g in opt.param_groups):
            raise ValueError("DeviceOneCycle: cycling momentum needs an optimiser with betas (Adam)")
        device = torch.device(device) if device is not None else opt.param_groups[0]["params"][0].device
        self.device = device
        initial = max_lr / div_factor
        lr_points = {"initial": initial, "max": max_lr, "min": initial / final_div_factor}
        mom = {"max": max_momentum, "base": base_momentum}
        if three_phase:
            phases = [
                (float(pct_start * total_steps) - 1, "initial", "max", "max", "base"),
                (float(2 * pct_start * total_steps) - 2, "max", "initial", "base", "max"),
                (total_steps - 1, "initial", "min", "max", "max"),
            ]
        else:
            phases = [
                (float(pct_start * total_steps) - 1, "initial", "max", "max", "base"),
                (total_steps - 1, "max", "min", "base", "max"),
            ]
        # Per phase: [start step, end step, start lr, end lr, start momentum, end momentum], float64.
        rows, start = [], 0.0
        for end, lr0, lr1, m0, m1 in phases:
            rows.append([start, float(end), lr_points[lr0], lr_points[lr1], mom[m0], mom[m1]])
            start = float(end)
        self.phases = torch.tensor(rows, dtype=torch.float64, device=device)
        self.max_lr = max_lr
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        # The tensors the optimiser reads: made tensors here (on the device) if they are floats.
        for group in opt.param_groups:
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64, device=device)
            if self.cycle_momentum and not isinstance(group["betas"][0], Tensor):
                group["betas"] = (
                    torch.tensor(float(group["betas"][0]), dtype=torch.float64, device=device),
                    group["betas"][1],
                )
        self._write(self.step_count)

    def values(self, step: Tensor | int) -> tuple[Tensor, Optional[Tensor]]:
        """(lr, beta1) at `step`, float64 tensors on the device; beta1 is None when momentum does not
        cycle. Tensor ops only: no host sync, capturable."""
        step = torch.as_tensor(step, device=self.device).to(torch.float64)
        if self.constant:
            return torch.full_like(step, self.max_lr), None
        # The first phase whose end step is >= step, else the last (OneCycleLR's search).
        ends = self.phases[:, 1]
        index = torch.clamp((ends < step).sum(), max=len(ends) - 1)
        start, end, lr0, lr1, m0, m1 = self.phases[index].unbind()
        pct = (step - start) / (end - start)
        if self.anneal == "cos":  # OneCycleLR's expressions, operation for operation
            cos_out = torch.cos(math.pi * pct) + 1
            lr, beta1 = lr1 + (lr0 - lr1) / 2.0 * cos_out, m1 + (m0 - m1) / 2.0 * cos_out
        else:
            lr, beta1 = (lr1 - lr0) * pct + lr0, (m1 - m0) * pct + m0
        return lr, beta1 if self.cycle_momentum else None

    def _write(self, step: Tensor) -> None:
        lr, beta1 = self.values(step)
        for group in self.opt.param_groups:
            group["lr"].copy_(lr)
            if self.cycle_momentum:
                group["betas"][0].copy_(beta1)

    def step(self) -> None:
        """Advance to the next step and set its values (device ops only)."""
        self.step_count += 1
        self._write(self.step_count)

    def get_last_lr(self) -> list[float]:
        """The learning rate the next optimiser step uses, as OneCycleLR's get_last_lr (a host sync: for
        reports, not for the step)."""
        return [float(group["lr"]) for group in self.opt.param_groups]

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` of the run (a host sync: for reports)."""
        return float(self.values(step)[0])

    def state_dict(self) -> dict:
        return {"step_count": int(self.step_count), "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("total_steps", self.total_steps) != self.total_steps:
            raise ValueError(
                f"DeviceOneCycle: the saved schedule has {state['total_steps']} steps, this one {self.total_steps}"
            )
        self.step_count.fill_(int(state["step_count"]))
        self._write(self.step_count)
