"""Backbones. Each is ``head(features(x))`` with submodules ``features`` and ``head`` (ANIL adapts ``head``).

Batch norm in the MAML-family backbones does not track running statistics (transductive, docs/guide/backbones.md)."""

from lightning_meta.nn.conv4 import Conv4, conv4_maml_mini_imagenet, conv4_maml_omniglot, conv4_protonet
from lightning_meta.nn.film import ContextConv4, ContextMLP, FiLM
from lightning_meta.nn.mlp import MLP
from lightning_meta.nn.norm import TaskBatchNorm, convert_batchnorm
from lightning_meta.nn.pool import LeanMaxPool2d
from lightning_meta.nn.resnet12 import DropBlock, ResNet12
from lightning_meta.nn.snail_blocks import (
    AttentionBlock,
    CausalConv1d,
    DenseBlock,
    SNAILResNetEmbedding,
    TCBlock,
    causal_mask,
    snail_omniglot_embedding,
)
from lightning_meta.nn.step_norm import StepBatchNorm, convert_to_step_batchnorm, set_norm_step
from lightning_meta.nn.timm_backbone import TimmBackbone, timm_weights_dir

__all__ = [
    "AttentionBlock",
    "CausalConv1d",
    "ContextConv4",
    "ContextMLP",
    "DenseBlock",
    "FiLM",
    "SNAILResNetEmbedding",
    "TCBlock",
    "causal_mask",
    "snail_omniglot_embedding",
    "MLP",
    "Conv4",
    "LeanMaxPool2d",
    "DropBlock",
    "ResNet12",
    "StepBatchNorm",
    "TaskBatchNorm",
    "TimmBackbone",
    "conv4_maml_mini_imagenet",
    "conv4_maml_omniglot",
    "conv4_protonet",
    "convert_batchnorm",
    "convert_to_step_batchnorm",
    "set_norm_step",
    "timm_weights_dir",
]
