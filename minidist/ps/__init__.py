"""A parameter server on multiprocessing: server processes own θ and the optimizer; workers
pull() and push(grad) through shared memory, under BSP, ASP or SSP consistency."""

from minidist.ps.consistency import CONSISTENCIES
from minidist.ps.runtime import PSResult, run

__all__ = ["CONSISTENCIES", "PSResult", "run"]
