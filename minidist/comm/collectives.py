"""Every collective, written once over `comm.send` and `comm.recv`.

p = comm.world_size ranks, n = the array's size. Costs in the α-β-γ model (α per message,
β per byte moved, γ per byte reduced; Thakur, Rabenseifner & Gropp 2005), per rank:

    broadcast_tree            ⌈lg p⌉(α + nβ)
    reduce_tree               ⌈lg p⌉(α + nβ + nγ)
    all_reduce_naive          root: 2(p−1)(α + nβ) + (p−1)nγ   (everything goes through rank 0)
    all_reduce_tree           reduce_tree + broadcast_tree
    all_reduce_recursive_doubling   lg p(α + nβ + nγ)   (+2 steps when p is not a power of 2)
    all_reduce_ring           2(p−1)α + 2n(p−1)/p·β + n(p−1)/p·γ   (bandwidth-optimal)
    all_gather_ring           (p−1)α + n(p−1)β      (n = one rank's contribution)
    all_to_all_pairwise       (p−1)α + Σ_{j≠r} n_j·β   (n_j = the chunk rank r sends to rank j)

`send` never waits for the receiver, so "everyone sends, then everyone receives" cannot deadlock.
"""

import numpy as np

from minidist.data import shard_bounds
from minidist.errors import CollectiveMismatchError

UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


def recv_like(comm, src, like):
    """Receive from src and check it has `like`'s shape and dtype. `recv` has already checked
    that src made the same call, so a piece of another shape means the algorithm itself is
    wrong (say, a student's own): a clear error, not wrong numbers."""
    got = comm.recv(src)
    if got.shape != like.shape or got.dtype != like.dtype:
        raise CollectiveMismatchError(
            f"{comm._op}: rank {comm.rank} expected a piece of {like.dtype} {like.shape} from "
            f"rank {src}, got {got.dtype} {got.shape}: the algorithm sends the wrong pieces")
    return got


def _finish(array, op, p):
    """op="mean" is a sum divided by p at the end."""
    if op == "mean":
        array /= p


# ---- broadcast and reduce: binomial trees, rooted anywhere ------------------------------------
def broadcast_tree(comm, array, src):
    """In round k, every rank that has the data sends it 2^k ranks further: ⌈lg p⌉ rounds."""
    p, me = comm.world_size, (comm.rank - src) % comm.world_size  # me: rank relative to src
    mask = 1
    while mask < p:  # receive once, from the rank that differs in my lowest set bit
        if me & mask:
            array[...] = recv_like(comm, (me - mask + src) % p, array)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:  # then pass it on to the ranks below that bit
        if me + mask < p:
            comm.send(array, (me + mask + src) % p)
        mask >>= 1


def reduce_tree(comm, array, dst, op):
    """The broadcast tree run backwards: children send partial results up to their parent."""
    p, me, ufunc = comm.world_size, (comm.rank - dst) % comm.world_size, UFUNCS[op]
    acc = array if me == 0 else array.copy()  # only the root's array changes
    mask = 1
    while mask < p:
        if me & mask:
            comm.send(acc, (me - mask + dst) % p)
            break
        if me + mask < p:
            ufunc(acc, recv_like(comm, (me + mask + dst) % p, acc), out=acc)
        mask <<= 1
    if me == 0:
        _finish(array, op, p)


# ---- all-reduce, four ways ----------------------------------------------------------------------
def all_reduce_naive(comm, array, op):
    """Everyone sends to rank 0, which reduces and sends the result back to everyone."""
    p, ufunc = comm.world_size, UFUNCS[op]
    if comm.rank == 0:
        for src in range(1, p):
            ufunc(array, recv_like(comm, src, array), out=array)
        _finish(array, op, p)
        for dst in range(1, p):
            comm.send(array, dst)
    else:
        comm.send(array, 0)
        array[...] = recv_like(comm, 0, array)


def all_reduce_tree(comm, array, op):
    """A binomial reduce to rank 0, then a binomial broadcast from it."""
    reduce_tree(comm, array, 0, op)
    broadcast_tree(comm, array, 0)


def all_reduce_recursive_doubling(comm, array, op):
    """Partners 1, 2, 4, … ranks apart swap everything they have and both reduce: lg p steps.

    With p not a power of two, the first 2r ranks (r = p − 2^⌊lg p⌋) pair up first: each even
    one hands its data to its odd neighbour, sits out, and gets the result at the end.
    """
    p, rank, ufunc = comm.world_size, comm.rank, UFUNCS[op]
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    if rank < 2 * rem and rank % 2 == 0:
        comm.send(array, rank + 1)
        new_rank = -1
    elif rank < 2 * rem:
        ufunc(array, recv_like(comm, rank - 1, array), out=array)
        new_rank = rank // 2
    else:
        new_rank = rank - rem
    if new_rank >= 0:
        mask = 1
        while mask < pof2:
            partner = new_rank ^ mask
            partner = partner * 2 + 1 if partner < rem else partner + rem
            comm.send(array, partner)
            ufunc(array, recv_like(comm, partner, array), out=array)
            mask <<= 1
        _finish(array, op, p)
    if rank < 2 * rem:
        if rank % 2:
            comm.send(array, rank - 1)
        else:
            array[...] = recv_like(comm, rank + 1, array)


def _chunk(rows, c, p):
    """Chunk c of p: a contiguous range of rows, sizes as in data.shard."""
    start, stop = shard_bounds(len(rows), c, p)
    return rows[start:stop]


