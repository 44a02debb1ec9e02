"""omnienc: self-supervised 3D representation learning for radiology.

One shared 3D encoder, pretrained without labels on CT, MR and PET volumes, then frozen and
reused by plug-in adapters. See the README for the command line and DESIGN.md for the layout.
"""

from omnienc.errors import CheckpointError, DataError, OmniencError, VolumeReadError
from omnienc.preprocessing import Preprocessing

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "OmniencError",
    "Preprocessing",
    "VolumeReadError",
    "__version__",
    "load_encoder",
    "read_volume",
    "save_encoder",
    "write_volume",
]


def __getattr__(name: str):
    if name in ("read_volume", "write_volume", "Volume"):
        from omnienc import io

        return getattr(io, name)
    if name in ("load_encoder", "save_encoder"):
        from omnienc import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'omnienc' has no attribute {name!r}")
