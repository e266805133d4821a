"""Lesson 9 (beyond one machine): model-state memory by hand, and the rank layout of a hybrid
run — which ranks form the data-, tensor- and pipeline-parallel groups.

The layout checker makes the learner's numbering the one minidist's `Topology` uses, trains an
MLP with strategy="hybrid" on 8 thread ranks on several grids, and compares with one process
(float64, 1e-10); before that it names two ranks that collide, and after it the tensor-parallel
group that would not sit inside one server. Any numbering that gives each rank its own place
trains as one process does, so the run shows that the learner's function works inside minidist;
whether the layout is a good one (tensor-parallel peers on consecutive ranks) is judged from
the layout itself.
"""

import contextlib
import functools

import numpy as np

from minidist.exercises._common import (
    Check,
    Exercise,
    _brief,
    _call,
    _check_timeout,
    _differs,
    _train,
)

AXES = ("dp", "tp", "pp")
WORLD = 8
GRIDS = ((2, 2, 2), (1, 4, 2), (4, 2, 1), (2, 1, 4))  # (dp, tp, pp), 8 ranks each
MLP_SIZES = [8] * 8 + [4]  # 8 Linears: 4 stages of one tp-splittable block each
RUN = {"steps": 3, "batch_size": 16, "lr": 0.1}


def check_model_states(fn, cases=((1e9, 1, 1, 1), (7.5e9, 64, 1, 1), (175e9, 8, 8, 12),
                                  (8.3e9, 1, 8, 1), (1.3e9, 4, 2, 4), (6.7e9, 2, 1, 8))):
    """fn(n_params, dp, tp, pp) should return the bytes of model states one device holds with
    mixed-precision Adam on a dp × tp × pp grid: (2 + 2 + 12)·Ψ / (tp·pp) (ZeRO's count;
    replicas hold copies, so dp does not divide)."""
    name = "check_model_states"
    for psi, dp, tp, pp in cases:
        want = 16 * psi / (tp * pp)
        got, failed = _call(name, fn, psi, dp, tp, pp, convert=_number)
        if failed is not None:
            return failed
        if np.isclose(got, want, rtol=1e-9):
            continue
        case = f"Ψ = {psi:.3g}, dp×tp×pp = {dp}×{tp}×{pp}"
        hints = [
            (want / dp, "data parallelism replicates: each of the dp replicas holds its whole "
             "share, so dp does not divide the memory (that is what ZeRO changes)"),
            (16 * psi / tp, "a pipeline stage holds only its layers: divide by pp too"),
            (16 * psi / pp, "tensor parallelism splits every matrix: divide by tp too"),
            (16 * psi, "tensor and pipeline parallelism split the model: divide by tp·pp"),
            (4 * psi / (tp * pp), "add the optimizer: mixed-precision Adam keeps an fp32 copy "
             "of θ, m and v, 12 bytes per parameter on top of 2 + 2"),
            (2 * psi / (tp * pp), "count the gradients and the optimizer state, not only the "
             "fp16 parameters: 2 + 2 + 12 = 16 bytes per parameter"),
            (12 * psi / (tp * pp), "the optimizer's 12 bytes are not all: add 2 bytes of fp16 "
             "parameters and 2 of fp16 gradients"),
        ]
        hint = next((h for wrong, h in hints if np.isclose(got, wrong, rtol=1e-9)),
                    f"expected {want:.4g} bytes, got {got:.4g}")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"model states per device on {len(cases)} grids, 1 to 768 ways")


def _number(result):
    """float(result) for a number (a str or a bool is refused: it is not a count of bytes)."""
    if isinstance(result, (str, bytes, bool)):
        raise TypeError(f"return a number of bytes, not a {type(result).__name__}")
    return float(result)


# ----- exercise 2: the rank layout -----------------------------------------------------------

@contextlib.contextmanager
def rank_layout(fn):
    """Inside: every Topology places rank r at fn(r, dp, tp, pp) = {"dp": d, "tp": k, "pp": s}
    (its groups and sub-communicators follow, on thread ranks, which share the class); restored
    after, even on error."""
    from minidist.parallel.hybrid import Topology

    saved = {name: Topology.__dict__[name] for name in ("coords", "rank")}

    def coords(self, rank):
        return {axis: int(v) for axis, v in fn(rank, self.dp, self.tp, self.pp).items()}

    def rank(self, dp=0, pp=0, tp=0):
        return next(r for r in range(self.world_size)
                    if coords(self, r) == {"dp": dp, "tp": tp, "pp": pp})

    Topology.coords, Topology.rank = coords, rank
    try:
        yield
    finally:
        Topology.coords, Topology.rank = saved["coords"], saved["rank"]


