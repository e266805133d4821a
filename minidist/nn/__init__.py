"""Models with explicit forward and backward over ONE flat parameter buffer.

    layers       Layer, Linear, ReLU, Tanh
    losses       MSELoss, SoftmaxCrossEntropy
    model        Sequential and the builders mlp, linear_regression, logistic_regression
    attention    CausalSelfAttention
    transformer  Embedding, LayerNorm, GELU, Block, GPT and the builder gpt
    moe          MoE: a block's MLP as a mixture of experts (gpt(..., n_experts=E, top_k=k))
"""

from minidist.nn.attention import CausalSelfAttention
from minidist.nn.layers import Layer, Linear, ReLU, Tanh
from minidist.nn.losses import MSELoss, SoftmaxCrossEntropy
from minidist.nn.model import Sequential, UnitHooks, linear_regression, logistic_regression, mlp
from minidist.nn.moe import MoE
from minidist.nn.transformer import GELU, GPT, Block, Embedding, LayerNorm, gpt

__all__ = [
    "GELU", "GPT", "Block", "CausalSelfAttention", "Embedding", "Layer", "LayerNorm", "Linear",
    "MSELoss", "MoE", "ReLU", "Sequential", "SoftmaxCrossEntropy", "Tanh", "UnitHooks",
    "gpt", "linear_regression", "logistic_regression", "mlp",
]
