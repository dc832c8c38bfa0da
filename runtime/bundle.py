"""Reading a bundle: a directory with manifest.json, graphs with external data, tokenizer files.

A bundle is untrusted input (docs/security.md). `read_bundle` parses the manifest into typed
dataclasses with every value checked (core/manifest.py), then checks every file the manifest
names: listed in `files`, a plain name confined to the directory (no `..`, no absolute path, no
symlink leaving it), a regular file of the listed size, and with `verify` its sha256. The runtime
opens files only through `Bundle.path`, which returns listed, checked files and nothing else:
a file dropped into a bundle without being listed is never read. `verify=False` skips only the
hashing, never the confinement or the listing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dsexport.core.config import ModelConfig
from dsexport.core.errors import BundleError
from dsexport.core.files import confined, sha256_file
from dsexport.core.jsonio import load_json
from dsexport.core.manifest import (BUNDLE_FORMAT, MANIFEST_FILE, SCHEMA_VERSION,  # noqa: F401  (re-exported)
                                    SUPPORTED_SCHEMA_VERSIONS, Manifest, manifest_seal)

MAX_MANIFEST_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Manifest

    @property
    def model(self) -> ModelConfig:
        return self.manifest.model

    def path(self, name: str, where: str = "manifest") -> Path:
        """The path of a file the manifest lists; anything else is refused."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.directory}: {where} names {name!r}, which the manifest's files do not list "
                              "(an unlisted file is never read)")
        return confined(self.directory, name, f"{self.directory / MANIFEST_FILE}: {where}", BundleError)

    def optional_path(self, name: str) -> Path | None:
        return self.path(name) if name in self.manifest.files else None

    def file_sizes(self) -> dict[str, int]:
        return {name: entry.bytes for name, entry in self.manifest.files.items()}


def read_manifest(directory: Path) -> tuple[Manifest, dict]:
    """The typed manifest and the JSON it was read from."""
    path = confined(directory, MANIFEST_FILE, str(directory), BundleError, must_exist=False)
    if not path.is_file():
        partial = " (a build that did not finish)" if directory.name.startswith(".") else ""
        raise BundleError(f"{directory}: no {MANIFEST_FILE}; not a complete dsexport bundle{partial}")
    data = load_json(path, BundleError, MAX_MANIFEST_BYTES)
    return Manifest.from_json(data, str(path)), data


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and check its files; with verify, also their sha256."""
    directory = Path(path)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    manifest, data = read_manifest(directory)
    bundle = Bundle(directory, manifest)
    check_files(bundle, verify)
    if verify:
        check_seal(bundle, data)
    return bundle


def check_seal(bundle: Bundle, data: dict) -> None:
    """The manifest is the one its build sealed: the golden file (whose checksum the manifest holds)
    records a hash of every manifest field but `files` and `engines` (golden schema 2)."""
    name = bundle.manifest.golden_file
    if name is None:
        if data.get("schema_version") == 1:  # early bundles had no golden outputs
            return
        raise BundleError(f"{bundle.directory / MANIFEST_FILE}: no golden section, so the manifest cannot be verified "
                          "(every build writes one); rebuild the bundle, or load it with --no-verify")
    golden = load_json(bundle.path(name, "golden.file"), BundleError)
    seal = golden.get("manifest_seal") if isinstance(golden, dict) else None
    if seal is None:  # bundles of dsexport 0.1.0 carry no seal
        return
    if seal != manifest_seal(data):
        raise BundleError(f"{bundle.directory / MANIFEST_FILE}: the manifest was modified after the build (it no longer "
                          "matches the seal in its golden outputs)")


def check_files(bundle: Bundle, verify: bool = True, skip: set[str] = frozenset()) -> None:
    """Every referenced file is listed; every listed file (but `skip`) is confined, of its size, and
    with verify of its sha256."""
    manifest = bundle.manifest
    for name, where in manifest.referenced_files():
        if name not in manifest.files:
            raise BundleError(f"{bundle.directory / MANIFEST_FILE}: {where} names {name!r}, which the manifest's files "
                              "do not list")
    for name, entry in manifest.files.items():
        if name in skip:
            continue
        file = confined(bundle.directory, name, f"{bundle.directory / MANIFEST_FILE}: files", BundleError,
                        must_exist=False)
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        size = file.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{file}: its size differs from the manifest's: the file was modified")
        if verify and sha256_file(file) != entry.sha256:
            raise BundleError(f"{file}: sha256 does not match the manifest: the file was modified or corrupted")


def verify_files(bundle: Bundle, skip: set[str] = frozenset()) -> None:
    check_files(bundle, True, skip)
