"""Few-shot learners, one paper per file, all subclasses of :class:`MetaLearner`."""

from lightning_meta.algorithms.anil import ANIL
from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.meta_sgd import MetaSGD
from lightning_meta.algorithms.metrics import MeanCI95
from lightning_meta.algorithms.protonet import ProtoNet

__all__ = ["ANIL", "MAML", "MeanCI95", "MetaLearner", "MetaSGD", "ProtoNet"]
