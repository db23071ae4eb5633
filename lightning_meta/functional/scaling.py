"""The loss scale of the inner loop under fp16 autocast.

Lightning's precision plugin scales the *outer* loss (``torch.amp.GradScaler``), but the inner loop differentiates
its own losses inside the step, where fp16 gradients underflow to zero just the same. :class:`InnerLossScaler` is
the inner loop's scale: the inner losses (and the outer one, before the meta-gradient is taken) are multiplied by
it and the gradients divided by it. It is dynamic like ``GradScaler``: smaller after a step skipped for
non-finite values, larger after a run of good steps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["InnerLossScaler"]


class InnerLossScaler:
    """A dynamic (or fixed) loss scale with the shape of ``torch.amp.GradScaler``, for gradients taken inside a step.

    Args:
        init_scale: the starting scale.
        growth_factor: the scale is multiplied by it after ``growth_interval`` good steps in a row (at most
            ``max_scale``).
        backoff_factor: the scale is multiplied by it after a skipped step (at least ``min_scale``).
        growth_interval: good steps in a row before the scale grows.
        max_scale: upper bound of the scale (fp16's largest normal number is 65504: a scale beyond 2**16 turns
            ordinary losses into inf).
        min_scale: lower bound of the scale.
        dynamic: False keeps ``init_scale`` whatever happens.

    Example:
        >>> s = InnerLossScaler(init_scale=8.0, growth_interval=2)
        >>> s.update(found_nonfinite=True); s.scale
        4.0
        >>> s.update(False); s.update(False); s.scale
        8.0
        >>> InnerLossScaler().load_state_dict({"scale": 64.0, "good_steps": 3})
    """

    def __init__(
        self,
        init_scale: float = 2.0**12,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 200,
        max_scale: float = 2.0**16,
        min_scale: float = 1.0,
        dynamic: bool = True,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale} must be > 0")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor={growth_factor} must be > 1")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor={backoff_factor} must be in (0, 1)")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval={growth_interval!r} must be an integer >= 1")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"min_scale={min_scale} and max_scale={max_scale} must satisfy 0 < min_scale <= max_scale")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.max_scale, self.min_scale, self.dynamic = max_scale, min_scale, dynamic
        self.scale = float(init_scale)
        #: good steps since the last change of the scale
        self.good_steps = 0

    def update(self, found_nonfinite: bool) -> None:
        """Record one optimizer step: skipped (``found_nonfinite``) backs off, a run of good ones grows the scale."""
        if not self.dynamic:
            return
        if found_nonfinite:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"scale", "good_steps"}`` (plain Python numbers)."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values."""
        if not isinstance(state, dict) or not {"scale", "good_steps"} <= set(state):
            raise ValueError(f"not an InnerLossScaler state (needs 'scale' and 'good_steps'): {state!r:.200}")
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
