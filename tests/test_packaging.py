"""The wheel holds every file the package reads from its own folder. The test suite runs on an editable
install, which reads them from the source tree and so cannot notice one the wheel lacks."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import aigc
from aigc.models import native
from aigc.serve import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "aigc"
pytestmark = pytest.mark.skipif(
    Path(aigc.__file__).resolve().parent != PACKAGE, reason="aigc is not imported from this source tree"
)


def data_files() -> set[str]:
    """The package's files that are not Python source, as paths inside the wheel."""
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".py", ".pyc")
    }


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    work = tmp_path_factory.mktemp("wheel")
    # A clean copy: setuptools would otherwise reuse a stale build/ folder or an egg-info's file list.
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, work / name)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(work / "dist"), str(work)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("aigc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@pytest.mark.slow
def test_the_wheel_holds_every_data_file_of_the_package(wheel_names):
    assert data_files()  # native.c and the playground at least
    assert data_files() - wheel_names == set()


@pytest.mark.slow
def test_the_wheel_holds_the_files_the_code_opens_beside_itself(wheel_names):
    opened = [native.SOURCE, *(path for path in app.STATIC.iterdir() if path.is_file())]
    assert native.SOURCE.exists()
    for path in opened:
        assert path.resolve().relative_to(PACKAGE.parent).as_posix() in wheel_names
