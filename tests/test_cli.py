import subprocess
import sys

from minidist import cli


def test_demo_prints_a_table(capsys):
    rows = cli.demo(steps=200)
    out = capsys.readouterr().out
    assert "test acc" in out and "logistic regression" in out and len(rows) == 3
    assert all(0.85 < row[4] <= 1.0 for row in rows)  # test accuracy after 200 steps


def test_doctor_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "minidist", "doctor"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for line in ["python", "numpy", "numba", "cpu cores", "cuda gpu", "cuda sim", "mpi"]:
        assert line in out
