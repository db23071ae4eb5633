"""One retry for `ddp_spawn` tests whose worker aborts at interpreter exit after `fit` has finished.

Seen once in CI (2026-12-04): "terminate called without an active exception", a worker's C++ thread torn down at
exit, reported by torch.multiprocessing as a SIGABRT exit. Any other failure, or a second abort, is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry_worker_abort(run: Callable[[], T]) -> T:
    """``run()`` (which must build its own model and trainer), retried once if a spawned worker died of SIGABRT."""
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        return run()
    except ProcessExitedException as err:
        if "SIGABRT" not in str(err):
            raise
    return run()
