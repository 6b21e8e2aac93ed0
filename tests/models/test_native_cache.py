"""The compiled-kernel cache under $AIGC_HOME/kernels: a damaged library is built again before anything
loads it, a build for another CPU or compiler is never loaded, and a missing kernel is said once."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from aigc.fsutil import file_digest
from aigc.models import native
from aigc.models.native import KernelUnavailable

COMPILER = os.environ.get("CC") or "cc"
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None, reason=f"no C compiler {COMPILER!r}")
NOTICE = "native CPU kernels unavailable"


@pytest.fixture
def fresh_kernels():
    """`native.kernels()` asked anew inside the test, and forgotten after it."""
    native.kernels.cache_clear()
    yield
    native.kernels.cache_clear()


def damage(path, how):
    """Damage a file in place, as a full disk, a crash mid-copy or a failing drive would."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "zeroed":
        data = bytearray(len(data))
    else:  # one bit flipped in the middle (the code section of a small library)
        data[len(data) // 2] ^= 0x10
    with open(path, "r+b") as f:  # in place: same inode, as the damage would be
        f.truncate(0)
        f.write(data)


def recorded_digest(library):
    return json.loads(library.with_name(library.name + ".json").read_text())["blake2b"]


@needs_compiler
@pytest.mark.parametrize("how", ["truncated", "zeroed", "bit-flipped"])
def test_a_damaged_cached_library_is_built_again_before_it_is_loaded(tmp_path, how):
    library = native.cached_library(tmp_path, COMPILER)
    built = library.read_bytes()
    assert recorded_digest(library) == file_digest(library)
    damage(library, how)
    assert library.read_bytes() != built
    assert native.cached_library(tmp_path, COMPILER) == library
    assert recorded_digest(library) == file_digest(library)  # a fresh build and its fresh record
    assert len(library.read_bytes()) > len(built) // 2


@needs_compiler
def test_a_library_without_its_record_is_built_again(tmp_path, monkeypatch):
    library = native.cached_library(tmp_path, COMPILER)
    library.with_name(library.name + ".json").unlink()  # a crash between the library and its record
    compiled = []
    right = native._compile
    monkeypatch.setattr(native, "_compile", lambda *args: compiled.append(1) or right(*args))
    assert native.cached_library(tmp_path, COMPILER) == library and compiled == [1]


@needs_compiler
@pytest.mark.slow
def test_generation_after_the_cache_was_damaged_gives_the_same_logits(tmp_path):
    """In a fresh process, as a user's next `aigc generate` would: loading the damaged library itself would
    kill the process (SIGBUS, SIGSEGV, SIGILL), so this runs outside pytest's."""
    damages = ("truncated", "zeroed", "bit-flipped")
    homes = [str(tmp_path / how) for how in damages]
    # Built and loaded in another process too: this one must not map a library it then damages.
    build = "import sys; from pathlib import Path; from aigc.models import native\n"
    build += "for home in sys.argv[2:]: native.build(Path(home) / 'kernels', sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, COMPILER, *homes], check=True, timeout=300)
    for how in damages:
        (library,) = (tmp_path / how / "kernels").glob("native-*.so")
        damage(library, how)
    script = textwrap.dedent(
        """
        import os, sys, torch
        from aigc.config import model_preset
        from aigc.models import build_model, native

        def logits(model, idx):  # a 4-token prefill, then one-row decode steps
            with torch.no_grad():
                cache = model.new_cache(1)
                out = [model(idx[:, :4], cache=cache)[0]]
                out += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, idx.shape[1])]
            return out

        torch.manual_seed(0)
        model = build_model(model_preset("llama-tiny", vocab_size=50)).eval()
        idx = torch.randint(0, 50, (1, 8))
        native.kernels = lambda: None
        reference = logits(model, idx)
        for home in sys.argv[1:]:
            os.environ["AIGC_HOME"] = home
            built = native.build(native.aigc_home() / "kernels", os.environ.get("CC") or "cc")
            native.kernels = lambda: built
            for ours, expected in zip(logits(model, idx), reference):
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
        print("same logits")
        """
    )
    done = subprocess.run([sys.executable, "-c", script, *homes], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same logits"


@needs_compiler
def test_a_build_for_another_cpu_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "cpu_identity", lambda: "x86_64\nmodel name: CPU A\nflags: avx512f")
    for_a = native.cached_library(tmp_path / "a", COMPILER)
    monkeypatch.setattr(native, "cpu_identity", lambda: "x86_64\nmodel name: CPU B\nflags: avx2")
    for_b = native.cached_library(tmp_path / "a", COMPILER)
    assert for_b != for_a  # another name in the same folder
    # A's build and record under B's name (a home folder copied between machines): built again for B.
    shutil.copyfile(for_a, for_b)
    shutil.copyfile(for_a.with_name(for_a.name + ".json"), for_b.with_name(for_b.name + ".json"))
    compiled = []
    right = native._compile
    monkeypatch.setattr(native, "_compile", lambda *args: compiled.append(1) or right(*args))
    assert native.cached_library(tmp_path / "a", COMPILER) == for_b and compiled == [1]
    assert "CPU B" in json.loads(for_b.with_name(for_b.name + ".json").read_text())["built_for"]


@needs_compiler
def test_another_compiler_version_gets_its_own_build(tmp_path, monkeypatch):
    first = native.cached_library(tmp_path, COMPILER)
    monkeypatch.setattr(native, "compiler_version", lambda path: "cc (an upgrade) 99.1")
    assert native.cached_library(tmp_path, COMPILER) != first


def test_a_missing_source_falls_back_with_one_notice(tmp_path, monkeypatch, caplog, fresh_kernels):
    monkeypatch.setattr(native, "SOURCE", tmp_path / "native.c")  # what a wheel without native.c had
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    with pytest.raises(KernelUnavailable, match="cannot read the kernels' source .*native.c"):
        native.build(tmp_path, COMPILER)
    with caplog.at_level(logging.WARNING, logger="aigc.models.native"):
        assert [native.kernels() for _ in range(3)] == [None, None, None]
    notices = [record.getMessage() for record in caplog.records if NOTICE in record.getMessage()]
    assert len(notices) == 1 and "native.c: No such file or directory" in notices[0]


def test_an_unexpected_failure_falls_back_too(tmp_path, monkeypatch, caplog, fresh_kernels):
    def broken(*args):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(native, "build", broken)
    with caplog.at_level(logging.WARNING, logger="aigc.models.native"):
        assert native.kernels() is None
    assert "RuntimeError: something nobody foresaw" in native.unavailable_reason()
    assert [NOTICE in record.getMessage() for record in caplog.records] == [True]


def test_turning_them_off_says_nothing(monkeypatch, caplog, fresh_kernels):
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.WARNING, logger="aigc.models.native"):
        assert native.kernels() is None
    assert caplog.records == []


def test_the_cli_says_once_on_one_line_why_the_kernels_are_unavailable(make_run, tmp_path):
    run_dir = make_run()
    argv = [sys.executable, "-m", "aigc", "generate", str(run_dir), "--prompt", "a film", "--max-new-tokens", "6"]
    argv += ["--num-samples", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CC": "no-such-cc", "AIGC_HOME": str(tmp_path / "home")}
    env.pop("AIGC_NATIVE_KERNELS", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if NOTICE in line]
    assert notices == [
        "aigc: native CPU kernels unavailable (no C compiler 'no-such-cc' on PATH (set CC to one)); "
        "using PyTorch's kernels instead"
    ]
    assert "Traceback" not in done.stderr
