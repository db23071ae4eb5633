"""iMAML: Meta-Learning with Implicit Gradients (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019, arXiv:1909.04630).

Inner problem per task: the proximal objective ``G(phi) = L_support(phi) + lam/2 * ||phi - theta||^2``, solved
approximately from ``phi = theta`` *without* a graph to ``theta`` (so memory does not grow with the number of
steps), by one of the paper's two inner solvers (``inner_solver``):

* ``"gd"`` ("iMAML, GD"): ``inner_steps`` gradient steps (or any :class:`~lightning_meta.optim.UpdateRule`);
* ``"hessian_free"`` ("iMAML, Hessian-Free"): ``newton_steps`` truncated Newton steps. Each solves
  ``(H_G + newton_damping * I) d = -grad G(phi)`` approximately by ``newton_cg_steps`` conjugate-gradient
  iterations from ``d = 0`` with Hessian-vector products of ``G`` (``H_G = H + lam * I``, ``H`` the support-loss
  Hessian), then takes ``phi <- phi + t * d`` with ``t`` the first of ``1, s, s^2, ...`` (``line_search_steps``
  candidates, ``s = line_search_shrink``) that satisfies the Armijo condition
  ``G(phi + t d) <= G(phi) + line_search_c * t * <grad G, d>``; ``t = 0`` (no move) if none does, or if ``d`` is
  not a descent direction, so ``G`` never increases.

At the solution ``phi*``, ``d phi*/d theta = (I + H/lam)^{-1}`` with ``H`` the Hessian of ``L_support`` at ``phi*``,
so the task's meta-gradient is

    g = (I + H/lam)^{-1} grad_phi L_query(phi*),

computed by ``cg_steps`` iterations of conjugate gradient on ``(I + H/lam) g = grad_phi L_query(phi*)`` with
Hessian-vector products (double backward through the support loss). Each task's ``g`` is handed to the base as its
outer direction (:meth:`~lightning_meta.algorithms.MetaLearner.task_meta_gradient`); the outer optimizer is Adam.

Defaults: the paper's Omniglot settings (caption of its Omniglot table): ``lam = 2.0``, 16 inner gradient steps for
5-way tasks (25 for 20-way), 5 CG steps, Adam in the outer loop. The paper does not state the inner rate; 0.01 (on
the mean cross-entropy) is the default of a public iMAML Omniglot script, unverified against the authors' runs.
Hessian-free: the same caption gives 5 CG steps for the search direction (``newton_cg_steps = 5``) and "line-search
to pick step size"; it states neither the number of Newton steps, nor a damping term, nor the line-search rule (the
authors' public code has no Hessian-free solver). ``newton_steps = 3`` is this library's choice; ``newton_damping =
0`` because ``G`` already adds ``lam * I`` to the Hessian (the proximal term is the damping); the backtracking
constants (``c = 1e-4``, halving) are the textbook ones of Nocedal & Wright (Algorithm 3.1), and
``line_search_steps = 5`` tries steps down to 1/16.

Departures from the paper:

* the gradient-descent solver also accepts any :class:`~lightning_meta.optim.UpdateRule` (``inner_rule``);
* Hessian-free: the line search runs on ``G`` (the caption does not say on which function) and evaluates all
  ``line_search_steps`` candidates (a fixed amount of work, so that it runs under ``torch.func.vmap``) instead of
  stopping at the first accepted one; a fixed number of CG iterations per Newton step (no residual-based
  stopping), from ``d = 0`` (no warm start across Newton steps); the Hessian is the exact one (no Gauss-Newton
  approximation), so with a non-convex support loss and a small ``lam`` CG can meet non-positive curvature: it
  takes no step along such a direction (:func:`conjugate_gradient`), and the line search keeps ``G`` from rising;
* the CG operator is exactly ``I + H/lam`` (the authors' script adds a damping term to it), with ``x0 = 0``;
* ``lam`` is fixed (not meta-learned). CG assumes ``I + H/lam`` positive definite (the paper's strong-convexity
  assumption); with a non-convex support loss and a small ``lam`` it need not be, and the solve is then unreliable:
  raise ``lam``;
* evaluation adapts with the same proximal objective and solver (``eval_inner_steps`` gradient steps or
  ``eval_newton_steps`` Newton steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast, get_args

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.functional.adaptation import functional_forward, gradient_steps
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.optim.rules import UpdateRule
from lightning_meta.utils import check_no_running_stats

__all__ = ["IMAML", "InnerSolver", "conjugate_gradient"]

Vector = dict[str, Tensor]
InnerSolver = Literal["gd", "hessian_free"]
_SOLVERS = get_args(InnerSolver)


def _dot(a: Vector, b: Vector) -> Tensor:
    return cast(Tensor, sum((a[n] * b[n]).sum() for n in a))  # a Tensor: the vectors are never empty


def conjugate_gradient(matvec: Callable[[Vector], Vector], b: Vector, steps: int) -> tuple[Vector, Tensor]:
    """Approximate ``A^{-1} b`` for a symmetric positive-definite ``A`` given as ``matvec``, from ``x0 = 0``.

    Runs exactly ``steps`` iterations (no data-dependent stopping, so it runs under ``torch.func.vmap``; a residual
    that reaches zero stops the updates). Returns ``(x, residual norms)``: ``||b - A x_k||`` for ``k = 0..steps``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x, res = conjugate_gradient(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1.0, 2.0])}, steps=2)
        >>> torch.allclose(A @ x["x"], torch.tensor([1.0, 2.0]), atol=1e-5), bool(res[-1] < 1e-4)
        (True, True)
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    x = {n: torch.zeros_like(v) for n, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    norms = [rs.sqrt()]
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = {n: x[n] + alpha * p[n] for n in x}
        r = {n: r[n] - alpha * ap[n] for n in r}
        rs_new = _dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = {n: r[n] + beta * p[n] for n in r}
        rs = rs_new
        norms.append(rs.sqrt())
    return x, torch.stack(norms)


class IMAML(MetaLearner):
    """iMAML over any backbone: proximal inner loop, implicit meta-gradient by conjugate gradient.

    Args:
        backbone: the network (batch norm without running statistics).
        lam: the proximal regularisation strength lambda (larger: ``phi`` stays closer to ``theta``).
        inner_lr: rate of the inner gradient steps on the proximal objective (mean-reduced support loss);
            ``inner_solver="gd"`` only.
        inner_steps: inner gradient steps in training (``inner_solver="gd"``).
        eval_inner_steps: inner gradient steps at evaluation (``None``: ``inner_steps``).
        cg_steps: conjugate-gradient iterations for the implicit meta-gradient.
        inner_rule: an :class:`~lightning_meta.optim.UpdateRule` as the inner solver instead of gradient descent
            (``inner_lr`` is its ``lr``); not meta-learned; ``inner_solver="gd"`` only.
        inner_solver: ``"gd"`` (gradient descent, the default) or ``"hessian_free"`` (truncated Newton with a
            backtracking line search; see the module docstring).
        newton_steps: Newton steps in training (``inner_solver="hessian_free"``).
        eval_newton_steps: Newton steps at evaluation (``None``: ``newton_steps``).
        newton_cg_steps: conjugate-gradient iterations per Newton step (Hessian-vector products of ``G``).
        newton_damping: added to the Hessian of ``G`` in the Newton system (``>= 0``).
        line_search_steps: candidate step sizes ``1, s, ..., s^(k-1)`` tried per Newton step; 0 takes the full
            Newton step (``t = 1``) without a search.
        line_search_shrink: the factor ``s`` in ``(0, 1)`` between candidates.
        line_search_c: the Armijo sufficient-decrease constant in ``(0, 1)``.
        meta_lr: Adam learning rate of the outer loop.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    Example:
        >>> from lightning_meta.episode import Episode
        >>> from lightning_meta.nn import MLP
        >>> model = IMAML(MLP(4, 3, hidden=(8,)), inner_steps=3, task_mode="loop")
        >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2] * 2] * 2)
        >>> model(Episode(x, y, x, y)).shape
        torch.Size([2, 6, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        lam: float = 2.0,
        inner_lr: float = 0.01,
        inner_steps: int = 16,
        eval_inner_steps: int | None = None,
        cg_steps: int = 5,
        inner_rule: UpdateRule | None = None,
        inner_solver: InnerSolver = "gd",
        newton_steps: int = 3,
        eval_newton_steps: int | None = None,
        newton_cg_steps: int = 5,
        newton_damping: float = 0.0,
        line_search_steps: int = 5,
        line_search_shrink: float = 0.5,
        line_search_c: float = 1e-4,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        if not lam > 0:
            raise ValueError(f"lam={lam} must be > 0 (the proximal term lam/2 ||phi - theta||^2)")
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps={inner_steps} and eval_inner_steps={eval_inner_steps} must be >= 0")
        if cg_steps < 1:
            raise ValueError(f"cg_steps={cg_steps} must be >= 1")
        if inner_solver not in _SOLVERS:
            raise ValueError(f"inner_solver={inner_solver!r} is not one of {_SOLVERS}")
        if inner_solver == "hessian_free" and inner_rule is not None:
            raise ValueError(
                f"inner_rule={type(inner_rule).__name__} replaces gradient descent, but inner_solver='hessian_free'"
                " has its own steps: drop inner_rule or use inner_solver='gd'"
            )
        if newton_steps < 0 or (eval_newton_steps is not None and eval_newton_steps < 0):
            raise ValueError(f"newton_steps={newton_steps} and eval_newton_steps={eval_newton_steps} must be >= 0")
        if newton_cg_steps < 1:
            raise ValueError(f"newton_cg_steps={newton_cg_steps} must be >= 1 (CG iterations per Newton step)")
        if not newton_damping >= 0:
            raise ValueError(f"newton_damping={newton_damping} must be >= 0 (added to the Hessian of G)")
        if line_search_steps < 0:
            raise ValueError(f"line_search_steps={line_search_steps} must be >= 0 (0: full Newton steps)")
        if not 0 < line_search_shrink < 1:
            raise ValueError(f"line_search_shrink={line_search_shrink} must be in (0, 1), e.g. 0.5")
        if not 0 < line_search_c < 1:
            raise ValueError(f"line_search_c={line_search_c} must be in (0, 1), e.g. 1e-4")
        check_no_running_stats(backbone, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone", "inner_rule"])
        self.backbone = backbone
        self.lam = float(lam)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.cg_steps = cg_steps
        self.inner_rule = inner_rule
        self.inner_solver: InnerSolver = inner_solver
        self.newton_steps = newton_steps
        self.eval_newton_steps = newton_steps if eval_newton_steps is None else eval_newton_steps
        self.newton_cg_steps = newton_cg_steps
        self.newton_damping = float(newton_damping)
        self.line_search_steps = line_search_steps
        self.line_search_shrink = float(line_search_shrink)
        self.line_search_c = float(line_search_c)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """``phi``: approximate minimiser of the proximal objective, detached from ``theta`` (no graph kept)."""
        theta = {n: p.detach() for n, p in self.backbone.named_parameters() if p.requires_grad}
        loss_fn = default_inner_loss(support_y)
        lam = self.lam

        def proximal(fast: dict[str, Tensor]) -> Tensor:
            support = loss_fn(functional_forward(self.backbone, fast, support_x), support_y)
            return support + 0.5 * lam * sum(((fast[n] - theta[n]) ** 2).sum() for n in theta)

        if self.inner_solver == "hessian_free":
            return self.newton_solve(
                proximal, theta, steps=self.newton_steps if self.training else self.eval_newton_steps
            )
        fast = gradient_steps(
            proximal,
            theta,
            steps=self.inner_steps if self.training else self.eval_inner_steps,
            lr=self.inner_lr,
            first_order=True,
            loss_scale=self.inner_loss_scale,
            rule=self.inner_rule,
        )
        return {n: t.detach() for n, t in fast.items()}

    def newton_solve(
        self, objective: Callable[[Vector], Tensor], start: Vector, *, steps: int, trace: list[Tensor] | None = None
    ) -> Vector:
        """``steps`` truncated Newton steps with a backtracking line search on ``objective`` from ``start``.

        The Hessian-free inner solver (see the module docstring); ``objective`` is ``G`` for :meth:`adapt`. Works
        in loop mode and under ``torch.func.vmap`` (fixed work per step, no data-dependent Python branches).
        Returns detached tensors (no graph to ``start``). ``trace`` receives the (detached) objective value before
        every step and after the last one.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the Hessian-free inner solver needs autograd, but inference mode is enabled; Lightning enables it "
                "in validate/test/predict by default: create the trainer with `Trainer(inference_mode=False)`"
            )
        scale = self.inner_loss_scale  # 1 except under fp16 autocast; the Newton step is invariant to it
        damping = self.newton_damping * scale
        c = self.line_search_c
        n_try = self.line_search_steps
        shrink = self.line_search_shrink

        def scaled(p: Vector) -> tuple[Tensor, Tensor]:
            value = objective(p)
            value = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
            value = value * scale
            return value, value.detach()

        fast = {n: t.detach() for n, t in start.items()}
        for _ in range(steps):
            # one linearisation of the gradient at phi; its vector-Jacobian product is H_G v (H_G is symmetric)
            grads, hvp, value = torch.func.vjp(torch.func.grad(scaled, has_aux=True), fast, has_aux=True)  # type: ignore[misc]  # 3 with has_aux
            grads = {n: g.detach() for n, g in grads.items()}
            if trace is not None:
                trace.append(value / scale)

            def matvec(v: Vector, hvp: Callable[[Vector], tuple[Vector]] = hvp) -> Vector:
                hv = hvp(v)[0]  # detached: the CG directions are constants (no graph kept per product)
                return {n: hv[n].detach() + damping * v[n] for n in v}

            direction, _ = conjugate_gradient(matvec, {n: -g for n, g in grads.items()}, self.newton_cg_steps)
            slope = _dot(grads, direction)  # < 0 for a descent direction
            if n_try == 0:
                step = torch.ones_like(slope)
            else:
                with torch.no_grad():
                    values = torch.stack(
                        [scaled({n: fast[n] + shrink**k * direction[n] for n in fast})[1] for k in range(n_try)]
                    )
                # made on the device (no host copy: capturable in a CUDA graph)
                steps_t = shrink ** torch.arange(n_try, dtype=values.dtype, device=values.device)
                ok = (values <= value + c * steps_t * slope) & torch.isfinite(values) & (slope < 0)
                first = ok & (torch.cumsum(ok.to(torch.int64), 0) == 1)  # the largest accepted candidate
                step = (first.to(values.dtype) * steps_t).sum()
            fast = {n: (fast[n] + step.to(fast[n].dtype) * direction[n]).detach() for n in fast}
        if trace is not None:
            trace.append(scaled(fast)[1] / scale)
        return fast

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query outputs with the adapted weights."""
        return functional_forward(self.backbone, state, query_x)

    def implicit_gradient(
        self, phi: dict[str, Tensor], support_x: Tensor, support_y: Tensor, query_grad: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``(I + H/lam)^{-1} query_grad`` by conjugate gradient, ``H`` the support-loss Hessian at ``phi``;
        returns the solution and the CG residual norms (see :func:`conjugate_gradient`)."""
        loss_fn = default_inner_loss(support_y)

        def support_loss(p: dict[str, Tensor]) -> Tensor:
            return loss_fn(functional_forward(self.backbone, p, support_x), support_y).float()

        # one linearisation of the gradient at phi; its vector-Jacobian product is H v (H is symmetric)
        _, hvp = torch.func.vjp(torch.func.grad(support_loss), phi)  # type: ignore[misc]  # 2 without has_aux
        lam = self.lam

        def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
            hv = hvp(v)[0]
            # detached: the directions are constants, and a graph kept per product would hold every CG iteration
            return {n: v[n] + hv[n].detach() / lam for n in v}

        return conjugate_gradient(matvec, query_grad, self.cg_steps)

    def task_meta_gradient(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The implicit meta-gradient of one task (its query loss and outputs at ``phi`` too)."""
        phi = self.adapt(support_x, support_y)

        def query_loss(p: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            outputs = functional_forward(self.backbone, p, query_x)
            loss = self.query_loss(outputs, query_y)
            return loss, (loss, outputs)

        grads, (loss, outputs) = torch.func.grad(query_loss, has_aux=True)(phi)
        direction, _ = self.implicit_gradient(phi, support_x, support_y, grads)
        return {f"backbone.{n}": d for n, d in direction.items()}, loss, outputs
