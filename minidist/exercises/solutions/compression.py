"""Lesson 8's exercises, solved: what a learner is asked to write, in the plainest form.

    topk_feedback   top-k compression with error feedback: what a rank sends, what it keeps
    qsgd_codes      QSGD's integer codes of a vector (the formula exercise)
"""

import numpy as np


def topk_feedback(grad, residual, k):
    """c = grad + residual (what this rank owes the others); send the k entries of largest
    |c_i| (zeros elsewhere) and keep the rest, c − sent, for the next step."""
    corrected = grad + residual
    sent = np.zeros_like(corrected)
    top = np.argsort(-np.abs(corrected))[:k]
    sent[top] = corrected[top]
    return sent, corrected - sent


def qsgd_codes(v, levels, u):
    """q_i = sign(v_i)·⌊s·|v_i|/‖v‖₂ + u_i⌋ with s = levels and u_i ~ U[0, 1): x rounds up with
    probability equal to its fractional part, so the codes are unbiased; all 0 for v = 0."""
    norm = np.linalg.norm(v)
    if norm == 0:
        return np.zeros_like(v)
    return np.sign(v) * np.floor(levels * np.abs(v) / norm + u)
