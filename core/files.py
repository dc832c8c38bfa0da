"""Files of untrusted directories (bundles, checkpoints): checksums, names confined to the
directory, copies of regular files only, atomic writes.

A name from a manifest or an index is a relative POSIX path of plain components: no absolute
path, no `..`, no empty or `.` component, no backslash or NUL; the file it names, once every
symlink is resolved, must still lie inside the directory. `confined` checks both, so a listed
symlink to /etc/passwd or a `../secret.txt` entry is refused before anything is opened.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

from .errors import UserError
from .jsonio import load_json

_HASH_CHUNK = 16 << 20
MAX_NAME_LENGTH = 255


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name, where: str, error: type[UserError] = UserError) -> str:
    """A relative path of plain components, as a manifest may name a file of its bundle."""
    if not isinstance(name, str) or not name:
        raise error(f"{where}: expected a file name, got {name!r}"[:300])
    if len(name) > 4 * MAX_NAME_LENGTH or "\\" in name or "\0" in name or any(ord(c) < 32 for c in name):
        raise error(f"{where}: {name[:80]!r} is not a plain file name")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise error(f"{where}: {name[:80]!r} is not a path inside the bundle (absolute, or with '..')")
    return name


def confined(directory: Path, name: str, where: str, error: type[UserError] = UserError,
             must_exist: bool = True) -> Path:
    """directory / name, refused when the name or a symlink on its way leaves the directory."""
    check_name(name, where, error)
    root = Path(directory).resolve()
    path = root / name
    try:
        real = path.resolve(strict=must_exist)
    except FileNotFoundError:
        raise error(f"{where}: {name} is missing from {directory}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{where}: {name} cannot be resolved ({e})") from None
    if real != root and root not in real.parents:
        raise error(f"{where}: {name} leads outside {directory} (a symlink out of the bundle)")
    if must_exist and not real.is_file():
        raise error(f"{where}: {name} is not a regular file")
    return path


def copy_regular_file(source: Path, dest: Path, root: Path, error: type[UserError] = UserError) -> bool:
    """Copy source to dest if it is a regular file inside root (after resolving symlinks); a file
    that is absent returns False, anything else (a symlink out of root, a device, a directory)
    raises. Opened with O_NOFOLLOW on the resolved path, so it cannot be swapped for a link meanwhile."""
    try:
        info = os.lstat(source)
    except FileNotFoundError:
        return False
    real = Path(source).resolve()
    root = Path(root).resolve()
    if root not in real.parents:
        raise error(f"{source}: a symlink to {real}, outside {root}; dsexport copies only the checkpoint's own files")
    if stat.S_ISLNK(info.st_mode):
        info = os.stat(real)
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{source}: not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(real, flags)
    try:
        with os.fdopen(fd, "rb", closefd=False) as src, open(dest, "wb") as out:
            while chunk := src.read(_HASH_CHUNK):
                out.write(chunk)
    finally:
        os.close(fd)
    return True


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a hidden temp file beside path, fsync, then rename over it: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_marked_output(directory: Path, marker: str, fmt: str) -> bool:
    """Whether `directory` is one of dsexport's own outputs: it holds `marker`, a regular JSON file
    whose "format" is `fmt` (a bundle's manifest.json, a distill output's report)."""
    path = Path(directory) / marker
    if not path.is_file() or path.is_symlink():
        return False
    try:
        data = load_json(path, UserError, max_bytes=64 << 20)
    except UserError:
        return False
    return isinstance(data, dict) and data.get("format") == fmt
