"""Lesson 9's exercises, solved: what a learner is asked to write, in the plainest form.

    model_states    the bytes of model states per device on a dp × tp × pp grid (a formula)
    coords          where each rank sits in a dp × tp × pp hybrid run (minidist's Topology)
"""


def model_states(n_params, dp, tp, pp):
    """Mixed-precision Adam keeps 2 (fp16 θ) + 2 (fp16 ∇) + 12 (fp32 θ, m, v) bytes per
    parameter; tensor and pipeline parallelism split the model tp·pp ways, while each of the dp
    replicas holds a whole copy of its share."""
    return 16 * n_params / (tp * pp)


def coords(rank, dp, tp, pp):
    """rank = (d·pp + s)·tp + k: the tensor part k varies fastest, so a tensor-parallel group
    is tp consecutive ranks (one server); then the stage s, then the replica d."""
    rest, k = divmod(rank, tp)
    d, s = divmod(rest, pp)
    return {"dp": d, "tp": k, "pp": s}
