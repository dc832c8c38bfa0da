"""Where a build writes, and how it replaces what is there (docs/security.md).

A build writes into a hidden `.NAME.partial-*` directory beside --out and publishes it at the
end. `--overwrite` replaces only a directory that is a dsexport bundle or empty; never the
checkpoint, a directory holding it, the current directory or one above it, nor anything
reached through a symlink. Publishing swaps the two directories atomically (Linux
renameat2(RENAME_EXCHANGE)), so at every instant either the old or the new bundle is at --out;
where the kernel or filesystem lacks the call, two renames are used and the window between
them is reported if it is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dsexport.core.errors import OutputError, UserError
from dsexport.core.files import is_marked_output
from dsexport.core.manifest import BUNDLE_FORMAT, MANIFEST_FILE

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def check_output(out: Path, overwrite: bool, protected: list[Path], marker: str = MANIFEST_FILE,
                 fmt: str = BUNDLE_FORMAT, kind: str = "bundle", inside_protected: bool = True) -> None:
    """Refuse an --out the command must not write to or replace (one line, before any work): a
    symlink, a protected directory (the checkpoint) or one holding it (with inside_protected
    False, one inside it too), the current directory or one above it, or a non-empty directory
    that is not one of dsexport's own `kind` outputs (replaced only with --overwrite)."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symlink; give the real directory")
    real = out.resolve()
    for keep in protected:
        keep = Path(keep).resolve()
        if real == keep or real in keep.parents:
            raise UserError(f"--out {out} is or holds the checkpoint {keep}; write the {kind} elsewhere")
        if not inside_protected and keep in real.parents:
            raise UserError(f"--out {out} lies inside the checkpoint {keep}; write the {kind} elsewhere")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out {out} is the current directory or holds it; write the {kind} to a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not is_marked_output(out, marker, fmt):
        raise UserError(f"--out {out} exists and is not a dsexport {kind}; dsexport replaces only its own {kind}s "
                        "(or an empty directory)")
    if not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A hidden directory beside --out for the build to write into; removed unless published.
    A full disk (ENOSPC/EFBIG/EDQUOT) while building becomes one clear error."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create the bundle beside {out}: {e.strerror or e}") from None
    try:
        yield staging
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise OutputError(f"no space left writing the bundle ({e.strerror}); nothing was published at {out}, "
                              "whatever was there is unchanged") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where it is not available."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, out: Path) -> None:
    """Put the finished bundle at out: a plain rename, or an atomic swap with the old bundle,
    which is then removed."""
    out = Path(out)
    if not out.exists():
        staging.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        staging.rename(out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # the old bundle, now under the staging name
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)  # put the old bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)
