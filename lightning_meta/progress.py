"""Progress bars for one-time work: dataset decoding, and Trainers started outside LightningCLI."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from lightning.pytorch.callbacks import Callback

__all__ = ["progress", "rich_progress_bar"]

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


def rich_progress_bar(disabled: bool = False) -> list[Callback]:
    """``[RichProgressBar()]`` when rich is installed, ``[]`` otherwise (Lightning's TQDM bar) or when disabled.

    Example:
        >>> rich_progress_bar(disabled=True)
        []
    """
    if disabled:
        return []
    try:
        import rich  # noqa: F401
        from lightning.pytorch.callbacks import RichProgressBar
    except ImportError:
        return []
    return [RichProgressBar()]
