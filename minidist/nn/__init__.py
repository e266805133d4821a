"""Models with explicit forward and backward over ONE flat parameter buffer.

    layers       Layer, Linear, ReLU, Tanh
    losses       MSELoss, SoftmaxCrossEntropy
    model        Sequential and the builders mlp, linear_regression, logistic_regression
    transformer  Embedding, LayerNorm, GELU, CausalSelfAttention, Block and the builder gpt
"""

from minidist.nn.layers import Layer, Linear, ReLU, Tanh
from minidist.nn.losses import MSELoss, SoftmaxCrossEntropy
from minidist.nn.model import Sequential, linear_regression, logistic_regression, mlp

__all__ = [
    "Layer", "Linear", "MSELoss", "ReLU", "Sequential", "SoftmaxCrossEntropy", "Tanh",
    "linear_regression", "logistic_regression", "mlp",
]
