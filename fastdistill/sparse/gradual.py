"""GradualPruner: Zhu & Gupta (2017) cubic sparsity schedule, applied from the training loop.

s(t) = s_f + (s_i - s_f) · (1 - (t - t0) / (t1 - t0))³ for t0 <= t <= t1, pruning at t0, t0 + every, ...
and always at t1, so the final sparsity is reached exactly at end_step. Each pruning step calls prune_
(masks only grow), so every layer's sparsity equals round(s(t) · numel) / numel right after the step
(layer scope; global scope: the total).
"""
from __future__ import annotations

from torch import nn

from fastdistill.sparse.prune import PruneReport, check_model, prune_


class GradualPruner:
    def __init__(self, model: nn.Module, final_sparsity: float, *, start_step: int, end_step: int, every: int,
                 initial_sparsity: float = 0.0, pattern: str = "unstructured", **prune_kwargs):
        check_model(model)
        for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity: {initial_sparsity} is above final_sparsity {final_sparsity}")
        if not (isinstance(start_step, int) and isinstance(end_step, int) and 0 <= start_step <= end_step):
            raise ValueError(f"start_step/end_step: expected integers with 0 <= start_step <= end_step, got "
                             f"{start_step!r}, {end_step!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an integer >= 1, got {every!r}")
        if pattern == "2:4":
            raise ValueError("pattern: 2:4 has one fixed sparsity (0.5); use prune_ instead of a schedule")
        self.model, self.final, self.initial = model, float(final_sparsity), float(initial_sparsity)
        self.start, self.end, self.every = start_step, end_step, every
        self.pattern, self.prune_kwargs = pattern, prune_kwargs
        self.step_count = 0
        self.last_report: PruneReport | None = None

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after `step` steps (constant between pruning steps)."""
        if step < self.start:
            return 0.0
        if self.end == self.start:
            return self.final
        t = min(step, self.end)
        if t < self.end:
            t = self.start + (t - self.start) // self.every * self.every  # the last pruning step
        frac = (t - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def is_pruning_step(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)

    def step(self) -> PruneReport | None:
        """Call once per training step (after optimizer.step()); prunes on schedule, returns the report then."""
        t = self.step_count
        self.step_count += 1
        if not self.is_pruning_step(t):
            return None
        self.last_report = prune_(self.model, self.sparsity_at(t), pattern=self.pattern, **self.prune_kwargs)
        return self.last_report

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step counter saved by state_dict(); refuses anything else with the key named."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected the dict from GradualPruner.state_dict(), got {type(state).__name__}")
        if "step_count" not in state:
            raise ValueError("state: missing key 'step_count'")
        extra = sorted(map(str, set(state) - {"step_count"}))
        if extra:
            raise ValueError(f"state: unexpected key(s) {extra}")
        count = state["step_count"]
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"step_count: expected an int, got {type(count).__name__}")
        if count < 0:
            raise ValueError(f"step_count: expected an integer >= 0, got {count}")
        self.step_count = count
