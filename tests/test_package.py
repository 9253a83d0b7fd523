"""The distribution: one version, licences and metadata, a self-sufficient sdist.

The build tests need ``build`` and ``setuptools`` (the tox env ``pkg`` has
them) and run offline (``--no-isolation``); elsewhere they skip.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import d_engine_sm

ROOT = Path(__file__).resolve().parent.parent
LICENCES = {"LICENSE-MIT", "LICENSE-APACHE"}
# A quick subset the unpacked sdist must pass: conftest and the helpers,
# hypothesis profiles, a SIGKILL child, the proto sources and generator.
SDIST_TESTS = ["test_handler_core.py", "test_proto.py", "test_kvfile_fuzz.py", "test_logging.py"]


def _installed_dist() -> importlib.metadata.Distribution | None:
    """The installed distribution when it is the copy being tested, else None."""
    try:
        dist = importlib.metadata.distribution("d-engine-sm")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = Path(d_engine_sm.__file__).resolve()
    for file in dist.files or ():
        if file.name == "__init__.py" and Path(str(dist.locate_file(file))).resolve() == init:
            return dist
    return None  # a source tree on PYTHONPATH, or an editable install of another checkout


def test_installed_metadata_version_is_the_package_version() -> None:
    dist = _installed_dist()
    if dist is None:
        pytest.skip("d_engine_sm is imported from a source tree, not an installed wheel")
    assert dist.version == d_engine_sm.__version__
    assert dist.metadata["License-Expression"] == "MIT OR Apache-2.0"


@pytest.mark.skipif(
    not os.environ.get("D_ENGINE_SM_TEST_INSTALLED"), reason="only where tox installs the wheel"
)
def test_tests_and_their_children_import_the_installed_wheel() -> None:
    assert _installed_dist() is not None, d_engine_sm.__file__
    assert Path(d_engine_sm.__file__).resolve().parent != ROOT / "d_engine_sm"
    for argv in (["-c", "import d_engine_sm; print(d_engine_sm.__file__)"],):
        child = subprocess.run(  # the working directory tox gives the tests
            [sys.executable, *argv], capture_output=True, text=True, timeout=30, check=True
        )
        assert Path(child.stdout.strip()).resolve() == Path(d_engine_sm.__file__).resolve()


def _build(tmp_path: Path, *what: str) -> Path:
    for module in ("build", "setuptools"):
        pytest.importorskip(module)
    if not (ROOT / "setup.cfg").is_file():
        pytest.skip("not a source tree")
    out = tmp_path / "dist"
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".tox", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", *what, "--outdir", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_carries_licences_metadata_and_typed_package(tmp_path: Path) -> None:
    (wheel,) = _build(tmp_path, "--wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
        licences = {Path(n).name for n in names if ".dist-info/licenses/" in n}
        assert licences == LICENCES
        for name in LICENCES:
            (path,) = [n for n in names if n.endswith(f"/licenses/{name}")]
            assert zf.read(path) == (ROOT / name).read_bytes()
    assert meta["Version"] == d_engine_sm.__version__
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert set(meta.get_all("License-File") or []) == LICENCES
    classifiers = meta.get_all("Classifier") or []
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert not any(c.startswith("License ::") for c in classifiers)  # the expression says it
    assert "prometheus" in (meta.get_all("Provides-Extra") or [])
    top = {n.split("/")[0] for n in names if not n.startswith("d_engine_sm-")}
    assert top == {"d_engine_sm"}  # no tests/ or benchmarks/ in site-packages
    for needed in ("py.typed", "proto/storage.proto", "proto/storage_pb2.pyi", "prometheus.py"):
        assert f"d_engine_sm/{needed}" in names


def _tracked_files() -> set[str] | None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return set(out.stdout.split())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdist_holds_what_its_tests_need_and_they_pass(tmp_path: Path) -> None:
    (sdist,) = _build(tmp_path, "--sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    (tree,) = (tmp_path / "unpacked").iterdir()
    assert tree.name == f"d_engine_sm-{d_engine_sm.__version__}"
    shipped = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
    for name in [*LICENCES, "README.md", "CHANGELOG.md", "tox.ini", "tests/conftest.py"]:
        assert name in shipped
    tracked = _tracked_files()
    if tracked is not None:  # everything tracked ships, except VCS and CI plumbing
        tracked = {n for n in tracked if not n.startswith(".git") and (ROOT / n).is_file()}
        assert tracked - shipped == set()

    # The unpacked tree's own package, tests and helpers, run from it.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("D_ENGINE_SM_TEST_INSTALLED", None)
    where = subprocess.run(
        [sys.executable, "-c", "import d_engine_sm; print(d_engine_sm.__file__)"],
        cwd=tree / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert Path(where.stdout.strip()).resolve().parent == (tree / "d_engine_sm").resolve()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SDIST_TESTS],
        cwd=tree / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " error" not in run.stdout
