"""Any timm model (Wightman, https://github.com/huggingface/pytorch-image-models) as a few-shot backbone.

Weights are never downloaded at run time: ``pretrained=True`` loads a local file, either
``checkpoint_path`` or ``<cache>/timm/<name>.{safetensors,pth,pt,bin}`` where ``<cache>`` is
``$LIGHTNING_META_CACHE`` or the user cache directory + ``lightning_meta``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_meta.nn.norm import TaskBatchNorm

__all__ = ["TimmBackbone", "timm_weights_dir"]

_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def timm_weights_dir() -> Path:
    """Folder searched for pretrained timm weights: ``$LIGHTNING_META_CACHE/timm`` or the user cache dir."""
    env = os.environ.get("LIGHTNING_META_CACHE")
    if env:
        return Path(env).expanduser() / "timm"
    import platformdirs

    return Path(platformdirs.user_cache_dir("lightning_meta", appauthor=False)) / "timm"


class TimmBackbone(nn.Module):
    """A timm model as ``features`` (``num_classes=0``: pooled features) plus a linear ``head``.

    Batch norm: timm models track running statistics (non-transductive, fine for ProtoNet).
    ``transductive_bn=True`` makes every batch norm use batch statistics (the MAML family's
    convention): plain ``BatchNorm*d`` become :class:`~lightning_meta.nn.TaskBatchNorm`; timm's fused
    norm+activation layers stop tracking statistics (MAML then runs them in a loop, not vmap).

    Args:
        name: timm model name, e.g. ``"resnet18"``.
        out_features: head size; ``None`` for an embedding (``head`` is ``nn.Identity``).
        pretrained: load weights from a local file (see the module docstring); never downloads.
        checkpoint_path: the weights file (a state dict, optionally under ``"state_dict"``/``"model"``).
        in_channels: image channels.
        transductive_bn: see above.
        timm_kwargs: further ``timm.create_model`` arguments (e.g. ``drop_rate``).

    Example:
        >>> net = TimmBackbone("resnet10t", 5, transductive_bn=True)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        name: str,
        out_features: int | None = None,
        *,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        in_channels: int = 3,
        transductive_bn: bool = False,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('{name[:4]}*')")
        self.features = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_channels, **(timm_kwargs or {})
        )
        if pretrained or checkpoint_path is not None:
            self._load(name, checkpoint_path)
        if transductive_bn:
            _make_transductive(self.features)
        self.out_dim: int = cast(int, self.features.num_features)  # every timm model sets num_features
        self.head: nn.Module = nn.Identity() if out_features is None else nn.Linear(self.out_dim, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W) -> (batch, out_features)`` (or ``(batch, num_features)`` without a head)."""
        return self.head(self.features(x))

    def _load(self, name: str, checkpoint_path: str | os.PathLike | None) -> None:
        if checkpoint_path is not None:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint_path={str(path)!r} does not exist; pass the path of a saved state dict"
                )
        else:
            folder = timm_weights_dir()
            found = [folder / f"{name}{s}" for s in _SUFFIXES if (folder / f"{name}{s}").is_file()]
            if not found:
                raise FileNotFoundError(
                    f"no local weights for timm model {name!r}: lightning-meta never downloads at run time. Save the "
                    f"state dict as {folder / (name + '.safetensors')} (or .pth), e.g. once with "
                    f"`torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), path)`, or pass checkpoint_path="
                )
            path = found[0]
        state: dict[str, Any]
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
        missing, _unexpected = self.features.load_state_dict(state, strict=False)  # classifier keys are unexpected
        if missing:
            raise ValueError(f"weights at {str(path)!r} do not fit timm model {name!r}: missing {missing[:5]}...")


def _make_transductive(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) in (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
        ):
            new = TaskBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
            setattr(module, child_name, new)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.track_running_stats = False
            child.running_mean = None
            child.running_var = None
            child.num_batches_tracked = None
            _make_transductive(child)
        else:
            _make_transductive(child)
