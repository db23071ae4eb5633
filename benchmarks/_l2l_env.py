"""A private virtual environment with learn2learn's MAML wrapper, for comparison benchmarks only.

learn2learn (Arnold et al., "learn2learn: A Library for Meta-Learning Research", arXiv:2008.12284) is
never a dependency of lightning-meta. Its compiled (Cython) data layer does not build on Python 3.11,
so this helper installs only what its MAML needs:

1. a venv under ``<cache>/l2l-venv`` with ``torch==<this interpreter's torch version>`` (pip takes the
   wheel from the local wheel store / index when there is one), numpy and Cython;
2. the learn2learn sdist (``pip download --no-binary :all: --no-deps``), from which three pure-Python
   files are extracted: ``learn2learn/algorithms/maml.py``, ``algorithms/base_learner.py`` and
   ``utils/__init__.py`` (``clone_module``/``update_module``), placed under stub parent packages in
   ``<cache>/l2l-src`` so that ``from learn2learn.algorithms.maml import MAML`` imports nothing else.

The venv is cached (it holds a full torch install, several GiB) and reused while the stamp file
matches the requested versions. ``<cache>`` is ``$LIGHTNING_META_BENCH_CACHE`` or
``~/.cache/lightning_meta/bench``.

Command line: ``python benchmarks/_l2l_env.py`` builds (or checks) the environment and prints the
interpreter and ``PYTHONPATH`` to use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import venv
from dataclasses import dataclass
from pathlib import Path

__all__ = ["L2LEnv", "default_cache_dir", "ensure_l2l_env"]

L2L_VERSION = "0.2.0"
_FILES = {
    "learn2learn/algorithms/maml.py": "learn2learn/algorithms/maml.py",
    "learn2learn/algorithms/base_learner.py": "learn2learn/algorithms/base_learner.py",
    "learn2learn/utils/__init__.py": "learn2learn/utils/__init__.py",
}
_STUBS = {
    "learn2learn/__init__.py": f'"""Stub: only the MAML wrapper of learn2learn {L2L_VERSION} is installed here."""\n'
    f'__version__ = "{L2L_VERSION}"\n',
    "learn2learn/algorithms/__init__.py": '"""Stub: import learn2learn.algorithms.maml directly."""\n',
}


@dataclass(frozen=True)
class L2LEnv:
    """Where the learn2learn comparison environment lives.

    Attributes:
        python: the venv's interpreter.
        pythonpath: folder to put on ``PYTHONPATH`` so that ``learn2learn.algorithms.maml`` imports.
        torch_version: the torch version installed in the venv.
    """

    python: Path
    pythonpath: Path
    torch_version: str

    def env(self, **extra: str) -> dict[str, str]:
        """A subprocess environment with ``PYTHONPATH`` set (plus ``extra`` variables)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(self.pythonpath)
        env.update(extra)
        return env


def default_cache_dir() -> Path:
    """``$LIGHTNING_META_BENCH_CACHE`` or ``~/.cache/lightning_meta/bench``."""
    root = os.environ.get("LIGHTNING_META_BENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_meta" / "bench"


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}; see the log {log}")


def ensure_l2l_env(cache_dir: Path | None = None, torch_version: str | None = None, verbose: bool = True) -> L2LEnv:
    """Build the learn2learn venv if needed and return where it is.

    Args:
        cache_dir: folder for the venv, the sdist and the extracted sources (see the module docstring).
        torch_version: torch to install in the venv; defaults to this interpreter's torch version
            (without a local ``+cpu``/``+cu`` suffix, which pip resolves).
    """
    if torch_version is None:
        import torch

        torch_version = torch.__version__.split("+")[0]
    cache = (cache_dir or default_cache_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    vdir, src, sdist_dir, log = cache / "l2l-venv", cache / "l2l-src", cache / "sdist", cache / "l2l-env.log"
    python = vdir / "bin" / "python"
    stamp = cache / "l2l-env.json"
    want = {
        "torch": torch_version,
        "learn2learn": L2L_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    if stamp.exists() and python.exists() and json.loads(stamp.read_text()) == want:
        return L2LEnv(python, src, torch_version)

    def say(msg: str) -> None:
        if verbose:
            print(f"[l2l-env] {msg} (log: {log})", file=sys.stderr, flush=True)

    if not python.exists():
        say(f"creating {vdir}")
        venv.EnvBuilder(with_pip=True, clear=True).create(vdir)
    say(f"installing torch=={torch_version} into the venv (large; cached afterwards)")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            f"torch=={torch_version}",
            "numpy",
            "cython",
            "setuptools",
            "wheel",
        ],
        log,
    )
    sdist = sdist_dir / f"learn2learn-{L2L_VERSION}.tar.gz"
    if not sdist.exists():
        say(f"downloading the learn2learn {L2L_VERSION} sdist")
        sdist_dir.mkdir(exist_ok=True)
        _run(
            [
                str(python),
                "-m",
                "pip",
                "download",
                "-q",
                f"learn2learn=={L2L_VERSION}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                str(sdist_dir),
            ],
            log,
        )
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for inner, target in _FILES.items():
            if inner not in members:
                raise RuntimeError(f"{inner} not found in {sdist}; is it the learn2learn {L2L_VERSION} sdist?")
            data = tar.extractfile(members[inner]).read()  # type: ignore[union-attr]
            out = src / target
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
    for target, text in _STUBS.items():
        (src / target).write_text(text)
    # Check that the wrapper imports with nothing but torch.
    check = subprocess.run(
        [str(python), "-c", "from learn2learn.algorithms.maml import MAML; import torch; print(torch.__version__)"],
        env=L2LEnv(python, src, torch_version).env(),
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"learn2learn's MAML does not import in {vdir}:\n{check.stderr[-2000:]}")
    stamp.write_text(json.dumps(want))
    say(f"ready: torch {check.stdout.strip()} + learn2learn {L2L_VERSION} MAML")
    return L2LEnv(python, src, torch_version)


if __name__ == "__main__":
    env = ensure_l2l_env()
    print(f"python={env.python}\nPYTHONPATH={env.pythonpath}\ntorch={env.torch_version}")
