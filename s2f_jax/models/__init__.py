"""Block models (ConvNet, ResNet, DenseNet) of original.md S2F §2, with helpers on their parameter pytrees, low-rank
adapters (§2.9) and side-tuned models (§2.8)."""
from s2f_jax.models.adapters import LowRank, adapter_param_count, adapter_ranks, max_rank
from s2f_jax.models.layers import dropout, layer_names
from s2f_jax.models.registry import (MODEL_NAMES, MODELS, count_params, make_model, param_count_table, param_vec_mask,
                                     register_model, weight_decay_mask)
from s2f_jax.models.side_tune import SideTuned, make_side_tuned, side_name

__all__ = ['MODELS', 'MODEL_NAMES', 'LowRank', 'SideTuned', 'adapter_param_count', 'adapter_ranks', 'count_params',
           'dropout', 'layer_names', 'make_model', 'make_side_tuned', 'max_rank', 'param_count_table', 'param_vec_mask',
           'register_model', 'side_name', 'weight_decay_mask']
