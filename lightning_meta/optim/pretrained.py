"""Shipped pretrained rule weights: loading (``load_pretrained``) and writing (``save_pretrained``).

Files live in the package folder ``lightning_meta/optim/pretrained/`` and are read with ``importlib.resources``:

- ``<name>.json``: metadata, at least ``{"rule": "<registry name>", "version": <rule version>}``, optionally
  ``"kwargs"`` (constructor arguments), ``"weights"`` (file name, default ``<name>.pt``), ``"sha256"``
  (:func:`~lightning_meta.optim.rule_hash` of the weights, checked on load) and free-form provenance
  (meta-training command, task family, horizon, ...). A file holding only ``{"alias": "<other name>"}``
  redirects (``default.json`` names the shipped default).
- ``<name>.pt``: the rule's ``state_dict``, loadable with ``torch.load(weights_only=True)``.

Until a ``default`` entry ships, ``load_pretrained("default")`` warns and returns the default rule's documented
initialisation (:class:`~lightning_meta.optim.Celo2Rule` untrained: a per-tensor RMS-normalised Adam under a
warm-up + cosine schedule over the planned horizon).
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_meta.optim.rules import UpdateRule, get_rule, rule_hash

__all__ = ["available_pretrained", "load_pretrained", "save_pretrained"]

_FOLDER = "pretrained"


def _folder() -> Any:
    return resources.files("lightning_meta.optim").joinpath(_FOLDER)


def available_pretrained() -> list[str]:
    """Names of the shipped pretrained rules (the ``.json`` files in the package folder)."""
    folder = _folder()
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_pretrained(name: str = "default") -> UpdateRule:
    """The shipped rule called ``name`` with its shipped weights (meta-trained, or the initialisation a validation
    protocol chose; see its ``.json``), in eval mode.

    Raises:
        FileNotFoundError: no such entry (the message lists the shipped ones). ``"default"`` never raises
            this: without shipped weights it warns and returns the untrained default rule.
        ValueError: the metadata's version differs from the installed rule class, or the weights' hash
            differs from the recorded ``sha256``.
    """
    folder = _folder()
    seen = [name]
    meta_file = folder.joinpath(f"{name}.json")
    while meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if "alias" not in meta:
            break
        if meta["alias"] in seen:
            raise ValueError(f"pretrained alias cycle {seen + [meta['alias']]}; fix the json files in {folder}")
        seen.append(meta["alias"])
        meta_file = folder.joinpath(f"{meta['alias']}.json")
    else:
        if name == "default" and len(seen) == 1:
            rule_hint = get_rule("default")
            rank_zero_warn(
                f"no pretrained weights ship for 'default' (looked for {meta_file}); using the untrained "
                f"{type(rule_hint).__name__} initialisation, a per-tensor RMS-normalised Adam with a warm-up + cosine "
                "schedule"
            )
            return rule_hint.eval()
        raise FileNotFoundError(f"no pretrained rule {seen[-1]!r} in {folder}; shipped: {available_pretrained()}")
    rule = get_rule(meta["rule"], **meta.get("kwargs", {}))
    if int(meta["version"]) != rule.version:
        raise ValueError(
            f"pretrained {seen[-1]!r} was saved for {meta['rule']!r} version {meta['version']} but the installed "
            f"{type(rule).__name__} is version {rule.version}; upgrade lightning-meta or re-train the rule"
        )
    weights = folder.joinpath(meta.get("weights", f"{seen[-1]}.pt")).read_bytes()
    rule.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    if "sha256" in meta and rule_hash(rule) != meta["sha256"]:
        raise ValueError(
            f"pretrained {seen[-1]!r}: weights hash {rule_hash(rule)} differs from the recorded {meta['sha256']}; "
            "the .pt file is corrupt or does not match its .json"
        )
    return rule.eval()


def save_pretrained(
    rule: UpdateRule,
    name: str,
    *,
    kwargs: dict[str, Any] | None = None,
    directory: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``<name>.pt`` and ``<name>.json`` for ``rule`` (into the package folder unless ``directory``).

    Args:
        rule: the (meta-trained) rule.
        name: entry name, used by :func:`load_pretrained`.
        kwargs: the constructor arguments that rebuild ``rule`` via ``get_rule(rule.name, **kwargs)``;
            default: those ``get_rule`` recorded in ``rule.init_kwargs`` (or none).
        directory: target folder; default: the installed package's ``pretrained`` folder.
        metadata: provenance to record (JSON-serialisable).

    Returns:
        The path of the written ``.json`` file.
    """
    folder = Path(directory) if directory is not None else Path(str(_folder()))
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().clone() for key, value in rule.state_dict().items()}
    torch.save(state, folder / f"{name}.pt")
    meta = {
        "rule": rule.name,
        "version": rule.version,
        "kwargs": kwargs if kwargs is not None else dict(getattr(rule, "init_kwargs", {})),
        "weights": f"{name}.pt",
        "sha256": rule_hash(rule),
        **(metadata or {}),
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path
