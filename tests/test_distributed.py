"""``import lightning_meta`` destroys the default process group before interpreter finalization.

Lightning leaves the group alive at the end of a DDP worker; torn down during finalization, gloo's threads could
abort the worker (SIGABRT) after ``fit`` had finished. Checked in a fresh interpreter: an exit handler registered
*before* the import runs *after* lightning-meta's (atexit is last-in, first-out) and reports what it sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import atexit
    import torch.distributed as dist

    atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
    {import_line}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_reduce(__import__("torch").ones(3))
    print("group alive after work:", dist.is_initialized(), flush=True)
    """
)


def _run(import_line: str, *, may_abort: bool = False) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(import_line=import_line)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    # the control run (without the package) has the bug's condition, so it may itself abort during finalization
    allowed = (0, -signal.SIGABRT) if may_abort else (0,)
    assert proc.returncode in allowed, proc.stderr[-2000:]
    return proc.stdout.splitlines()


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch built without distributed")
def test_import_destroys_the_process_group_before_finalization() -> None:
    # without the package the group is still alive when the last exit handlers run: that is the bug's condition
    assert _run("pass", may_abort=True) == ["group alive after work: True", "group alive at exit: True"]
    assert _run("import lightning_meta") == ["group alive after work: True", "group alive at exit: False"]
