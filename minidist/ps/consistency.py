"""When may a server answer a pull, and when does a push become an update: BSP, ASP, SSP.

Each worker w has a clock c_w: the number of gradients it has pushed. A pull from a worker at
clock c asks for the parameters to compute step c from. With v the server's version (updates
applied so far), s the staleness bound and c_min the clock of the slowest worker still running:

    BSP   serve when v ≥ c            every worker's gradient of steps < c is in: synchronous SGD
    SSP   serve when c − c_min ≤ s    nobody runs more than s clocks ahead (Ho et al. 2013)
    ASP   serve at once               no waiting at all (Downpour SGD; Hogwild! in one machine)

On a push, ASP and SSP apply the gradient at once. BSP adds it to the step's sum and applies
the sum once, when every running worker has pushed:  θ ← opt(θ, Σ_k g_k), exactly one
synchronous SGD step. The staleness of an applied gradient is τ = v_apply − v_pull: how many
updates landed between the pull it was computed from and its own application (BSP: τ = 0).
"""

from minidist.data import is_integer

CONSISTENCIES = ("bsp", "asp", "ssp")


def check(consistency, staleness):
    """A clear error for a bad (consistency, staleness) pair."""
    if consistency not in CONSISTENCIES:
        raise ValueError(f"unknown consistency {consistency!r}; allowed: "
                         f"{', '.join(CONSISTENCIES)}")
    if consistency == "ssp":
        if not is_integer(staleness) or staleness < 0:
            raise ValueError("consistency='ssp' needs staleness=s, an integer >= 0 "
                             f"(clocks a worker may run ahead of the slowest), got {staleness!r}")
    elif staleness is not None:
        raise ValueError(f"staleness={staleness!r} only applies to consistency='ssp' "
                         f"(got consistency={consistency!r})")


def ssp_may_pull(clock, min_clock, staleness):
    """SSP's rule: a worker at clock c may read while c − c_min ≤ s. ps.run sends its servers
    whatever this module attribute is when the run starts, so that a learner's rule can drive
    them (minidist.exercises.parameter_server.ssp_rule swaps it)."""
    return clock - min_clock <= staleness


def may_serve_pull(consistency, clock, version, min_clock, staleness, ssp=None):
    """True when a pull from a worker at `clock` may be answered now (see the table above);
    `ssp`: the SSP rule (clock, min_clock, staleness) -> bool, ssp_may_pull if None."""
    if consistency == "bsp":
        return version >= clock
    if consistency == "ssp":
        return bool((ssp or ssp_may_pull)(clock, min_clock, staleness))
    return True


def applies_at_once(consistency):
    """ASP and SSP apply each gradient as it arrives; BSP sums a step's gradients first."""
    return consistency != "bsp"
