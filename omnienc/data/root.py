"""Where the real data lives: ``--data``, else ``$OMNIENC_DATA``, else ``../shared/data``.

The data root holds ``medmnist/`` (MedMNIST ``.npz`` files under the names the medmnist package
expects) and ``volumes/`` (CT, MR and PET volumes and label maps, any folder layout).
"""

from __future__ import annotations

import os
from pathlib import Path

from omnienc.errors import DataError

ENV_VAR = "OMNIENC_DATA"

# The repository root of a source checkout (omnienc/data/root.py -> repo root).
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(data: str | Path | None = None) -> Path:
    """Return the data root to use.

    Args:
        data: An explicit folder (the ``--data`` option). Wins over everything else.

    Returns:
        The folder, resolved to an absolute path.

    Raises:
        DataError: The chosen folder does not exist, or no candidate was found.
    """
    if data is not None:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(root, "data root given with --data does not exist or is not a folder")
        return root.resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(root, f"data root from ${ENV_VAR} does not exist or is not a folder")
        return root.resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for root in candidates:
        if root.is_dir():
            return root.resolve()
    raise DataError(
        candidates[0].resolve(),
        f"no data root: pass --data DIR or set ${ENV_VAR} (looked for ../shared/data)",
    )
