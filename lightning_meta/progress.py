"""Progress bars for one-time work: dataset decoding, and Trainers started outside LightningCLI."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.callbacks import Callback, RichProgressBar

__all__ = ["MetaRichProgressBar", "progress", "rich_progress_bar"]

_T = TypeVar("_T")


def progress(items: Iterable[_T], description: str, total: int | None = None) -> Iterator[_T]:
    """Iterate ``items`` under a rich progress bar for one-time work (decoding a dataset into the cache).

    The bar shows only where it helps: ``rich`` is installed, this is rank zero (``RANK``/``LOCAL_RANK``
    unset or 0) and ``LIGHTNING_META_PROGRESS`` is not ``0``; it draws on stderr. Otherwise the items
    pass through unchanged.

    Example:
        >>> list(progress(range(3), "counting"))
        [0, 1, 2]
    """
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("LIGHTNING_META_PROGRESS", "1") == "0" or rank != "0":
        yield from items
        return
    try:
        from rich.console import Console
        from rich.progress import track
    except ImportError:
        yield from items
        return
    yield from track(items, description=description, total=total, transient=True, console=Console(stderr=True))


class MetaRichProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` without the ``Epoch 29/-2`` label of step-limited runs.

    A run limited by ``max_steps`` has ``max_epochs=-1`` (no epoch limit), which the stock bar prints as
    ``max_epochs - 1``. Here the label is ``Epoch N/M`` only when there is an epoch limit, else ``Epoch N``.
    """

    def _get_train_description(self, current_epoch: int) -> str:  # the stock bar's only hook for the label
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        # pad as the stock bar does, so the label does not flicker against "Validation"
        return f"{description:{len(self.validation_description)}}"


def rich_progress_bar(disabled: bool = False) -> list[Callback]:
    """``[MetaRichProgressBar()]`` when rich is installed, ``[]`` otherwise (Lightning's TQDM bar) or when disabled.

    Example:
        >>> rich_progress_bar(disabled=True)
        []
    """
    if disabled:
        return []
    try:
        import rich  # noqa: F401
    except ImportError:
        return []
    return [MetaRichProgressBar()]
