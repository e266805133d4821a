"""Reference solutions of the lessons' exercises, for instructors: the lessons leave them out,
so that a learner writes their own first. Each is tested against its checker
(tests/test_parallel_transformer_exercises.py,
tests/test_long_context_exercises.py).

    parallel_transformers (12): the head split of attention, the interleaved schedule's order
    long_context (13): the online-softmax combine of ring attention, the dispatch of tokens to
        their experts' ranks
"""
