"""Checkers for the lessons' exercises: a clear pass, or a message that helps fix the answer.

Each checker runs the learner's function on several random problems against an independent
reference (finite differences, the full-batch computation, numpy) and returns a `Check`, which
prints as ✔ or ✘ with the reason, and is truthy when passed. One module per lesson:

    gradient_descent (1) · gpu_kernels (2) · collectives (3) · distributed_gd (4) ·
    data_parallel (5) · parameter_server (6) · model_parallel (7) · compression (8) · planning (9) ·
    transformers (10) · sharding (11) · parallel_transformers (12) · long_context (13)

Lessons 1–11 show worked solutions at their end; from lesson 12 on, the reference solutions
live in `minidist.exercises.solutions`, for instructors, and not on the lesson's page.
"""

from minidist.exercises._common import Check
from minidist.exercises.collectives import check_ring_all_reduce
from minidist.exercises.compression import check_qsgd_codes, check_topk_error_feedback
from minidist.exercises.data_parallel import check_bucket_slices, check_shard_weights
from minidist.exercises.distributed_gd import check_server_step
from minidist.exercises.gpu_kernels import check_matmul_traffic, check_sgd_kernel
from minidist.exercises.gradient_descent import (
                                                 check_combine,
                                                 check_gd_step,
                                                 check_gradient,
                                                 half_mse,
)
from minidist.exercises.long_context import check_expert_dispatch, check_softmax_combine
from minidist.exercises.model_parallel import (
                                                 check_bubble_fraction,
                                                 check_row_parallel_backward,
                                                 check_tensor_parallel_params,
)
from minidist.exercises.parallel_transformers import check_attention_take, check_interleaved_ops
from minidist.exercises.parameter_server import check_server_traffic, check_ssp_rule
from minidist.exercises.planning import check_model_states, check_pipeline_compute
from minidist.exercises.sharding import check_bucket_hooks, check_zero1_step
from minidist.exercises.transformers import check_causal_attention, check_layernorm_backward

__all__ = [
    "Check", "half_mse", "check_gradient", "check_gd_step", "check_combine", "check_sgd_kernel",
    "check_matmul_traffic", "check_ring_all_reduce", "check_server_step", "check_shard_weights",
    "check_bucket_slices", "check_ssp_rule", "check_server_traffic", "check_row_parallel_backward",
    "check_bubble_fraction", "check_tensor_parallel_params", "check_topk_error_feedback",
    "check_qsgd_codes", "check_model_states", "check_pipeline_compute",
    "check_causal_attention", "check_layernorm_backward", "check_zero1_step",
    "check_bucket_hooks", "check_attention_take", "check_interleaved_ops",
    "check_softmax_combine", "check_expert_dispatch",
]
