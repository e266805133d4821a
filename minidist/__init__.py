"""minidist: distributed training of large models, from scratch, taught by running code."""

from minidist import cost, data, exercises, gradcheck, kernels, launch, nn, optim
from minidist.errors import CollectiveMismatchError, CommTimeout, OutOfMemory, WorkerError
from minidist.launch import run
from minidist.train import History, train

__version__ = "0.1.0"
__all__ = [
    "CollectiveMismatchError", "CommTimeout", "History", "OutOfMemory", "WorkerError", "cost",
    "data", "exercises", "gradcheck", "kernels", "launch", "nn", "optim", "run", "train",
]
