import subprocess
import sys

from minidist import cli


def test_tour_prints_one_table_and_saves_figures(tmp_path, capsys):
    rows = cli.tour(workers=2, backend="thread", steps=60, outdir=str(tmp_path))
    out = capsys.readouterr().out
    assert [r["strategy"] for r in rows] == [name for name, _ in cli.TOUR]
    assert all(r["same as single"].startswith("yes") for r in rows)
    assert all(0.8 < r["test acc"] <= 1.0 for r in rows)
    assert "same as single" in out and "MB sent/worker" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytes_per_strategy.png",
                                                          "loss_curves.png"]


def test_train_command_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "minidist", "train", "--strategy",
                          "data_parallel", "--workers", "2", "--steps", "30"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "data_parallel" in out and "test acc" in out


def test_doctor_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "minidist", "doctor"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for line in ["python", "numpy", "numba", "cpu cores", "cuda gpu", "cuda sim", "mpi"]:
        assert line in out