def _layout(fn, grid):
    """({rank: (d, k, s)}, None) for every rank of the grid, or (None, the first problem: a
    return value that is no such dict, a coordinate out of range, two ranks that collide)."""
    from minidist.data import is_integer

    where = "with dp×tp×pp = {}×{}×{}".format(*grid)
    places, owner = {}, {}
    for r in range(WORLD):
        got, failed = _call("", fn, r, *grid, convert=lambda result: result)
        if failed is not None:
            return None, f"{where}, rank {r}: {failed.message}"
        if not (isinstance(got, dict) and set(got) == set(AXES)):
            shown = sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__
            return None, (f"{where}, rank {r}: return a dict of integers with the keys dp, tp "
                          f"and pp, got {shown}")
        bad = [a for a in AXES if isinstance(got[a], bool) or not is_integer(got[a])]
        if bad:
            shown = ", ".join(f"{a} = {_brief(got[a])} ({type(got[a]).__name__})" for a in bad)
            return None, f"{where}, rank {r}: coordinates are integers, got {shown}"
        place = tuple(int(got[a]) for a in AXES)
        for axis, value, size in zip(AXES, place, grid, strict=True):
            if not 0 <= value < size:
                return None, (f"{where}, rank {r}: {axis} = {value} is out of range: "
                              f"0…{size - 1}")
        if place in owner:
            shown = ", ".join(f"{a} = {v}" for a, v in zip(AXES, place, strict=True))
            return None, (f"{where}, ranks {owner[place]} and {r} both get ({shown}): two "
                          f"ranks would hold the same part of the model and no rank the part "
                          f"of another; each (dp, tp, pp) belongs to exactly one rank")
        places[r], owner[place] = place, r
    return places, None


def _scattered_tp_group(places):
    """The first tensor-parallel group (the ranks with the same dp and pp) that is not a run
    of consecutive ranks, or None."""
    for r in range(WORLD):
        group = sorted(q for q in range(WORLD)
                       if (places[q][0], places[q][2]) == (places[r][0], places[r][2]))
        if group != list(range(group[0], group[0] + len(group))):
            return r, group
    return None


def check_rank_layout(fn, grids=GRIDS, timeout=30.0):
    """fn(rank, dp, tp, pp) -> {"dp": d, "tp": k, "pp": s}: where rank `rank` of dp·tp·pp sits,
    replica d, tensor part k, pipeline stage s. For each grid of 8 ranks: every rank a different
    place, then fn drives minidist's Topology in a real strategy="hybrid" run of an MLP on 8
    thread ranks, which must train as one process does (1e-10; any such bijection does); and,
    judged from the layout, each tensor-parallel group must be consecutive ranks, which a
    launcher puts on one server."""
    from minidist import data, nn, train
    from minidist.parallel.hybrid import Topology

    name = "check_rank_layout"
    grids = [tuple(grid) for grid in grids]
    if not grids or any(len(g) != 3 or not all(data.is_integer(x) and x >= 1 for x in g)
                        or int(np.prod(g)) != WORLD for g in grids):
        raise ValueError(f"grids must be a non-empty list of (dp, tp, pp), integers >= 1 with "
                         f"dp·tp·pp = {WORLD}, got {grids!r}")
    _check_timeout(timeout)
    X, y = data.make_classification(64, MLP_SIZES[0], MLP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, MLP_SIZES, seed=0)
    single = train(model_fn, X, y, **RUN)
    layouts = {}
    for grid in grids:
        layouts[grid], problem = _layout(fn, grid)
        if problem:
            return Check(name, False, problem)
        dp, tp, pp = grid
        with rank_layout(fn):
            _, recursed = _call(name, fn, 0, *grid, convert=lambda result: result)
            if recursed is not None and "RecursionError" in recursed.message:
                return Check(name, False, "your function calls Topology's own coords, which the "
                                          "check replaces with yours (it would call itself): "
                                          "work the place out from rank, dp, tp and pp")
            hist, failure = _train(model_fn, X, y, timeout, strategy="hybrid", workers=WORLD,
                                   dp=dp, tp=tp, pp=pp, micro_batches=2 if pp > 1 else 1, **RUN)
        failure = failure or _differs(hist, single)
        if failure:
            return Check(name, False, f"with dp×tp×pp = {dp}×{tp}×{pp}, driving a real hybrid "
                                      f"run on {WORLD} thread ranks, {failure}")
    for grid in grids:
        scattered = _scattered_tp_group(layouts[grid])
        if scattered:
            r, group = scattered
            return Check(name, False, "with dp×tp×pp = {}×{}×{}, ".format(*grid) +
                         f"rank {r}'s tensor-parallel group is ranks {group}. The runs train "
                         "as one process does, but a launcher places consecutive ranks on the "
                         "same server, so these all-reduces, in every layer of every step, "
                         "would cross the network: give tensor-parallel peers consecutive ranks")
    own = [g for g in grids if any(layouts[g][r] != tuple(Topology(*g).coords(r)[a] for a in AXES)
                                   for r in range(WORLD))]
    return Check(name, True, f"every rank its own place, real hybrid runs that train as one "
                             f"process on dp×tp×pp = "
                             f"{', '.join('×'.join(map(str, g)) for g in grids)}, and each "
                             "tensor-parallel group on consecutive ranks"
                             + (f" (on {'×'.join(map(str, own[0]))} your numbering differs from "
                                "minidist's Topology's, which works too)"
                                if own else ""))


__all__ = ["check_model_states", "check_rank_layout"]

EXERCISES = (
    Exercise(9, "my_model_states", check_model_states, "model_states",
             "the bytes of model states one device holds on a dp × tp × pp grid, by hand",
             kind="formula"),
    Exercise(9, "my_coords", check_rank_layout, "coords",
             "the rank layout of a hybrid run (which replica, tensor part and stage each rank "
             "holds), used by minidist's Topology in real dp × tp × pp runs on 8 thread ranks "
             "that must train as one process; its tensor-parallel groups judged from the layout"),
)
