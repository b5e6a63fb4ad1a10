"""Tensor and sequence parallelism: styles, rule matching, loss-parallel cross entropy."""

from .apply import apply_tensor_parallel, check_tp_divisibility, glob_match, match_modules, resolve_rules
from .loss import cross_entropy_sum
from .styles import STYLE_NAMES, AttentionSite, Colwise, MoEParallel, Norm, Rowwise, TPStyle, VocabEmbedding, VocabHead

__all__ = ["apply_tensor_parallel", "check_tp_divisibility", "glob_match", "match_modules",
           "resolve_rules", "cross_entropy_sum", "STYLE_NAMES", "AttentionSite", "Colwise", "MoEParallel", "Norm", "Rowwise",
           "TPStyle", "VocabEmbedding", "VocabHead"]
