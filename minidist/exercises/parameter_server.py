"""Lesson 6 (parameter server): the SSP rule and the traffic through a server."""

import numpy as np

from minidist.exercises._common import Check, _call


def check_ssp_rule(fn, bounds=(0, 1, 2, 5)):
    """fn(clock, slowest_clock, staleness) should say whether a worker at `clock` may pull now
    under SSP: True exactly when clock − slowest_clock ≤ staleness (Ho et al. 2013)."""
    from minidist.ps.consistency import may_serve_pull

    name = "check_ssp_rule"
    for s in bounds:
        for slowest in (0, 3):
            for clock in range(slowest, slowest + s + 3):
                want = may_serve_pull("ssp", clock, 0, slowest, s)
                got, failed = _call(name, fn, clock, slowest, s, convert=lambda answer: answer)
                if failed is not None:
                    return failed
                if not isinstance(got, (bool, np.bool_)):
                    return Check(name, False, f"return True or False, got {got!r}")
                if got == want:
                    continue
                where = (f"a worker at clock {clock} with the slowest at {slowest} and s = {s} "
                         f"(it is {clock - slowest} clocks ahead)")
                if want:
                    hint = ("being exactly s clocks ahead is allowed: the bound is ≤ s, not < s"
                            if clock - slowest == s else "it is within the bound")
                    return Check(name, False, f"{where} may pull: {hint}")
                return Check(name, False, f"{where} must wait: more than s = {s} ahead. "
                                          "Compare clock − slowest_clock with s")
    return Check(name, True, f"allowed exactly when clock − slowest ≤ s, for s in {bounds}")


def check_server_traffic(fn, cases=((1000, 8, 4, 1), (1000, 8, 4, 3), (10, 4, 2, 2),
                                    (999, 4, 8, 4), (7, 8, 3, 7))):
    """fn(n_params, itemsize, workers, num_servers) should return the bytes the busiest server
    sends plus receives per BSP step: every worker pushes its slice of the gradient to each
    server and pulls the slice of the parameters back. Shards are cut as
    minidist.data.shard_bounds cuts them (the first n mod k servers hold one parameter more)."""
    from minidist.data import shard_bounds

    name = "check_server_traffic"
    for n, itemsize, workers, k in cases:
        largest = max(hi - lo for lo, hi in (shard_bounds(n, j, k) for j in range(k)))
        want = 2 * workers * largest * itemsize
        got, failed = _call(name, fn, n, itemsize, workers, k, convert=lambda answer: answer)
        if failed is not None:
            return failed
        where = f"with n = {n} parameters of {itemsize} B, {workers} workers, {k} servers"
        if np.isclose(got, want):
            continue
        mistakes = [
            (workers * largest * itemsize, "you counted one direction only: each worker "
             "pushes a gradient slice AND pulls a parameter slice"),
            (2 * workers * n * itemsize, "every server holds only its shard: divide the "
             "parameters among the servers"),
            (2 * workers * largest, "count bytes: multiply the elements by itemsize"),
            (2 * workers * (n // k) * itemsize, "the busiest server holds ⌈n/k⌉ parameters, "
             "not ⌊n/k⌋: the first n mod k shards get one more"),
            (2 * workers * n / k * itemsize, "shards hold whole parameters: the busiest holds "
             "⌈n/k⌉ of them, not n/k"),
            (2 * largest * itemsize, "all the workers talk to every server: multiply by W"),
        ]
        for wrong, hint in mistakes:
            if np.isclose(got, wrong):
                return Check(name, False, f"{where}: {hint}")
        return Check(name, False, f"{where}: expected {want} bytes, got {got}")
    return Check(name, True, f"bytes through the busiest server for {len(cases)} layouts")
