"""Losses: mean squared error and softmax cross-entropy (over classes, or over every position of
a sequence: logits (..., k) with integer targets (...))."""

import numpy as np

from minidist import kernels


class MSELoss:
    """L = (1/2N) Σ_n ‖ŷ_n − y_n‖².   ∂L/∂ŷ = (ŷ − y)/N.   y may be (N,) when ŷ is (N, 1)."""

    def __repr__(self):
        return "MSELoss()"

    def forward(self, pred, target):
        target = np.asarray(target)
        if target.ndim == 1 and pred.shape[1] == 1:
            target = target[:, None]
        if target.shape != pred.shape:
            raise ValueError(f"{self}: prediction has shape {pred.shape}, target {target.shape}")
        K = kernels.ops_for(pred)
        loss, self.residual = K.mse(pred, target.astype(pred.dtype, copy=False))
        return loss

    def backward(self):
        return kernels.ops_for(self.residual).mse_backward(self.residual)

    def predict(self, out):
        return out[:, 0] if out.shape[1] == 1 else out


class SoftmaxCrossEntropy:
    """L = (1/N) Σ_n −log softmax(z_n)[y_n], computed with a stable log-sum-exp.

    ∂L/∂z_n = (softmax(z_n) − onehot(y_n)) / N. Logits (N, T, k) with targets (N, T): the mean
    over all N·T positions (a language model's loss), the same formula on N·T rows.
    """

    def __repr__(self):
        return "SoftmaxCrossEntropy()"

    def forward(self, logits, labels):
        labels = np.asarray(labels)
        *lead, k = logits.shape
        if labels.shape != tuple(lead) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self} expects integer labels of shape {tuple(lead)}, got "
                             f"{labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{self}: labels must lie in [0, {k}), got [{labels.min()}, "
                             f"{labels.max()}]")
        self.shape = logits.shape
        if logits.ndim != 2:
            logits, labels = logits.reshape(-1, k), labels.reshape(-1)
        K = kernels.ops_for(logits)
        if kernels.is_device_array(logits):
            labels = K.to_device(labels, np.int64)  # over once, for forward and backward
        self.labels = labels
        loss, self.probs = K.softmax_cross_entropy(logits, labels)
        return loss

    def backward(self):
        K = kernels.ops_for(self.probs)
        return K.softmax_cross_entropy_backward(self.probs, self.labels).reshape(self.shape)

    def predict(self, logits):
        return logits.argmax(axis=-1)