def _ring_reduce_scatter(comm, rows, ufunc):
    """p−1 steps around the ring; each step every rank passes one chunk right and adds the one
    arriving from the left. Afterwards rank r holds the fully reduced chunk r."""
    p, r = comm.world_size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        comm.send(_chunk(rows, (r - step - 1) % p, p), right)
        mine = _chunk(rows, (r - step - 2) % p, p)
        ufunc(mine, recv_like(comm, left, mine), out=mine)


def _ring_all_gather(comm, rows):
    """p−1 steps around the ring; each rank forwards the chunk it got last step."""
    p, r = comm.world_size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        comm.send(_chunk(rows, (r - step) % p, p), right)
        target = _chunk(rows, (r - step - 1) % p, p)
        target[...] = recv_like(comm, left, target)


def all_reduce_ring(comm, array, op):
    """Reduce-scatter then all-gather around a ring: each rank sends 2(p−1)/p·n, the minimum."""
    rows = array.reshape(-1, 1)
    _ring_reduce_scatter(comm, rows, UFUNCS[op])
    _ring_all_gather(comm, rows)
    _finish(array, op, comm.world_size)


# ---- gather-like ------------------------------------------------------------------------------
def all_gather_ring(comm, array):
    """Each rank's array, stacked by rank, passed around the ring in p−1 steps."""
    out = np.empty((comm.world_size, *array.shape), dtype=array.dtype)
    out[comm.rank] = array
    _ring_all_gather(comm, out.reshape(comm.world_size, -1))
    return out


def reduce_scatter_ring(comm, array, op):
    """The first half of ring all-reduce: this rank's chunk of rows of the reduced array."""
    work = array.copy()
    rows = work.reshape(len(work), int(np.prod(work.shape[1:])))  # also for zero rows
    _ring_reduce_scatter(comm, rows, UFUNCS[op])
    start, stop = shard_bounds(len(work), comm.rank, comm.world_size)
    mine = work[start:stop].copy()
    _finish(mine, op, comm.world_size)
    return mine


def all_to_all_pairwise(comm, chunks):
    """Pairwise exchange: in round k = 1 … p−1, send chunks[r+k] to rank r+k and receive rank
    r−k's chunk for me (mod p): p−1 messages, Σ_{j≠r} bytes of chunks[j]. Every rank sends
    first, which cannot deadlock: send does not wait for the receiver."""
    p, r = comm.world_size, comm.rank
    out = [None] * p
    out[r] = chunks[r].copy()
    for k in range(1, p):
        comm.send(chunks[(r + k) % p], (r + k) % p)
        out[(r - k) % p] = comm.recv((r - k) % p)
    return out


# ---- what the native paths reuse: the ring's order of arithmetic and its byte counts ---------
def reduce_chunk(comm, buffers, op):
    """A native reduce-scatter's arithmetic, over buffers[s] (rank s's array, readable
    here): my chunk of rows of the op over all of them, in the ring's order, acc = x_{r+1},
    then acc = x_s ∘ acc for s = r+2, …, r (mod p), so both algorithms give the same bits.
    Counted as the ring counts: every chunk but mine out, every chunk but rank r−1's in."""
    p, r = comm.world_size, comm.rank
    lo, hi = shard_bounds(len(buffers[0]), r, p)
    ufunc = UFUNCS[op]
    chunk = buffers[(r + 1) % p][lo:hi].copy()
    for k in range(2, p + 1):
        ufunc(buffers[(r + k) % p][lo:hi], chunk, out=chunk)
    if op == "mean":
        chunk /= p
    comm._count_native(*reduce_scatter_traffic(comm, buffers[0]))
    return chunk


def reduce_scatter_traffic(comm, array):
    """(sent, received): the bytes the ring reduce-scatter of `array` moves at this rank,
    every chunk of rows but mine out, every chunk but rank r−1's in."""
    p, r, rows = comm.world_size, comm.rank, len(array)
    row = array.nbytes // rows if rows else 0
    (lo, hi), (left_lo, left_hi) = (shard_bounds(rows, c, p) for c in (r, (r - 1) % p))
    return (rows - (hi - lo)) * row, (rows - (left_hi - left_lo)) * row


def exchanged_bytes(rank, sent, received):
    """(Σ_{j≠r} bytes of sent[j], Σ_{i≠r} bytes of received[i]): what an all-to-all moves at
    rank r, the count every path of it records (the own chunk never leaves the rank)."""
    return tuple(sum(a.nbytes for i, a in enumerate(arrays) if i != rank)
                 for arrays in (sent, received))


def gather(comm, array, dst):
    """Everyone sends to dst, which stacks the arrays by rank."""
    if comm.rank != dst:
        comm.send(array, dst)
        return None
    out = np.empty((comm.world_size, *array.shape), dtype=array.dtype)
    for src in range(comm.world_size):
        out[src] = array if src == dst else recv_like(comm, src, array)
    return out


def scatter(comm, array, src):
    """src sends row r of its array to rank r."""
    if comm.rank != src:
        return comm.recv(src)
    for dst in range(comm.world_size):
        if dst != src:
            comm.send(np.ascontiguousarray(array[dst]), dst)
    return array[src].copy()


def barrier_dissemination(comm):
    """Dissemination barrier: in round k, tell rank r + 2^k and hear from rank r − 2^k.
    After ⌈lg p⌉ rounds every rank has heard, indirectly, from every other."""
    p, r, token = comm.world_size, comm.rank, np.zeros(0, dtype=np.uint8)
    distance = 1
    while distance < p:
        comm.send(token, (r + distance) % p)
        comm.recv((r - distance) % p)
        distance <<= 1
