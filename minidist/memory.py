"""What a rank holds, in bytes: the ledger behind `History.memory`.

Every figure is counted from the arrays the rank really holds (`nbytes`), never from a formula;
the tests and lesson 10 compare them with the formulas (ZeRO's 2Ψ + 2Ψ + 12Ψ, Korthikanti et
al.'s activations per layer).

    params, grads, optimizer   the persistent state: the flat buffers and the optimizer's arrays
    activations                the most a step held at once for backward: what the layers keep
                               between their forward and their backward (`activation_bytes`)
    peak                       the worst moment of a step: the persistent state plus the
                               activations at their most (temporaries inside one op are not in
                               the ledger)
"""

import numpy as np

KEYS = ("params", "grads", "optimizer", "activations", "peak")


def array_bytes(*values):
    """Bytes held by the arrays in `values` (arrays, or lists, tuples and dicts of them; other
    values count 0). A view holds its whole base alive, so it counts as its base, and an array
    reached twice (a layer's output kept by the next layer as its input) counts once."""
    return sum(_roots(values, {}).values())


def _roots(values, seen):
    """{id: nbytes} of the base arrays behind `values`, added to `seen`."""
    for value in values:
        if isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            seen[id(value)] = int(value.nbytes)
        elif hasattr(value, "__cuda_array_interface__"):
            seen[id(value)] = int(value.nbytes)
        elif isinstance(value, (list, tuple)):
            _roots(value, seen)
        elif isinstance(value, dict):
            _roots(value.values(), seen)
    return seen


def optimizer_bytes(optimizer):
    """The optimizer's state arrays (velocity; Adam's m and v), 0 for none."""
    return 0 if optimizer is None else array_bytes(optimizer.state)


def activation_bytes(parts):
    """Bytes that `parts` (layers, a loss) keep for their backward right now: every array
    attribute, through the sublayers of composite layers, each base array once. The `params`
    and `grads` dicts are views of the flat buffers, not activations, and are skipped."""
    return sum(_activations(parts, {}).values())


def _activations(parts, seen):
    for part in parts:
        if part is None:
            continue
        _roots([value for name, value in vars(part).items()
                if name not in ("params", "grads")], seen)
        if hasattr(part, "sublayers"):
            _activations(part.sublayers(), seen)
    return seen


class Ledger:
    """One rank's memory over a run. Set the persistent state once (`hold`), call `saw` with
    the activation bytes held at each moment they are at their most (after a forward; with a
    pipeline, after each micro-batch's), then `as_dict()` for History.memory."""

    def __init__(self):
        self.params = self.grads = self.optimizer = 0
        self.activations = self.peak = 0

    def hold(self, params=0, grads=0, optimizer=0):
        """The persistent state, in bytes (array_bytes / optimizer_bytes of what is held)."""
        self.params, self.grads, self.optimizer = int(params), int(grads), int(optimizer)
        self.peak = max(self.peak, self.persistent)

    @property
    def persistent(self):
        return self.params + self.grads + self.optimizer

    def saw(self, activations):
        """Activations held at one moment of a step; keeps the largest, and the peak."""
        self.activations = max(self.activations, int(activations))
        self.peak = max(self.peak, self.persistent + int(activations))

    def as_dict(self):
        """{params, grads, optimizer, activations, peak}: integer bytes."""
        return {key: int(getattr(self, key)) for key in KEYS}
