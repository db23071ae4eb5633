"""Few-shot learners, one paper per file, all subclasses of :class:`MetaLearner`."""

from lightning_meta.algorithms.anil import ANIL
from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.caml import CAML
from lightning_meta.algorithms.finetune import FineTuneProtoNet
from lightning_meta.algorithms.imaml import IMAML
from lightning_meta.algorithms.leo import LEO
from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.maml_pp import MAMLPlusPlus
from lightning_meta.algorithms.matching_networks import MatchingNetworks
from lightning_meta.algorithms.meta_sgd import MetaSGD
from lightning_meta.algorithms.metrics import MeanCI95
from lightning_meta.algorithms.proto_maml import ProtoMAML
from lightning_meta.algorithms.protonet import ProtoNet
from lightning_meta.algorithms.reptile import Reptile
from lightning_meta.algorithms.simpleshot import SimpleShot
from lightning_meta.algorithms.snail import SNAIL

__all__ = [
    "ANIL",
    "CAML",
    "FineTuneProtoNet",
    "IMAML",
    "LEO",
    "MAML",
    "MAMLPlusPlus",
    "MatchingNetworks",
    "MeanCI95",
    "MetaLearner",
    "MetaSGD",
    "ProtoMAML",
    "ProtoNet",
    "Reptile",
    "SNAIL",
    "SimpleShot",
]
