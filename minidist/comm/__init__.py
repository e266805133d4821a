"""Communication: a Communicator per rank, collectives over send/recv, three backends."""

from minidist.comm.communicator import ALGORITHMS, REDUCE_OPS, Communicator
from minidist.comm.subcommunicator import SubCommunicator

__all__ = ["ALGORITHMS", "REDUCE_OPS", "Communicator", "SubCommunicator"]
