"""The exceptions omnienc raises for problems a user can fix.

Every error names the file it is about and the problem, so that a message printed by the
command line is enough to act on. Library code raises these instead of letting a traceback from
deep inside nibabel, SimpleITK or torch reach the user.
"""

from __future__ import annotations

from pathlib import Path


class OmniencError(Exception):
    """Base class of every error omnienc raises on purpose."""


class PathError(OmniencError):
    """An error about one file or folder.

    Args:
        path: The file or folder the problem is about.
        problem: What is wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class VolumeReadError(PathError):
    """A volume or label map could not be read as a 3D image."""


class DataError(PathError):
    """A data set, folder or image/label pair cannot be used (bad grid, missing file, ...)."""


class CheckpointError(PathError):
    """An encoder checkpoint is missing, corrupt, or does not match the model it claims."""
