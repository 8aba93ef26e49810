"""The Hugging Face hub on the user's terms: the one place that turns a hub id into a local folder.

It reads the user's own environment when it is called, and sets none of it: HF_HOME / HF_HUB_CACHE (where the
cache is), HF_HUB_OFFLINE (look in the cache only, never download), HF_TOKEN (private and gated repos; read by
huggingface_hub itself), HF_ENDPOINT (a mirror). The driver resolves an id once and hands every role the local
snapshot folder, so the roles never need the hub (docs/design.md).

Ids are `org/name`, optionally `@revision` (a branch, tag or commit) for models. A snapshot folder in the cache is
`<cache>/models--org--name/snapshots/<commit>/`; `refs/<branch>` holds the commit a branch pointed to when it was
downloaded, which is how an offline lookup of `org/name` (branch main) finds it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Hub repo names: letters, digits, '-', '_', '.'; the hub itself refuses '--' and '..' (used by the cache layout).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_SNAPSHOT = re.compile(
    r"(?:^|/)(?P<kind>models|datasets)--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$"
)
# Files a transformers/vLLM load never reads: other frameworks' weights and exports, the original checkpoints.
MODEL_IGNORE_PATTERNS = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.mlmodel",
                         "original/*", "onnx/*", "openvino/*", "coreml/*"]


class HubError(FileNotFoundError):
    """A hub id that could not become a local folder; the message names the id, the cache and the fix."""


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name[@revision]`; None when `text` is not shaped like a hub id."""
    match = _REPO_ID.match(text)
    if not match or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the user set it now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache the user's environment names now: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    return _hf_home() / "hub"


def datasets_cache_dir() -> Path:
    """Where `datasets` keeps its arrow files: HF_DATASETS_CACHE, else HF_HOME/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return _hf_home() / "datasets"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"


def snapshot(repo_id: str, *, revision: str | None = None, repo_type: str = "model", field: str,
             ignore_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of a hub repo: from the cache, or downloaded into it unless HF_HUB_OFFLINE is set.

    `field` (e.g. "model.name") starts every error message, which also names the id, the cache and the fix.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    named = f"{field} = {repo_id + (f'@{revision}' if revision else '')!r}"
    download = (f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}"
                f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`")
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                   local_files_only=offline, ignore_patterns=ignore_patterns)
    except GatedRepoError as exc:
        raise HubError(f"{named}: the {repo_type} is gated: accept its terms on huggingface.co/{repo_id} and set "
                       "HF_TOKEN (or run `hf auth login`)") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{named}: no such {repo_type} on the hub (or it is private: set HF_TOKEN); check the id, "
                       "or give a local folder") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{named}: the hub has no revision {revision!r} of {repo_id}; give a branch, tag or commit "
                       "that exists") from exc
    except HFValidationError as exc:
        raise HubError(f"{named}: not a valid hub id ({exc}); write org/name[@revision], or give a local "
                       "folder") from exc
    except (LocalEntryNotFoundError, OSError) as exc:  # IncompleteSnapshotError and connection errors included
        if offline:
            raise HubError(
                f"{named}: not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set, so nothing is "
                f"downloaded. Fix: download it once where the hub is reachable, into the same cache (HF_HOME), e.g. "
                f"{download}; or unset HF_HUB_OFFLINE; or give a local folder"
            ) from exc
        raise HubError(
            f"{named}: could not download it into {cache} ({type(exc).__name__}: {exc}); check the network (or "
            "HF_ENDPOINT for a mirror) and HF_TOKEN, or download it where the hub is reachable with "
            f"{download} and copy the cache, or give a local folder"
        ) from exc
    return Path(folder)


def local_snapshot(path: str, field: str = "model.name") -> Path:
    """`path` on this node: itself when it exists here. A hub snapshot folder that another node resolved
    (`.../models--org--name/snapshots/<commit>`) and that this node lacks is resolved again, by id and commit,
    through this node's own HF cache and environment, so every node of a cluster loads the same revision."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    match = _SNAPSHOT.search(str(folder))
    if not match:
        raise HubError(f"{field}: {path} does not exist on this node, and it is not a Hugging Face cache snapshot "
                       "that could be fetched here; put the folder on every node (a shared filesystem), or use a "
                       "hub id")
    is_model = match["kind"] == "models"
    return snapshot(f"{match['org']}/{match['name']}", revision=match["commit"], field=field,
                    repo_type="model" if is_model else "dataset",
                    ignore_patterns=MODEL_IGNORE_PATTERNS if is_model else None)
