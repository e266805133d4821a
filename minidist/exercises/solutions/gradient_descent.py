"""Lesson 1's exercises, solved: what a learner is asked to write, in the plainest form.

    sgd_step   θ ← θ − η∇L, written into the flat buffer in place
    combine    the server's Σ_k (|B_k|/|B|) ∇L_k
"""


def sgd_step(params, grads, lr):
    """In place: the model's layers are views of `params`, so the step must land in it."""
    params -= lr * grads


def combine(grads, sizes):
    """Each worker's mean gradient weighted by its share of the batch, |B_k| / |B|."""
    total = sum(sizes)
    return sum((n_k / total) * g_k for g_k, n_k in zip(grads, sizes, strict=True))
