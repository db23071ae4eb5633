"""The ``lightning-meta`` command: Lightning's ``LightningCLI`` over every module and datamodule.

Any ``LightningModule`` and ``LightningDataModule`` is chosen by class path (subclass mode), so the
command trains lightning-meta's learners, your own subclasses, or a plain model with the
learned-optimizer callback attached::

    lightning-meta fit --config examples/configs/maml_omniglot_5w1s.yaml --data.init_args.root data/omniglot
    lightning-meta test --config examples/configs/maml_omniglot_5w1s.yaml --ckpt_path last.ckpt
    lightning-meta fit --model MAML --model.backbone MLP --data SinusoidDataModule --trainer.max_steps 100

Defaults that differ from plain ``LightningCLI``:

* ``Trainer(inference_mode=False)``: gradient-based learners adapt with gradients in ``validate`` and
  ``test``, which inference mode forbids (a ``trainer.inference_mode: true`` in a config still wins).
* a rich progress bar (:class:`~lightning_meta.progress.MetaRichProgressBar`) when ``rich`` is installed and the config names no progress bar of its own
  (``trainer.enable_progress_bar: false`` turns it off);
* the run's config is saved next to its logs, overwriting an older copy
  (``save_config_kwargs={"overwrite": True}``);
* module arguments left out of ``save_hyperparameters`` (a learner's ``backbone``) are stored in the
  checkpoint as their config, so ``MAML.load_from_checkpoint(path)`` needs no arguments;
* before ``fit``/``validate``/``test``, a check that a backbone's linear ``head`` has at least as many
  outputs as the datamodule has ways, with an error naming both values.

The classes of :mod:`lightning_meta.algorithms`, :mod:`lightning_meta.nn` and the datamodules are
imported here, so their short names (``--model MAML``, ``--data OmniglotDataModule``) resolve.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from torch import nn
from typing_extensions import override

__all__ = ["MetaLightningCLI", "check_ways", "main", "restore_ignored_hparams"]

# Imported for their side effect: jsonargparse resolves a short class name among imported subclasses.
_SHORT_NAME_MODULES = (
    "lightning_meta.algorithms",
    "lightning_meta.algorithms.caml",
    "lightning_meta.algorithms.leo",
    "lightning_meta.algorithms.snail",
    "lightning_meta.nn",
    "lightning_meta.nn.film",
    "lightning_meta.nn.snail_blocks",
    "lightning_meta.callbacks",
    "lightning_meta.datamodules.omniglot",
    "lightning_meta.datamodules.mini_imagenet",
    "lightning_meta.datamodules.tiered_imagenet",
    "lightning_meta.datamodules.cifar",
    "lightning_meta.datamodules.image_folder",
    "lightning_meta.datamodules.sinusoid",
    "lightning_meta.datamodules.features",
    "lightning_meta.datamodules.meta_dataset",
)


def _import_short_names() -> None:
    for name in _SHORT_NAME_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def check_ways(model: LightningModule, datamodule: LightningDataModule | None) -> None:
    """Raise if the model's linear ``backbone.head`` has fewer outputs than the datamodule's ways.

    Only checks what it can see: a model with a ``backbone`` whose ``head`` is an ``nn.Linear``, and a
    datamodule with ``ways`` (and optionally ``eval_ways``) attributes. Regression datamodules
    (``ways == 1``) are skipped.

    Raises:
        ValueError: naming the head size, the ways and the two config keys to make agree.
    """
    head = getattr(getattr(model, "backbone", None), "head", None)
    if not isinstance(head, nn.Linear) or datamodule is None:
        return
    ways = [w for w in (getattr(datamodule, "ways", None), getattr(datamodule, "eval_ways", None)) if w]
    variable = getattr(datamodule, "variable_episodes", None)
    if variable is not None:  # variable-way episodes: up to max_ways classes (absent ones are masked)
        ways = [variable.max_ways]
    if not ways or max(ways) <= 1:
        return
    if head.out_features < max(ways):
        raise ValueError(
            f"the backbone's head has out_features={head.out_features} but the datamodule draws "
            f"{max(ways)}-way episodes; set model.init_args.backbone.init_args.out_features (or ways) "
            f"to {max(ways)}, or lower data.init_args.ways / eval_ways (variable_episodes.max_ways)"
        )


def restore_ignored_hparams(model: LightningModule, config: dict[str, Any] | None) -> None:
    """Add the init args of ``config`` (``{"class_path", "init_args"}``) missing from a CLI-built model's hparams."""
    hparams = getattr(model, "hparams", None)
    if not isinstance(config, dict) or hparams is None or "_instantiator" not in hparams:
        return
    for key, value in {**config.get("init_args", {}), **config.get("dict_kwargs", {})}.items():
        if key not in hparams:
            hparams[key] = value


class MetaLightningCLI(LightningCLI):
    """``LightningCLI`` with lightning-meta's defaults (see the module docstring).

    Args:
        args: command-line arguments (``None``: ``sys.argv``), a list, or a config dict.
        run: run the subcommand (``False``: only instantiate ``model``, ``datamodule`` and ``trainer``).
        trainer_defaults: Trainer defaults on top of ``{"inference_mode": False}``.
        **kwargs: forwarded to ``LightningCLI``.
    """

    def __init__(
        self, args: ArgsType = None, *, run: bool = True, trainer_defaults: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        _import_short_names()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(
            args=args, run=run, trainer_defaults={"inference_mode": False, **(trainer_defaults or {})}, **kwargs
        )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a ``RichProgressBar`` unless the config disables progress bars or names its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        wants_bar = config.get("enable_progress_bar", True) is not False
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if wants_bar and not has_bar and importlib.util.find_spec("rich") is not None:
            from lightning_meta.progress import MetaRichProgressBar

            config["callbacks"] = [*callbacks, MetaRichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    @override
    def after_instantiate_classes(self) -> None:
        """Put arguments that the module left out of its hyperparameters back in, from the parsed config.

        Learners call ``save_hyperparameters(ignore=["backbone"])`` so that a module built in Python does
        not pickle a network into its hparams. Under the CLI the backbone is a config (class path and init
        args), so it is stored; then ``load_from_checkpoint`` rebuilds the whole module from the
        checkpoint alone.
        """
        super().after_instantiate_classes()
        restore_ignored_hparams(self.model, getattr(self, "config_dump", {}).get("model"))

    # LightningCLI looks ``before_<subcommand>`` up by name (it defines none itself), so no @override here
    def before_fit(self) -> None:
        check_ways(self.model, self.datamodule)

    def before_validate(self) -> None:
        check_ways(self.model, self.datamodule)

    def before_test(self) -> None:
        check_ways(self.model, self.datamodule)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-meta`` console script.

    ``lightning-meta data check ROOT`` runs :func:`lightning_meta.datamodules.check.main` (exits with its code);
    everything else is ``LightningCLI`` (``fit``, ``validate``, ``test``, ``predict``).
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["data"]:
        from lightning_meta.datamodules.check import main as data_main

        raise SystemExit(data_main(list(argv[1:])))
    MetaLightningCLI(args)


if __name__ == "__main__":
    main()
