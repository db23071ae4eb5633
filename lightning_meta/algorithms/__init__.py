"""Few-shot learners, one paper per file, all subclasses of :class:`MetaLearner`."""

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.metrics import MeanCI95

__all__ = ["MAML", "MeanCI95", "MetaLearner"]
