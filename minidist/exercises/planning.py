"""Lesson 9 (beyond one machine): model-state memory and pipeline compute time."""

import numpy as np

from minidist.exercises._common import Check, _call


def check_model_states(fn, cases=((1e9, 1, 1, 1), (7.5e9, 64, 1, 1), (175e9, 8, 8, 12),
                                  (8.3e9, 1, 8, 1), (1.3e9, 4, 2, 4), (6.7e9, 2, 1, 8))):
    """fn(n_params, dp, tp, pp) should return the bytes of model states one device holds with
    mixed-precision Adam on a dp × tp × pp grid: (2 + 2 + 12)·Ψ / (tp·pp) (ZeRO's count;
    replicas hold copies, so dp does not divide)."""
    name = "check_model_states"
    for psi, dp, tp, pp in cases:
        want = 16 * psi / (tp * pp)
        got, failed = _call(name, fn, psi, dp, tp, pp, convert=float)
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


def check_pipeline_compute(fn, cases=((1e9, 1e6, 8, 1e14, 1, 1), (1e9, 1e6, 8, 1e14, 8, 32),
                                      (175e9, 3.1e6, 1024, 1.5e14, 16, 64),
                                      (6.7e9, 1e6, 64, 1e14, 4, 4), (1e8, 5e5, 2, 1e13, 2, 1))):
    """fn(n_params, tokens, devices, flops, pp, m) should return a step's compute seconds on
    one device with the pipeline bubble: 6ΨT / (devices · flops) · (1 + (pp − 1)/m)."""
    name = "check_pipeline_compute"
    for psi, tokens, devices, flops, pp, m in cases:
        ideal = 6 * psi * tokens / (devices * flops)
        want = ideal * (1 + (pp - 1) / m)
        got, failed = _call(name, fn, psi, tokens, devices, flops, pp, m, convert=float)
        if failed is not None:
            return failed
        if np.isclose(got, want, rtol=1e-9):
            continue
        case = f"Ψ = {psi:.3g}, T = {tokens:.3g}, {devices} devices, pp = {pp}, m = {m}"
        hints = [
            (want / 3, "2Ψ FLOPs per token is the forward pass only; the backward pass costs "
             "twice the forward, 6Ψ per token in all"),
            (ideal, "add the bubble: with pp stages and m micro-batches every device idles "
             "(pp − 1)/m of the ideal time"),
            (ideal * (1 + (pp - 1) / (m + pp - 1)), "(pp − 1)/(m + pp − 1) is the bubble's "
             "share of the whole step; relative to the ideal time it is (pp − 1)/m"),
            (want * devices, "the work 6ΨT is shared by all devices: divide by devices · flops"),
        ]
        hint = next((h for wrong, h in hints if np.isclose(got, wrong, rtol=1e-9)),
                    f"expected {want:.4g} s, got {got:.4g} s")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"compute time with the bubble on {len(cases)} layouts")
