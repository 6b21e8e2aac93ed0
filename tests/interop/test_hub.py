"""`aigc pull hf:ORG/NAME` against a local stand-in for the Hub (fake_hub.py): downloads, progress,
the huggingface_hub cache, offline use, tokens, and what a missing repository, revision or file says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub

from aigc.artifacts.run import WEIGHTS
from aigc.cli import main
from aigc.interop.gguf_export import export_gguf
from aigc.interop.hf import export_hf
from aigc.interop.hub import HubName, choose_gguf, parse_hub_name
from aigc.models import load_run

LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, n_head=4, n_kv_head=2)
IDX = torch.tensor([[0, 5, 17, 42, 99, 7, 3]])  # (1, T)


@pytest.fixture
def hub(make_run, tmp_path, monkeypatch):
    """A running stand-in Hub with tiny/gpt2 (a safetensors folder) and tiny/gguf (two GGUF files),
    and an environment that points huggingface_hub and aigc at temporary folders."""
    fake = FakeHub()
    gpt2 = load_run(make_run("gpt", name="gpt2", seed=1))
    fake.add_folder("tiny/gpt2", export_hf(gpt2, tmp_path / "gpt2-hf"))
    llama = load_run(make_run("gpt", name="llama", seed=2, **LLAMA))
    files = tmp_path / "gguf-repo"
    for quant in ("f32", "q8_0"):
        out = export_gguf(llama, tmp_path / f"gguf-{quant}", quant=quant)
        files.mkdir(exist_ok=True)
        shutil.copy(out / f"model-{quant}.gguf", files / f"tiny-{quant.upper()}.gguf")
    (files / "README.md").write_text("tiny")
    fake.add_folder("tiny/gguf", files)
    shutil.copytree(tmp_path / "gpt2-hf", tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    fake.add_folder("tiny/pickled", tmp_path / "pickled")
    shutil.copytree(tmp_path / "gpt2-hf", tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    fake.add_folder("tiny/other", tmp_path / "other")
    url = fake.start()
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "aigc-home"))
    fake.runs = {"gpt2": gpt2, "llama": llama}
    yield fake
    fake.stop()


def pulled(capsys, *args) -> tuple[int, Path | None, str]:
    code = main(["pull", *args])
    out, err = capsys.readouterr()
    path = Path(out.strip().splitlines()[-1]) if code == 0 else None
    return code, path, err


def one_error(err: str) -> str:
    """The one error line of `err` (progress bars may come before it); no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def same_logits(run_dir, original) -> bool:
    with torch.no_grad():
        ours, theirs = load_run(run_dir).model(IDX)[0], original.model(IDX)[0]
    return (ours[..., : theirs.shape[-1]] - theirs).abs().max().item() < 1e-4


def test_pull_a_safetensors_repository(hub, capsys):
    code, path, err = pulled(capsys, "hf:tiny/gpt2")
    assert code == 0, err
    assert path.parent.name == "models" and path.name == "hf--tiny--gpt2"
    assert same_logits(path, hub.runs["gpt2"])
    assert "100%" in err  # huggingface_hub's progress bars
    assert hub.downloads("model.safetensors") == 1 and hub.downloads("README.md") == 0  # only what import reads


def test_pull_reuses_the_hub_cache_and_works_offline_from_it(hub, capsys, monkeypatch):
    assert pulled(capsys, "hf:tiny/gpt2")[0] == 0
    assert pulled(capsys, "hf:tiny/gpt2", "--overwrite")[0] == 0  # import again: the bytes come from the cache
    assert hub.downloads("model.safetensors") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    code, path, err = pulled(capsys, "hf:tiny/gpt2", "--overwrite")
    assert code == 0, err
    assert len(hub.requests) == before and same_logits(path, hub.runs["gpt2"])


def test_pull_offline_without_the_model_in_the_cache_says_so(hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = pulled(capsys, "hf:tiny/gpt2")
    assert code == 2
    expected = "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache; unset HF_HUB_OFFLINE"
    assert expected in one_error(err)
    assert hub.requests == []


def test_pull_from_an_unreachable_hub_says_so(hub, capsys, monkeypatch):
    hub.stop()  # the endpoint now refuses connections
    code, _, err = pulled(capsys, "hf:tiny/gpt2")
    assert code == 2 and "cannot be reached" in one_error(err)


@pytest.mark.parametrize(
    "args,message",
    [
        (["hf:tiny/nothing"], "tiny/nothing was not found on http://127.0.0.1:"),
        (["hf:tiny/gpt2@v9"], "tiny/gpt2 has no revision 'v9'"),
        (["hf:tiny/gguf", "--file", "tiny-Q2_K.gguf"], "tiny/gguf has no file tiny-Q2_K.gguf"),
        (["hf:tiny/gguf", "--file", "q4_0"], "--file q4_0 matches none of the GGUF files of tiny/gguf"),
        (["hf:tiny/gguf"], "tiny/gguf holds 2 GGUF files; choose one with --file: tiny-F32.gguf, tiny-Q8_0.gguf"),
        (["hf:tiny"], "'hf:tiny' is not a Hub name; write hf:ORG/NAME"),
        (["hf:tiny/pickled"], "tiny/pickled has no .safetensors weights; aigc pulls safetensors only"),
        (["hf:tiny/other"], "unsupported architecture MambaForCausalLM"),
    ],
)
def test_pull_names_what_is_missing(hub, capsys, tmp_path, args, message):
    code, _, err = pulled(capsys, *args)
    assert code == 2 and message in one_error(err)
    assert hub.downloads("pytorch_model.bin") == hub.downloads("model.safetensors") == 0  # refused first
    models = tmp_path / "aigc-home" / "models"
    assert not models.exists() or not any(models.iterdir())  # no run, not even a partial one


def test_pull_one_gguf_file_by_quantisation_name(hub, capsys):
    code, path, err = pulled(capsys, "hf:tiny/gguf", "--file", "q8_0", "--context", "64")
    assert code == 0, err
    assert path.name == "hf--tiny--gguf--q8_0" and (path / WEIGHTS).is_file()
    assert "tiny-Q8_0.gguf: 100%" in err  # the download's progress bar, also when stderr is no terminal
    assert hub.downloads("tiny-Q8_0.gguf") == 1 and hub.downloads("tiny-F32.gguf") == 0
    code, path, err = pulled(capsys, "hf:tiny/gguf", "--file", "tiny-F32.gguf", "--context", "64")
    assert code == 0, err
    assert same_logits(path, hub.runs["llama"])


def test_pull_at_a_revision_and_with_a_token(hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    commit = hub.repos["tiny/gpt2"].commit
    code, path, err = pulled(capsys, f"hf:tiny/gpt2@{commit}")
    assert code == 0, err
    assert path.name == f"hf--tiny--gpt2@{commit}"
    assert hub.requests and all(auth == "Bearer hf_test_token" for _, _, auth in hub.requests)


def test_parse_hub_name_and_choose_gguf():
    assert parse_hub_name("hf:Org/Model-1.5B@main") == HubName("Org/Model-1.5B", "main")
    for bad in ("Org/Model", "hf:Org", "hf:Org/Model@", "hf:../x", "hf:a/b/c"):
        with pytest.raises(Exception, match="not a Hub name"):
            parse_hub_name(bad)
    files = ["m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "README.md"]
    assert choose_gguf(files, "q4_k_m", "r") == "m-Q4_K_M.gguf"
    assert choose_gguf(files, "Q8_0", "r") == "m-Q8_0.gguf"
    with pytest.raises(Exception, match="matches 2"):
        choose_gguf(files, "Q4_K", "r")
