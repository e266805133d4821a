"""Per-rank communication counters: bytes sent and received, messages and seconds, per operation."""

from collections import defaultdict
from dataclasses import dataclass


@dataclass
class OpStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0  # messages sent
    calls: int = 0
    seconds: float = 0.0


class Stats:
    """`stats["all_reduce"].bytes_sent`, `stats.bytes_sent` (all operations), `stats.reset()`.

    Payload bytes only (the array data), so the counts equal the cost model's exactly.
    Point-to-point calls made by the user count under "send" and "recv"; those made inside a
    collective count under the collective's name.
    """

    def __init__(self):
        self.ops = defaultdict(OpStats)

    def __getitem__(self, op):
        return self.ops[op]

    def reset(self):
        self.ops.clear()

    @property
    def bytes_sent(self):
        return sum(s.bytes_sent for s in self.ops.values())

    @property
    def bytes_received(self):
        return sum(s.bytes_received for s in self.ops.values())

    @property
    def messages(self):
        return sum(s.messages for s in self.ops.values())

    def as_dict(self):
        return {op: vars(s).copy() for op, s in self.ops.items()}

    def __repr__(self):
        rows = [f"{op}: sent {s.bytes_sent} B in {s.messages} msgs, received {s.bytes_received} B,"
                f" {s.calls} calls, {s.seconds:.6f} s" for op, s in sorted(self.ops.items())]
        return "Stats(" + ("; ".join(rows) or "empty") + ")"
