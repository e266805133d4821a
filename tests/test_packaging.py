"""The install routes agree: pyproject.toml, environment.yml, the Makefile and the README."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {}  # pip name -> conda-forge name, where they differ


def _name(requirement):
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        else:
            conda.add(_name(dep))
    conda -= {"python", "pip"}
    assert "conda-forge" in env["channels"]
    assert any(r.startswith("-e .") for d in env["dependencies"] if isinstance(d, dict)
               for r in d["pip"])
    assert {CONDA_NAMES.get(n, n) for n in wanted} == conda | pip
    assert not conda & pip


def test_readme_and_ci_use_the_make_targets():
    readme = (ROOT / "README.md").read_text()
    for command in ["make lab", "make demo", "make test", "environment.yml", "minidist[mpi]"]:
        assert command in readme, command
    makefile = (ROOT / "Makefile").read_text()
    for target in ["lab:", "demo:", "test:"]:
        assert re.search(rf"^{target}", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
