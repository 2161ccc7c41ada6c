"""Block models (ConvNet, ResNet, DenseNet) of spec §2, with helpers on their parameter pytrees."""
from s2f_jax.models.layers import dropout, layer_names
from s2f_jax.models.registry import (MODEL_NAMES, count_params, make_model, param_count_table, param_vec_mask,
                                     weight_decay_mask)

__all__ = ['MODEL_NAMES', 'count_params', 'dropout', 'layer_names', 'make_model', 'param_count_table',
           'param_vec_mask', 'weight_decay_mask']
