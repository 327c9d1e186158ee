"""The package builds into a wheel and an sdist that twine accepts, with the metric scripts (package data), the
console script and the declared dependencies. Installing the wheel in a fresh environment is
scripts/check_package.sh (it downloads torch; too slow for the suite)."""

import configparser
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRIC_SCRIPTS = ("metrics/accuracy/accuracy.py", "metrics/f1/f1.py", "metrics/perplexity/perplexity.py")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason='building the package needs the tests extra: pip install -e ".[tests]"')
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def test_twine_check_passes(dist):
    pytest.importorskip("twine", reason='twine check needs the tests extra: pip install -e ".[tests]"')
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.count("PASSED") == 2, result.stdout + result.stderr


def test_wheel_has_package_data_entry_point_and_dependencies(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta_name).decode()
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(ep_name).decode()
    for script in METRIC_SCRIPTS:
        assert f"hf_drencoder/{script}" in names
    assert {"hf_drencoder/data_checks.py", "hf_drencoder/codec/card.py", "hf_drencoder/codec/loading.py"} <= names
    assert not any(n.startswith(("tests/", "docs/")) for n in names)
    assert "hf-drencoder = hf_drencoder.cli:main" in entry_points
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("scikit-learn") for r in requires) and any(r.startswith("torch") for r in requires)
    for extra in ("flower", "docs", "tensorboard"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "Description-Content-Type: text/markdown" in metadata and "## Install" in metadata


def test_sdist_has_the_metric_scripts_and_the_readme(dist):
    _, sdist = dist
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"README.md", "setup.cfg", "pyproject.toml"} <= names
    for script in METRIC_SCRIPTS:
        assert f"hf_drencoder/{script}" in names


def test_tests_extra_declares_what_the_suite_uses():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    tests = cfg["options.extras_require"]["tests"]
    assert all(name in tests for name in ("build", "twine", "tensorboard"))
    assert "scikit-learn" in cfg["options"]["install_requires"]
