"""The bundle: a directory with manifest.json, graphs with external data, and tokenizer files.

This module reads and verifies bundles (the exporter writes them, dsexport.exporter.bundle).
The format is documented in docs/bundle.md; `schema_version` changes whenever a field changes
meaning, and a runtime refuses versions it does not know.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from dsexport.errors import BundleError

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "dsexport-bundle"
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def graph_path(self, graph: str = "decoder") -> Path:
        return self.directory / self.manifest["graphs"][graph]["file"]

    def file_sizes(self) -> dict[str, int]:
        return {name: entry["bytes"] for name, entry in self.manifest["files"].items()}


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with verify, check every listed file's size and sha256."""
    directory = Path(path)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        partial = "" if not directory.name.startswith(".") else " (a build that did not finish)"
        raise BundleError(f"{directory}: no {MANIFEST_FILE}; not a complete dsexport bundle{partial}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a dsexport bundle manifest")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(f"{manifest_path}: schema_version {version!r} is not supported by this runtime "
                          f"(supports {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade dsexport")
    bundle = Bundle(directory, manifest)
    if verify:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle) -> None:
    for name, entry in bundle.manifest["files"].items():
        path = bundle.directory / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{path}: {size} bytes, the manifest says {entry['bytes']}: the file was modified")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 does not match the manifest: the file was modified or corrupted")
