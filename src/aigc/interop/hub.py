"""`aigc pull hf:ORG/NAME[@REVISION]`: download a model from the Hugging Face Hub and import it as a run.

Downloads go through `huggingface_hub` and its cache (`HF_HUB_CACHE`, by default
~/.cache/huggingface/hub), so a second pull, or a pull of a model another tool already fetched,
downloads nothing; `HF_TOKEN` authenticates, `HF_ENDPOINT` names another server (a mirror), and
`HF_HUB_OFFLINE=1` uses the cache only. Those variables are read when `pull_hub` is called (the
library reads some of them once, when it is first imported).

A repository is either a Hugging Face folder (config.json, safetensors, tokenizer.json) of an
architecture `aigc import` reads, or a set of GGUF files, one per quantisation: `file` picks one by
its name or by a quantisation name (`Q4_K_M`, `q8_0`), matched against the file names. The run is
built in a staging folder and renamed into place, so an interrupted pull leaves nothing half-made.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from aigc.artifacts.run import models_home
from aigc.errors import AigcError
from aigc.fsutil import staged_dir
from aigc.interop.hf import model_config_from_hf as gpt2_config_from_hf
from aigc.interop.hf import read_hf_config
from aigc.interop.llama import model_config_from_hf
from aigc.interop.pretrained import DEFAULT_CONTEXT, import_gguf, import_model, is_complete

PREFIX = "hf:"
DEFAULT_ENDPOINT = "https://huggingface.co"
# What a Hugging Face model folder needs for `aigc import` (weights, config, tokenizer, chat template).
FOLDER_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """A connection that fails: huggingface_hub raises its HTTP client's own errors (httpx2 from 1.x,
    httpx before, requests before that), so each one present is caught."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class HubName:
    repo: str  # ORG/NAME
    revision: str | None  # branch, tag or commit; None = the default branch

    @property
    def folder(self) -> str:
        """The folder name under $AIGC_HOME/models."""
        name = "hf--" + self.repo.replace("/", "--")
        return name + (f"@{self.revision}" if self.revision else "")


def parse_hub_name(name: str) -> HubName:
    """`hf:ORG/NAME[@REVISION]` -> HubName, or an AigcError showing the form."""
    if not name.startswith(PREFIX):
        raise AigcError(f"{name!r} is not a Hub name; write hf:ORG/NAME or hf:ORG/NAME@REVISION")
    repo, _, revision = name[len(PREFIX) :].partition("@")
    if not _REPO.fullmatch(repo) or ".." in repo or (revision == "" and "@" in name):
        raise AigcError(f"{name!r} is not a Hub name; write hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return HubName(repo, revision or None)


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _settings() -> dict:
    """Where and how to download, from the environment as it is now. Progress bars are plain tqdm,
    shown on any stderr as aigc's own are (huggingface_hub's own hide on a non-terminal), unless
    HF_HUB_DISABLE_PROGRESS_BARS is set."""
    bars = {} if _true("HF_HUB_DISABLE_PROGRESS_BARS") else {"tqdm_class": tqdm}
    return {
        **bars,
        "endpoint": os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/"),
        "cache_dir": os.environ.get("HF_HUB_CACHE") or None,
        "token": os.environ.get("HF_TOKEN") or None,
        "local_files_only": _true("HF_HUB_OFFLINE"),
    }


def _hub_error(exc: Exception, hub: HubName, what: str, settings: dict) -> AigcError:
    """One line for what went wrong when reaching the Hub."""
    where = settings["endpoint"]
    if isinstance(exc, GatedRepoError):
        return AigcError(f"{hub.repo} is gated on {where}; accept its licence there and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return AigcError(f"{hub.repo} was not found on {where} (or it is private: set HF_TOKEN); check the name")
    if isinstance(exc, RevisionNotFoundError):
        return AigcError(f"{hub.repo} has no revision {hub.revision!r} on {where}; check the branch, tag or commit")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, *TRANSPORT_ERRORS)):
        if settings["local_files_only"]:
            how, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it"
        else:
            how, fix = f"{where} cannot be reached", "connect to the internet (or set HF_ENDPOINT to a mirror)"
        return AigcError(
            f"cannot pull {hub.repo}: {how} and {what} is not in the Hugging Face cache; {fix}, "
            "or import a local copy with `aigc import PATH --out RUN`"
        )
    if isinstance(exc, EntryNotFoundError):  # after the local one, its subclass
        return AigcError(f"{hub.repo} has no file {what} on {where}; check the name (see the repository's files)")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AigcError(f"pulling {hub.repo} from {where} failed: {first_line}")


