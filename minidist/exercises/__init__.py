"""Checkers for the lessons' exercises: a clear pass, or a message that helps fix the answer.

Each checker runs the learner's piece against an independent reference (finite differences,
the full-batch computation, numpy, a single-process run) and, for the exercises that build,
INSIDE minidist on real ranks; it returns a `Check`, which prints as ✔ or ✘ with the reason
(the first thing that is wrong: which rank, which step, which element), and is truthy when
passed. One module per lesson, each with its `EXERCISES` (see `catalog`):

    welcome (0) · gradient_descent (1) · gpu_kernels (2) · collectives (3) · distributed_gd (4) ·
    data_parallel (5) · parameter_server (6) · model_parallel (7) · compression (8) ·
    planning (9) · transformers (10) · sharding (11) · parallel_transformers (12) ·
    long_context (13)

The reference solutions live in `minidist.exercises.solutions`, for instructors, and not on
the lessons' pages; `python -m minidist check LESSON [FILE.py]` grades outside the notebook.
"""

from minidist.exercises._common import Check, Exercise  # noqa: F401 - for learners and the catalog
from minidist.exercises.collectives import *  # noqa: F403 - each module's __all__: its checkers
from minidist.exercises.compression import *  # noqa: F403
from minidist.exercises.data_parallel import *  # noqa: F403
from minidist.exercises.distributed_gd import *  # noqa: F403
from minidist.exercises.gpu_kernels import *  # noqa: F403
from minidist.exercises.gradient_descent import *  # noqa: F403
from minidist.exercises.long_context import *  # noqa: F403
from minidist.exercises.model_parallel import *  # noqa: F403
from minidist.exercises.parallel_transformers import *  # noqa: F403
from minidist.exercises.parameter_server import *  # noqa: F403
from minidist.exercises.planning import *  # noqa: F403
from minidist.exercises.sharding import *  # noqa: F403
from minidist.exercises.transformers import *  # noqa: F403
from minidist.exercises.welcome import *  # noqa: F403
