"""A LightningModule that meta-trains an update rule over task families (learned optimizers).

The meta-parameters are the rule's weights. Each training step advances one population of inner
problems per task family by one truncation with a gradient estimator (truncated BPTT, ES or PES, see
:mod:`lightning_meta.optim.meta.estimators`) and returns the surrogate ``sum(theta * g_hat)``, whose
gradient is the estimate ``g_hat``. So Lightning's own backward, gradient clipping, accumulation and
strategies apply unchanged: under DDP each rank owns different inner problems (its estimators are
seeded with the rank) and the estimates are averaged by DDP's gradient all-reduce.

Lightning checkpoints of this module resume meta-training exactly (one process): besides the rule's weights and
the meta-optimizer, they hold each estimator's state (:meth:`GradientEstimator.state_dict`: its random generator,
the running inner problems and, for PES, the accumulated perturbations), the global torch RNG state and the count
of skipped estimates.

Design after learned_optimization (Metz et al., arXiv:2203.11860): meta-parameters on one side, tasks
and estimators as interchangeable parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_meta.optim.meta.estimators import GradientEstimator, get_estimator
from lightning_meta.optim.meta.tasks import TaskFamily, get_family
from lightning_meta.optim.rules import UpdateRule, get_rule

__all__ = ["RuleMetaTrainer"]

_RANK_SEED_STRIDE = 1_000_003


class RuleMetaTrainer(LightningModule):
    """Meta-trains an update rule; ``self.rule`` holds the (trained) rule.

    Args:
        rule: a registry name (``get_rule(rule, **rule_kwargs)``) or an :class:`UpdateRule` instance.
        rule_kwargs: constructor arguments of a named rule.
        families: task-family names (:func:`~lightning_meta.optim.meta.tasks.get_family`), or families.
        family_kwargs: per-family constructor arguments, keyed by family name.
        estimator: ``"pes"``, ``"es"`` or ``"tbptt"``.
        num_tasks: distinct inner problems per family per step, per rank.
        truncation_length: inner updates per training step.
        min_horizon: shortest inner training run (log-uniform horizons).
        max_horizon: longest inner training run.
        objective: ``"mean"`` training loss, ``"mean_log"`` (its log), ``"final"`` training loss or ``"valid"``
            (fresh validation batches).
        sigma: ES/PES perturbation standard deviation.
        inner_lr: the ``lr`` handed to the rule in inner problems; a ``(low, high)`` pair draws it log-uniformly
            per inner run.
        meta_lr: Adam learning rate of the rule's weights.
        trainable: names (or dotted prefixes, e.g. ``"schedule"``, ``"input"``) of the rule's weights to meta-train;
            the others keep their initial values. ``None``: all weights. Fewer weights, less estimator noise.
        anchor: weight ``lambda`` of an L2 penalty ``lambda / 2 * ||theta - theta_0||^2`` that keeps the rule's
            weights near their values at construction (its initialisation): a prior that the hand-designed
            initialisation is good, against which noisy estimates must make a consistent case. 0 disables it.
        steps_per_epoch: training steps per (nominal) epoch; the data loader only counts steps.
        seed: base seed; rank ``r`` seeds its estimators with ``seed + r * 1000003`` (+ the family index).
    """

    def __init__(
        self,
        rule: str | UpdateRule = "celo2",
        *,
        rule_kwargs: dict[str, Any] | None = None,
        families: Sequence[str | TaskFamily] = ("mlp", "teacher_student", "conv", "quadratic"),
        family_kwargs: dict[str, dict[str, Any]] | None = None,
        estimator: str = "pes",
        num_tasks: int = 4,
        truncation_length: int = 10,
        min_horizon: int = 50,
        max_horizon: int = 200,
        objective: str = "mean",
        sigma: float = 0.01,
        inner_lr: float | tuple[float, float] = 1e-2,
        meta_lr: float = 3e-3,
        trainable: Sequence[str] | None = None,
        anchor: float = 0.0,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not families:
            raise ValueError("families is empty; name at least one task family, e.g. families=('mlp',)")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        if meta_lr <= 0:
            raise ValueError(f"meta_lr={meta_lr} must be positive")
        if anchor < 0:
            raise ValueError(f"anchor={anchor} must be >= 0 (0 disables the pull towards the initial weights)")
        self.save_hyperparameters(ignore=["rule", "families"] if isinstance(rule, UpdateRule) else ["families"])
        self.hparams["families"] = [f if isinstance(f, str) else f.name for f in families]
        self.rule = rule if isinstance(rule, UpdateRule) else get_rule(rule, **(rule_kwargs or {}))
        if trainable is not None:
            names = [n for n, _ in self.rule.named_parameters()]
            unknown = [t for t in trainable if not any(n == t or n.startswith(f"{t}.") for n in names)]
            if unknown or not trainable:
                raise ValueError(
                    f"trainable={list(trainable)}: {unknown or 'nothing'} names no weight of the rule; "
                    f"choose from {names}"
                )
            for n, p in self.rule.named_parameters():
                p.requires_grad_(any(n == t or n.startswith(f"{t}.") for t in trainable))
        # the anchor point: the weights at construction (not part of the rule's state_dict)
        self._anchor = {n: p.detach().clone() for n, p in self.rule.named_parameters() if p.requires_grad}
        kwargs = family_kwargs or {}
        self.families = [get_family(f, **kwargs.get(f, {})) if isinstance(f, str) else f for f in families]
        self.estimators: list[GradientEstimator] = []
        self.skipped_estimates = 0
        # Validate the estimator arguments now, before any work; the rank-seeded estimators are built in
        # `setup` (so nothing stateful is pickled by spawn-based strategies).
        self._make_estimators(rank=0)
        self.estimators = []

    @property
    def _hp(self) -> AttributeDict:
        """``hparams`` as saved by ``save_hyperparameters`` (Lightning types it as any mutable mapping)."""
        return cast(AttributeDict, self.hparams)

    def _make_estimators(self, rank: int) -> None:
        hp = self._hp
        self.estimators = [
            get_estimator(
                hp.estimator,
                family,
                num_tasks=hp.num_tasks,
                truncation_length=hp.truncation_length,
                min_horizon=hp.min_horizon,
                max_horizon=hp.max_horizon,
                objective=hp.objective,
                inner_lr=hp.inner_lr,
                sigma=hp.sigma,
                seed=hp.seed + rank * _RANK_SEED_STRIDE + i,
            )
            for i, family in enumerate(self.families)
        ]

    @override
    def setup(self, stage: str) -> None:
        self._make_estimators(rank=self.global_rank)
        self.skipped_estimates = 0

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        weights = dict((n, p) for n, p in self.rule.named_parameters() if p.requires_grad)
        # zero-valued term keeps every weight in the graph (DDP expects a gradient for each)
        # a Tensor: the rule has trainable weights (Adam refuses an empty parameter list before the first step)
        surrogate = cast(Tensor, sum((p * 0).sum() for p in weights.values()))
        meta_losses = []
        for est in self.estimators:
            estimate = est.estimate(self.rule)
            meta_losses.append(estimate.meta_loss)
            if not all(torch.isfinite(g).all() for g in estimate.gradient.values()):
                self.skipped_estimates += 1  # never write a non-finite estimate into the rule
                continue
            for name, p in weights.items():
                surrogate = surrogate + (p * estimate.gradient[name].detach()).sum() / len(self.estimators)
        if self._hp.anchor:
            for name, p in weights.items():
                surrogate = surrogate + 0.5 * self._hp.anchor * (p - self._anchor[name].to(p)).square().sum()
        meta_loss = torch.stack(meta_losses).mean()
        self.log("train/meta_loss", meta_loss, prog_bar=True, sync_dist=True)
        self.log("train/skipped_estimates", float(self.skipped_estimates), reduce_fx="max", sync_dist=True)
        return surrogate

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_training"] = {
            "families": list(self._hp.families),
            "estimators": [est.state_dict() for est in self.estimators],
            "torch_rng": torch.get_rng_state(),
            "skipped_estimates": self.skipped_estimates,
            "world_size": self.trainer.world_size,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("meta_training")
        if saved is None:  # weights only (e.g. a checkpoint written before estimator states were saved)
            return
        if saved["world_size"] != 1 or self.trainer.world_size != 1:
            raise ValueError(
                f"resuming meta-training restores one process's inner problems; the checkpoint was written by "
                f"{saved['world_size']} process(es) and this run has {self.trainer.world_size}: resume on one device"
            )
        if list(saved["families"]) != list(self._hp.families):
            raise ValueError(
                f"the checkpoint meta-trained on families {saved['families']}, this module on "
                f"{list(self._hp.families)}; resume with the same families"
            )
        for est, state in zip(self.estimators, saved["estimators"], strict=True):
            est.load_state_dict(state)
        torch.set_rng_state(saved["torch_rng"])
        self.skipped_estimates = int(saved["skipped_estimates"])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.rule.parameters() if p.requires_grad], lr=self._hp.meta_lr)

    @override
    def train_dataloader(self) -> DataLoader:
        # Inner problems are drawn by the estimators; the loader only paces the steps (and is sharded by DDP).
        return DataLoader(range(self._hp.steps_per_epoch), batch_size=1)  # type: ignore[arg-type]  # any indexable
