"""Lesson 6's exercises, solved: what a learner is asked to write, in the plainest form.

    may_pull        SSP's rule: may a worker at this clock read the parameters now?
    server_bytes    the bytes through the busiest server in one BSP step
"""


def may_pull(clock, slowest_clock, staleness):
    """At most s clocks ahead of the slowest worker: c − c_min ≤ s ("≤": s ahead may pull)."""
    return clock - slowest_clock <= staleness


def server_bytes(n_params, itemsize, workers, num_servers):
    """The busiest shard holds ⌈n/k⌉ parameters; each of the W workers pushes its gradient
    slice there and pulls the parameter slice back: 2·W·⌈n/k⌉·itemsize bytes."""
    largest_shard = -(-n_params // num_servers)
    return 2 * workers * largest_shard * itemsize
