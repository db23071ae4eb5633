"""Process-group hygiene for multi-process runs: destroy the default process group before the interpreter exits.

Lightning creates the default process group when a DDP strategy starts (``ddp``, ``ddp_spawn``) and never destroys
it; every worker then exits with the group alive. PyTorch requires ``torch.distributed.destroy_process_group()``
before exit: otherwise the group's C++ state is torn down during interpreter finalization, after Python is gone. With
the gloo backend its worker threads may still hold work objects (and the tensors they reference) at that point, and a
worker intermittently dies with ``terminate called without an active exception`` (SIGABRT) after ``fit`` has
finished, which the launching process reports as a failed run.

:func:`destroy_process_group_at_exit` registers an :mod:`atexit` handler that destroys the group while the interpreter
is still whole. ``import lightning_meta`` registers it once per process; a process that never creates a group is
unaffected, and one that already destroyed its group sees a no-op.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

__all__ = ["destroy_process_group_at_exit"]

_registered = False


def _destroy_default_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group (if one exists then) when this process exits; idempotent.

    :mod:`atexit` runs handlers in reverse order of registration, so this one runs before torch's own exit handlers
    (registered when torch was imported), with every module still loaded.
    """
    global _registered
    if not _registered:
        atexit.register(_destroy_default_process_group)
        _registered = True
