"""The library API: README's functions importable from the packages, lazily; the wheel ships its data files."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("pyarrow", "numpy", "torch", "vllm", "transformers", "polars", "datasets", "matplotlib", "rich")


def test_importing_the_packages_loads_nothing_heavy():
    code = ("import sys, curate, curate.filters, curate.judges, curate.generators; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]", out.stdout


def test_every_readme_filter_function_imports_from_curate_filters():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Filters as library functions", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    names = re.findall(r"=\s*(\w+)\(frame", block)
    assert {"ches_scores", "donod_select", "near_duplicates", "pref_conf"} <= set(names)
    import curate.filters

    for name in names:
        func = getattr(curate.filters, name)
        assert callable(func) and func.__module__.startswith("curate.filters."), name
        assert name in curate.filters.__all__


@pytest.mark.parametrize("package", ["curate.filters", "curate.judges", "curate.generators"])
def test_every_exported_name_resolves_to_its_module(package):
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        home = module._EXPORTS[name]  # a submodule, or an absolute module for a name that lives elsewhere
        expected = home if home.startswith("curate.") else f"{package}.{home}"
        assert value.__module__ == expected, (name, value.__module__)
        assert name in dir(module)
    with pytest.raises(AttributeError, match=f"{package}.*no_such_name"):
        getattr(module, "no_such_name")


def test_judge_functions_from_the_package():
    from curate.judges import density_ratio, load_template, parse_pair_scores, parse_score

    assert parse_score("so 3 points. Score: 4") == 4.0
    assert parse_pair_scores("Score of the Assistant 1: 7\nScore of the Assistant 2: 3") == (7.0, 3.0)
    assert density_ratio([-1.0, -2.0], [-2.0, -2.5]) == pytest.approx(1.5)
    assert "{" in load_template("self_reward").text


def test_wheel_ships_templates_and_builds_without_setuptools_warnings(tmp_path):
    """A plain wheel build: no setuptools warning, the templates as package data, no top-level method packages.

    Built from a copy of the sources, so that the build folders never land in the repo.
    """
    import shutil

    src = tmp_path / "src"
    for name in ("curate", "filters", "judges", "generators"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                           str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    backend = [line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" in line]
    assert backend == [], "\n".join(backend)
    (wheel,) = tmp_path.glob("curate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("curate/templates/dataset_card.md", "curate/judges/templates/self_reward.txt",
                 "curate/judges/templates/cdr_customization.yaml", "curate/backends/vllm_engine.py",
                 "curate/filters/ches.py", "curate/py.typed"):
        assert path in names, path
    assert not any(n.split("/")[0] in ("filters", "judges", "generators") for n in names)
