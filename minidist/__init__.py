"""minidist: distributed training of large models, from scratch, taught by running code."""

from minidist import data, exercises, gradcheck, kernels, nn, optim
from minidist.train import History, train

__version__ = "0.1.0"
__all__ = ["History", "data", "exercises", "gradcheck", "kernels", "nn", "optim", "train"]
