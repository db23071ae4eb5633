"""Learned optimizers: update rules, the optimizer that applies them, and shipped pretrained weights."""

from lightning_meta.optim.celo2 import Celo2Rule
from lightning_meta.optim.functional import lstm_preprocess, mean_square, newton_schulz, tensor_normalize, time_features
from lightning_meta.optim.learned_rules import LSTMRule, MLPRule
from lightning_meta.optim.optimizer import RuleOptimizer
from lightning_meta.optim.pretrained import available_pretrained, load_pretrained, save_pretrained
from lightning_meta.optim.rules import (
    AdamRule,
    UpdateRule,
    check_rule_record,
    get_rule,
    list_rules,
    register_rule,
    rule_fingerprint,
    rule_hash,
    rule_record,
)

__all__ = [
    "AdamRule",
    "Celo2Rule",
    "LSTMRule",
    "MLPRule",
    "RuleOptimizer",
    "UpdateRule",
    "available_pretrained",
    "check_rule_record",
    "get_rule",
    "list_rules",
    "load_pretrained",
    "lstm_preprocess",
    "mean_square",
    "newton_schulz",
    "register_rule",
    "rule_fingerprint",
    "rule_hash",
    "rule_record",
    "save_pretrained",
    "tensor_normalize",
    "time_features",
]
