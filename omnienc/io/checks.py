"""What a path is before it is read: :func:`check_readable` and pointed messages for bad files.

A missing, unreadable or empty path, a file whose leading bytes say it is another format (a PNG
named ``.nii``), and a truncated or corrupt gzip stream are each refused with a
:class:`~omnienc.errors.VolumeReadError` that names the file and the problem, before a reader
sees it.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from pathlib import Path

from omnienc.errors import PathError, VolumeReadError
from omnienc.io.volume import file_suffix

# Leading bytes of formats a misnamed file may really be in, for pointed error messages.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive (e.g. .npz)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)


def check_readable(path: str | Path, error: type[PathError] = VolumeReadError) -> None:
    """Raise ``error`` naming ``path`` if it cannot be opened, and saying why.

    Tells apart a missing path, a dangling symbolic link, a symbolic link loop, a file that cannot
    be read and a folder that cannot be listed (file modes are checked by opening, not with
    ``os.access``, so that the answer is also right for root and for ACLs).

    Args:
        path: A file or folder.
        error: The :class:`~omnienc.errors.PathError` subclass to raise.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(
                path, f"dangling symbolic link to {os.readlink(path)} (the target does not exist)"
            ) from None
        raise error(path, "no such file or folder") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(path, "symbolic link loop (the link leads back to itself)") from None
        if exc.errno == errno.EACCES:
            raise error(path, "permission denied: a folder on its path cannot be entered") from None
        raise error(path, f"cannot be opened ({exc.strerror})") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            os.scandir(path).close()
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        what = "the folder cannot be listed" if stat.S_ISDIR(st.st_mode) else "cannot read the file"
        raise error(path, f"permission denied: {what} (check its mode and owner)") from None
    except OSError as exc:
        raise error(path, f"cannot be opened ({exc.strerror})") from None


def _sniff(path: Path) -> str | None:
    """What the first bytes of ``path`` say it is, when that is a format people misname."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    # DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI-1 image"
    if head.startswith(b"ObjectType") or b"ElementDataFile" in head:
        return "a MetaImage (.mha) header"
    if head.startswith(b"NRRD"):
        return "an NRRD image"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file"
    return None


def _misnamed(path: Path) -> str:
    """`` (its content looks like X, not SUFFIX)`` when the content contradicts the suffix."""
    what = _sniff(path)
    suffix = file_suffix(path)
    expected = {
        ".nii": ("a NIfTI-1 image",),
        ".nii.gz": ("gzip-compressed",),
        ".mgz": ("gzip-compressed",),
        ".dcm.gz": ("gzip-compressed",),
        ".dcm": ("a DICOM file",),
        ".mha": ("a MetaImage (.mha) header",),
        ".mhd": ("a MetaImage (.mha) header",),
        ".nrrd": ("an NRRD image",),
        ".nhdr": ("an NRRD image",),
    }.get(suffix, ())
    if what is None or what in expected:
        return ""
    return f"; its content looks like {what}, not a {suffix} file: is it misnamed?"


def _verify_gzip(path: Path, needed: int, trailing: int) -> int:
    """Decompress ``path`` once in blocks: the gzip CRC-32 and length checks find flipped bits.

    nibabel stops reading at the last voxel, before the checksum, so a bit flipped inside the
    compressed voxels would go unnoticed; this pass reads to the end of the stream.

    Args:
        path: A gzip-compressed file.
        needed: Bytes the header says the uncompressed file holds at least.
        trailing: Bytes allowed after those (at most); more is an error.

    Returns:
        The uncompressed size.

    Raises:
        VolumeReadError: Corrupt or truncated compressed data, fewer bytes than ``needed``, or
            more than ``needed + trailing``.
    """
    size = 0
    limit = needed + trailing
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 22):
                size += len(block)
                if size > limit:
                    break
    except EOFError as exc:
        raise VolumeReadError(
            path,
            f"truncated or corrupt compressed data: the gzip stream ends early ({exc}); was the "
            "file cut short?",
        ) from None
    except gzip.BadGzipFile as exc:
        raise VolumeReadError(
            path,
            f"truncated or corrupt compressed data ({exc}): the file is damaged "
            "(a flipped bit or a bad copy)",
        ) from None
    except (zlib.error, OSError) as exc:
        raise VolumeReadError(
            path, f"truncated or corrupt compressed data ({type(exc).__name__}: {exc})"
        ) from None
    if size < needed:
        raise VolumeReadError(
            path,
            f"truncated: header promises {needed:,} bytes (header + voxels), the compressed "
            f"file holds {size:,}",
        )
    if size > limit:
        raise VolumeReadError(
            path,
            f"holds more bytes after its voxels than its header declares ({needed:,} bytes of "
            "header + voxels): the header's dimensions or data type are damaged",
        )
    return size


def _gzip_head_problem(path: Path) -> str | None:
    """Why the start of a gzip file cannot be decompressed, or ``None`` if it can."""
    if _sniff(path) != "gzip-compressed":
        return None
    try:
        with gzip.open(path, "rb") as f:
            f.read(4096)
    except EOFError:
        return "truncated: the compressed file ends inside the image header (file cut short?)"
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        return f"truncated or corrupt compressed data in the image header ({exc})"
    return None
