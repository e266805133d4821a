"""Reference solutions of the lessons' exercises, for instructors: the lessons leave them out,
so that a learner writes their own first. One module per lesson, named as the lesson's checker
module; each exercise of `minidist.exercises.catalog` names its solution here, and
`python -m minidist check LESSON` grades them. The tests check each against its checker,
together with two typical wrong attempts (tests/test_*_exercises.py).

The checkers never import this package: a course may delete it from the learners' install.
"""
