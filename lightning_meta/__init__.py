"""lightning-meta: meta-learning for PyTorch Lightning."""

from lightning_meta.episode import Episode

__version__ = "0.1.0"

__all__ = ["Episode", "__version__"]
