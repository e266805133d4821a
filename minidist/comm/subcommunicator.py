"""A split group: some of a parent communicator's ranks, renumbered 0 … len(members)−1.

`comm.split(color, key)` makes one. Its messages travel through the parent's transport under
its own context (the high bits of every wire tag), so groups never mix messages. It has no
native paths: every collective runs over send/recv (collectives.py), and its async ops join
its rank's one ordered stream (the parent's Progress).
"""

from minidist.comm.communicator import Communicator


class SubCommunicator(Communicator):
    """A group of the parent's ranks, renumbered 0..len(members)-1, with its own message space."""

    def __init__(self, parent, members, context):
        super().__init__(members.index(parent.rank), len(members), parent.timeout, parent.debug,
                         context)
        self.parent, self.members = parent, members
        self.backend = parent.backend
        self._queue = parent._queue  # one ordered stream of async ops per rank, over all groups

    def _check_async(self):
        self.parent._check_async()

    def _transport_send(self, array, dst, tag, call):
        self.parent._transport_send(array, self.members[dst], tag, call)

    def _transport_recv(self, src, tag, timeout):
        return self.parent._transport_recv(self.members[src], tag, timeout)

    def _set_status(self, text):
        self.parent._set_status(f"[group {self.members}] {text}")

    def _returned(self, after):
        self.parent._returned(f"{after} in group {self.members}")
