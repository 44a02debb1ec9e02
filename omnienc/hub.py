"""Encoder checkpoints on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REVISION]``.

Wherever omnienc takes a checkpoint folder (:func:`omnienc.load_encoder` and so every command
with a ``CKPT`` argument) it also takes a Hub id, as timm and open_clip write them::

    omnienc embed hf-hub:my-lab/omnienc-ct@v1.0 scans/ -o feats.npz
    encoder, preprocessing = omnienc.load_encoder("hf-hub:my-lab/omnienc-ct")

:func:`resolve_checkpoint` turns the id into a local folder with
``huggingface_hub.snapshot_download`` (only the files a checkpoint folder holds), which then
loads exactly like a folder written by :func:`omnienc.save_encoder`. ``REVISION`` is a branch,
tag or commit (default ``main``). The Hub's cache is used as huggingface_hub uses it:
``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when the id is
resolved (not when omnienc is imported); with ``HF_HUB_OFFLINE=1`` nothing is downloaded and the
id must already be in the cache. Every failure is a :class:`~omnienc.errors.CheckpointError`
naming the id and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omnienc.errors import CheckpointError

HUB_PREFIX = "hf-hub:"
DEFAULT_REVISION = "main"
# What snapshot_download fetches: the files of a checkpoint folder and its model card.
CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "README.md"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(spec: object) -> bool:
    """Whether ``spec`` (a string or path) is written ``hf-hub:...``."""
    return str(spec).startswith(HUB_PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str]:
    """Split ``hf-hub:ORG/NAME[@REVISION]`` into ``(ORG/NAME, REVISION)``.

    Raises:
        CheckpointError: ``spec`` is not of that form.
    """
    body = str(spec)[len(HUB_PREFIX) :]
    repo_id, at, revision = body.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not _REVISION.fullmatch(revision)):
        raise CheckpointError(
            spec,
            "is not a Hugging Face Hub id; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION "
            "(a branch, tag or commit), e.g. hf-hub:my-lab/omnienc-ct@v1.0",
        )
    return repo_id, revision if at else DEFAULT_REVISION


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _cached_revisions(cache: Path, repo_id: str) -> list[str]:
    """The refs (``main``, tags) and snapshot commits of ``repo_id`` in the cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    refs = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file())
    commits = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    return refs + [c[:12] for c in commits]


def resolve_checkpoint(spec: str | Path) -> Path:
    """The local checkpoint folder of ``spec``: a Hub id is downloaded (or found in the cache).

    Args:
        spec: A folder, or ``hf-hub:ORG/NAME[@REVISION]``.

    Returns:
        ``Path(spec)`` for anything else; for a Hub id, the cached snapshot folder.

    Raises:
        CheckpointError: The id is malformed, the repository or revision does not exist (or is
            not in the cache when offline), the download fails, or the repository holds no
            ``config.json``.
    """
    if not is_hub_id(spec):
        return Path(spec)
    spec = str(spec)
    repo_id, revision = parse_hub_id(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=CHECKPOINT_PATTERNS,
            library_name="omnienc",
        )
    except LocalEntryNotFoundError:
        cached = _cached_revisions(cache, repo_id)
        where = f"the Hugging Face cache {cache}"
        if not cached:
            problem = f"{repo_id} is not in {where}"
        else:
            problem = (
                f"revision {revision!r} of {repo_id} is not in {where} (cached: "
                f"{', '.join(cached)})"
            )
        how = (
            "HF_HUB_OFFLINE=1 forbids downloading it: run once with network access (or "
            f"`hf download {repo_id} --revision {revision}`), or unset HF_HUB_OFFLINE"
            if offline
            else "and it could not be downloaded; check the network and the id"
        )
        raise CheckpointError(spec, f"{problem}; {how}") from None
    except RevisionNotFoundError:
        raise CheckpointError(
            spec,
            f"the Hub repository {repo_id} has no revision {revision!r}; give an existing "
            "branch, tag or commit after @",
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointError(
            spec,
            f"no model repository {repo_id} on the Hugging Face Hub that this account can read; "
            "check the id, or log in (`hf auth login`) for a private or gated one",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(
            spec,
            f"could not download {repo_id}@{revision} ({type(exc).__name__}: {exc}); check the "
            "network, or set HF_HUB_OFFLINE=1 to use the cached copy",
        ) from None
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise CheckpointError(
            spec,
            f"the Hub repository {repo_id}@{revision} has no config.json (files: "
            f"{', '.join(files) or 'none'}); it is not an omnienc encoder (publish one with "
            "`omnienc export CKPT OUT`)",
        )
    return path
