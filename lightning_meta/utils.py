"""Small public checks shared by learners and datamodules (argument validation, model constraints)."""

from __future__ import annotations

from torch import nn

__all__ = ["check_no_running_stats", "check_positive"]


def check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer (bools are rejected).

    Example:
        >>> check_positive(ways=5, shots=1)
        >>> check_positive(ways=0)
        Traceback (most recent call last):
        ...
        ValueError: ways=0 must be a positive integer
    """
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive integer")


def check_no_running_stats(module: nn.Module, who: str) -> None:
    """Raise ``ValueError`` if a batch norm inside ``module`` tracks running statistics.

    Gradient-based inner loops run the network on support and query data of every task: running
    statistics would be overwritten by each of those forwards (and cannot be vmapped). ``who`` names the
    learner in the message.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise ValueError(
                f"{who}: batch norm '{name}' tracks running statistics, which every inner-loop forward would "
                "overwrite with support/query data (and which cannot be vmapped); build it with "
                "track_running_stats=False (transductive BN, as in MAML), e.g. lightning_meta.nn.Conv4(...)"
            )