def _list_files(hub: HubName, settings: dict) -> list[str]:
    api = HfApi(endpoint=settings["endpoint"], token=settings["token"])
    info = api.model_info(hub.repo, revision=hub.revision)
    return [s.rfilename for s in info.siblings or []]


def choose_gguf(files: list[str], wanted: str | None, repo: str) -> str:
    """The one GGUF file of `files` that `wanted` names (a file name, or a quantisation within one)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if not ggufs:
        raise AigcError(f"{repo} holds no .gguf file; pull it without --file to import its safetensors")
    if wanted is None:
        if len(ggufs) == 1:
            return ggufs[0]
        raise AigcError(f"{repo} holds {len(ggufs)} GGUF files; choose one with --file: {', '.join(ggufs)}")
    exact = [f for f in ggufs if f == wanted or f.rsplit("/", 1)[-1] == wanted]
    token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9])", re.IGNORECASE)
    matches = exact or [f for f in ggufs if token.search(f.rsplit("/", 1)[-1])]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)} ({', '.join(matches)})"
        raise AigcError(f"--file {wanted} matches {found} of the GGUF files of {repo}: {', '.join(ggufs)}")
    return matches[0]


def _check_folder(hub: HubName, files: list[str], config_path: Path) -> None:
    """Refuse, before the weights are downloaded, a folder aigc cannot import: no safetensors (pickled
    weights are never fetched), or an architecture it does not reproduce."""
    if not any(f.endswith(".safetensors") for f in files):
        raise AigcError(
            f"{hub.repo} has no .safetensors weights; aigc pulls safetensors only (pickled pytorch_model.bin "
            "files can run code when loaded), or one GGUF file"
        )
    config = read_hf_config(config_path.parent)
    if config.get("model_type") == "gpt2":
        gpt2_config_from_hf(config, Path(hub.repo))
    else:
        model_config_from_hf(config)


def _download(hub: HubName, file: str | None, settings: dict) -> Path:
    """The local path of the chosen GGUF file, or of the model folder (a snapshot in the cache)."""
    common = dict(revision=hub.revision, **settings)
    what = "the model"
    try:
        if file is not None and file.lower().endswith(".gguf"):
            what = file
            return Path(hf_hub_download(hub.repo, file, **common))
        files = None if settings["local_files_only"] else _list_files(hub, settings)
        if file is not None or (files is not None and "config.json" not in files):
            if files is None:
                raise LocalEntryNotFoundError("choosing a GGUF file by quantisation name needs the file list")
            what = choose_gguf(files, file, hub.repo)
            return Path(hf_hub_download(hub.repo, what, **common))
        if files is not None:
            _check_folder(hub, files, Path(hf_hub_download(hub.repo, "config.json", **common)))
        return Path(snapshot_download(hub.repo, allow_patterns=FOLDER_FILES, **common))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, *TRANSPORT_ERRORS) as exc:
        raise _hub_error(exc, hub, what, settings) from exc


def pull_hub(
    name: str,
    *,
    file: str | None = None,
    home: Path | None = None,
    context: int = DEFAULT_CONTEXT,
    overwrite: bool = False,
) -> Path:
    """Download `hf:ORG/NAME[@REVISION]` (one GGUF `file` of it, if given) and import it into
    `home/<folder>` once; returns the run folder."""
    hub = parse_hub_name(name)
    settings = _settings()
    folder = hub.folder + (f"--{Path(file).stem}" if file else "")
    out = (home or models_home()) / folder
    if is_complete(out) and not overwrite:
        return out
    source = _download(hub, file, settings)
    with staged_dir(out) as staging:
        if source.is_file():
            # Blocks stay quantised, as `aigc import FILE.gguf` keeps them (fp32 files become fp32 runs)
            import_gguf(source, staging, context=context, overwrite=True, dequantize=False)
        else:
            import_model(source, staging, context=context, overwrite=True)
    return out
