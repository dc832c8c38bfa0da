"""The bundle manifest (manifest.json) as typed, versioned dataclasses (docs/bundle.md).

    manifest = Manifest.from_json(data, "dist/m/manifest.json")   # every value checked
    manifest.model.num_hidden_layers, manifest.graphs.decoder.file, manifest.quantization ...
    data == manifest.to_json()                                     # schema 2 round-trips

Schema 2 is what dsexport writes. Schema 1 (x86-cpu bundles from before the TensorRT and phone
targets: no `context`, no `memory_plan`, no per-graph `moe_lowering`) is migrated on read to the
schema-2 meaning. Unknown top-level keys and unknown keys of graphs.decoder are kept (a newer
dsexport of the same schema may add keys; readers ignore them). Every file name a manifest holds
is checked to be a plain relative name (core/files.py); that the files exist inside the bundle is
the bundle reader's check (runtime/bundle.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dsexport.core.config import MAX_LAYERS, ModelConfig
from .contract import DTYPES, CacheSpec, GraphContract, TensorSpec, layer_of
from .errors import BundleError
from .files import check_name
from .jsonio import Fields
from .quant import AWQ_FILE, QuantSpec
from .sections import (MAX_BYTES, SHA256_HEX, EnginesSection, NativeSection, PagingSection, PruningRecord, Stats, TensorRTSection,
                       read_quantization)

BUNDLE_FORMAT = "dsexport-bundle"
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt", "onnxruntime-mobile")
MAX_FILES = 4096


@dataclasses.dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One graph of a paged decoder: the layers it runs and the MoE layer whose experts follow it."""
    file: str
    data: str
    layers: tuple[int, ...]
    moe_layer: int | None

    def to_json(self) -> dict:
        return {"file": self.file, "data": self.data, "layers": list(self.layers), "moe_layer": self.moe_layer}


@dataclasses.dataclass(frozen=True)
class DecoderGraph:
    """graphs.decoder: one ONNX (or ORT-format) graph, or a paged decoder's segments."""
    moe_lowering: str
    contract: GraphContract
    file: str | None = None
    data: str | None = None
    prompt_moe_lowering: str | None = None  # TensorRT targets: an If picks it for prompts
    max_prompt_tokens: int | None = None  # prompts run in chunks of at most this many tokens
    paged: bool = False
    segments: tuple[Segment, ...] = ()
    ort_format: dict | None = None  # phones: format, required_operators, session_config, ... (docs/mobile.md)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this graph reads."""
        if self.paged:
            return tuple(name for s in self.segments for name in (s.file, s.data))
        names = [self.file] + ([self.data] if self.data else [])
        if self.ort_format and self.ort_format.get("required_operators"):
            names.append(self.ort_format["required_operators"])
        return tuple(names)

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        if self.paged:
            out.update(paged=True, moe_lowering=self.moe_lowering, segments=[s.to_json() for s in self.segments])
        else:
            out["file"] = self.file
            if self.data is not None:
                out["data"] = self.data
            if self.ort_format is not None:
                out.update(self.ort_format)
            out["moe_lowering"] = self.moe_lowering
            if self.prompt_moe_lowering is not None:
                out.update(prompt_moe_lowering=self.prompt_moe_lowering, max_prompt_tokens=self.max_prompt_tokens)
        out.update(self.contract.to_json())
        out.update(self.extra)
        return out


_ORT_FORMAT_KEYS = ("format", "required_operators", "optimization_style", "onnxruntime_version", "bytes",
                    "target_platform", "type_reduction", "session_config")


@dataclasses.dataclass(frozen=True)
class MTPGraphInfo:
    """graphs.mtp: the drafting graph; its embedding and head are read from the decoder's data file."""
    file: str
    data: str
    weight_bytes: int
    shared_data: str
    shared_weights: tuple[str, ...]
    shared_bytes: int
    contract: GraphContract
    layer_index: int
    verify: dict | None = None  # the build's check against the torch MTP module

    def to_json(self) -> dict:
        out = {"file": self.file, "data": self.data, "weight_bytes": self.weight_bytes, "shared_data": self.shared_data,
               "shared_weights": list(self.shared_weights), "shared_bytes": self.shared_bytes,
               **self.contract.to_json(), "layer_index": self.layer_index}
        if self.verify is not None:
            out["verify"] = self.verify
        return out


@dataclasses.dataclass(frozen=True)
class Graphs:
    decoder: DecoderGraph
    mtp: MTPGraphInfo | None = None

    def to_json(self) -> dict:
        out = {"decoder": self.decoder.to_json()}
        if self.mtp is not None:
            out["mtp"] = self.mtp.to_json()
        return out


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    backend: str
    execution_providers: tuple[str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "backend": self.backend, "execution_providers": list(self.execution_providers)}


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    moe_lowering: str
    moe_shards: int = 1
    prefill_moe_lowering: str | None = None
    opset: int = 17
    hidden_states: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Manifest:
    created_utc: str
    producer: dict[str, str]
    source: dict[str, str]  # checkpoint (directory name), config_sha256
    model: ModelConfig
    target: Target
    precision: str
    export: ExportInfo
    context: int
    graphs: Graphs
    tokenizer_files: tuple[str, ...]
    stats: Stats
    files: dict[str, FileEntry]
    golden_file: str | None = None
    memory_plan: dict | None = None  # the plan the build checked (targets/memory_plan.py), as a report
    quantization: QuantSpec | None = None
    tensorrt: TensorRTSection | None = None
    mobile: dict | None = None  # phones: {"execution_providers": the app's provider and session settings}
    pruning: PruningRecord | None = None
    paging: PagingSection | None = None
    engines: EnginesSection | None = None
    native: NativeSection | None = None  # CPU bundles the native decoder can run (docs/native.md)
    schema_version: int = SCHEMA_VERSION
    extra: dict = dataclasses.field(default_factory=dict)

    # ---- derived --------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.target.backend

    @property
    def is_paged(self) -> bool:
        return self.graphs.decoder.paged

    @property
    def rounds_activations(self) -> bool:
        """Whether the bundle's kernels round activations to int8 (core/quant.py); the paged
        store's experts do as the fused QMoE does."""
        return self.quantization is not None and self.quantization.rounds_activations

    def listed_files(self) -> set[str]:
        return set(self.files)

    def referenced_files(self) -> list[tuple[str, str]]:
        """(file name, the manifest field naming it) for every file the runtime may open."""
        d = self.graphs.decoder
        out = [(name, "graphs.decoder") for name in d.files]
        if self.graphs.mtp is not None:
            out += [(self.graphs.mtp.file, "graphs.mtp.file"), (self.graphs.mtp.data, "graphs.mtp.data"),
                    (self.graphs.mtp.shared_data, "graphs.mtp.shared_data")]
        out += [(name, "tokenizer.files") for name in self.tokenizer_files]
        if self.golden_file:
            out.append((self.golden_file, "golden.file"))
        if self.paging is not None:
            out.append((self.paging.file, "paging.file"))
        if self.engines is not None:
            out += [(name, f"engines.files.{graph}") for graph, name in self.engines.files.items()]
        if self.native is not None:
            out += [(name, "native") for name in sorted(self.native.files())]
        if self.quantization is not None and self.quantization.method == "awq":
            out.append((AWQ_FILE, "quantization.method"))
        return out


    def to_json(self) -> dict:
        out: dict[str, Any] = {"format": BUNDLE_FORMAT, "schema_version": self.schema_version,
                               "created_utc": self.created_utc, "producer": dict(self.producer),
                               "source": dict(self.source), "model": self.model.to_json(),
                               "target": self.target.to_json(), "precision": self.precision,
                               "export": self.export.to_json(), "context": self.context, "graphs": self.graphs.to_json()}
        if self.memory_plan is not None:
            out["memory_plan"] = self.memory_plan
        out["tokenizer"] = {"files": list(self.tokenizer_files)}
        if self.golden_file is not None:
            out["golden"] = {"file": self.golden_file, "producer": "reference"}
        out["stats"] = self.stats.to_json()
        for key in ("quantization", "tensorrt", "mobile", "pruning", "paging", "engines", "native"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value if isinstance(value, dict) else value.to_json()
        out["files"] = {name: entry.to_json() for name, entry in self.files.items()}
        out.update(self.extra)
        return out

    def seal(self) -> str:
        """See `manifest_seal`."""
        return manifest_seal(self.to_json())

    def with_files(self, files: dict[str, FileEntry]) -> "Manifest":
        return dataclasses.replace(self, files=dict(files))

    @classmethod
    def from_json(cls, data: Any, file: str = MANIFEST_FILE) -> "Manifest":
        return _read_manifest(Fields(data, file, BundleError))


def manifest_seal(data: dict) -> str:
    """sha256 of a manifest's JSON but `files` and `engines` (which checksums and the device's engine
    build change). The golden file records it, and the manifest's checksum of the golden file
    covers that: a manifest changed in any other field no longer verifies."""
    import hashlib
    import json

    body = {k: v for k, v in data.items() if k not in ("files", "engines")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- reading ------------------------------------------------------------------------------
def _tensor_specs(f: Fields, key: str) -> tuple[TensorSpec, ...]:
    specs = []
    for t in f.objs(key, max_len=4 * MAX_LAYERS + 16):
        shape = t.list("shape", max_len=8)
        for i, d in enumerate(shape):
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and not 0 <= d < 1 << 31):
                t.fail(f"shape[{i}]: {d!r} is neither a dimension nor a symbolic name"[:200], "shape")
        specs.append(TensorSpec(t.str("name", max_len=256), t.str("dtype", choices=DTYPES), tuple(shape)))
    return tuple(specs)


def _contract(f: Fields) -> GraphContract:
    c = f.obj("cache")
    return GraphContract(_tensor_specs(f, "inputs"), _tensor_specs(f, "outputs"),
                         CacheSpec(c.str("layout", max_len=1024), c.int("values_per_token_per_layer", lo=1, hi=1 << 20)))


def _check_decoder_contract(f: Fields, contract: GraphContract, cfg: ModelConfig) -> None:
    """The decoder's cache inputs are the model's layers, one each, of the model's latent width."""
    layers = sorted(i for i in (layer_of(n, "past_latent") for n in contract.input_names()) if i is not None)
    if layers != list(range(cfg.num_hidden_layers)):
        f.fail(f"the graph's past_latent inputs cover {len(layers)} layers; the model has {cfg.num_hidden_layers}",
               "inputs")
    if contract.cache.values_per_token_per_layer != cfg.latent_dim:
        f.fail(f"{contract.cache.values_per_token_per_layer} values per token; the model's latent is {cfg.latent_dim}",
               "cache")


def _read_decoder(f: Fields, cfg: ModelConfig, default_lowering: str) -> DecoderGraph:
    contract = _contract(f)
    _check_decoder_contract(f, contract, cfg)
    name = lambda key: check_name(f.str(key), f.where(key), f.error)  # noqa: E731
    if f.has("paged") and f.bool("paged"):
        segments = []
        for s in f.objs("segments", max_len=MAX_LAYERS + 1):
            segments.append(Segment(check_name(s.str("file"), s.where("file"), f.error),
                                    check_name(s.str("data"), s.where("data"), f.error),
                                    s.ints("layers", lo=0, hi=cfg.num_hidden_layers - 1, max_len=MAX_LAYERS),
                                    s.int("moe_layer", None, lo=0, hi=cfg.num_hidden_layers - 1)))
        covered = [i for s in segments for i in s.layers]
        if covered != list(range(cfg.num_hidden_layers)) or not segments or segments[-1].moe_layer is not None:
            f.fail("the segments do not run the model's layers once each, in order, ending with the output head",
                   "segments")
        graph = DecoderGraph(f.str("moe_lowering", max_len=64), contract, paged=True, segments=tuple(segments))
    else:
        ort_format = None
        if f.has("format"):
            ort_format = {k: f.raw(k) for k in _ORT_FORMAT_KEYS if k in f.data}
            if ort_format.get("required_operators") is not None:
                name("required_operators")
        graph = DecoderGraph(f.str("moe_lowering", default_lowering, max_len=64), contract, file=name("file"),
                             data=name("data") if f.has("data") else None,
                             prompt_moe_lowering=f.str("prompt_moe_lowering", None, max_len=64),
                             max_prompt_tokens=f.int("max_prompt_tokens", None, lo=1, hi=1 << 24),
                             ort_format=ort_format)
        f.raw("max_prompt_tokens", None)
    for key in ("inputs", "outputs", "cache", "paged", "segments", "file", "data"):
        f.raw(key, None)
    return dataclasses.replace(graph, extra=f.rest())


def _read_mtp(f: Fields, cfg: ModelConfig) -> MTPGraphInfo:
    name = lambda key: check_name(f.str(key), f.where(key), f.error)  # noqa: E731
    contract = _contract(f)
    if contract.cache.values_per_token_per_layer != cfg.latent_dim:
        f.fail("the MTP graph's cache width differs from the model's latent", "cache")
    return MTPGraphInfo(name("file"), name("data"), f.int("weight_bytes", lo=0, hi=MAX_BYTES), name("shared_data"),
                        f.strs("shared_weights", max_len=64), f.int("shared_bytes", lo=0, hi=MAX_BYTES), contract,
                        f.int("layer_index", lo=0, hi=MAX_LAYERS), f.mapping("verify", None))


def _read_files(f: Fields) -> dict[str, FileEntry]:
    files = {}
    for name, entry in f.items("files", max_len=MAX_FILES):
        check_name(name, f"{f.where('files')}", f.error)
        sha = entry.str("sha256", max_len=SHA256_HEX)
        if len(sha) != SHA256_HEX or any(c not in "0123456789abcdef" for c in sha):
            entry.fail("not a lowercase hex sha256", "sha256")
        files[name] = FileEntry(entry.int("bytes", lo=0, hi=MAX_BYTES), sha)
    return files


def _migrate_v1(data: dict) -> dict:
    """Schema 1 -> 2: the fields schema 2 added, with the values schema-1 bundles implied."""
    data = dict(data)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    export = dict(data.get("export") or {})
    export.setdefault("moe_lowering", "ort-moe")
    data["export"] = export
    data.setdefault("context", model.get("max_position_embeddings", 4096))
    graphs = data.get("graphs")
    if isinstance(graphs, dict) and isinstance(graphs.get("decoder"), dict):
        data["graphs"] = {**graphs, "decoder": {"moe_lowering": export["moe_lowering"], **graphs["decoder"]}}
    return data


def _read_manifest(f: Fields) -> Manifest:
    if f.raw("format", None) != BUNDLE_FORMAT:
        f.fail(f"not a dsexport bundle manifest (format is not {BUNDLE_FORMAT!r})")
    version = f.raw("schema_version", None)
    if version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
        f.fail(f"schema_version {version!r} is not supported by this runtime (supports "
               f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade dsexport")
    if version == 1:
        f = Fields(_migrate_v1(f.data), f.file, f.error)
        f.raw("format"), f.raw("schema_version")
    cfg = ModelConfig.from_json(f.raw("model"), f.file, f.error)
    f.raw("model")
    t, e, g = f.obj("target"), f.obj("export"), f.obj("graphs")
    target = Target(t.str("name", max_len=64), t.str("backend", choices=BACKENDS), t.strs("execution_providers", max_len=16))
    export = ExportInfo(e.str("moe_lowering", max_len=64), e.int("moe_shards", 1, lo=1, hi=1024),
                        e.str("prefill_moe_lowering", None, max_len=64), e.int("opset", 17, lo=1, hi=64),
                        e.bool("hidden_states", False))
    decoder = _read_decoder(g.obj("decoder"), cfg, export.moe_lowering)
    mtp = _read_mtp(g.obj("mtp"), cfg) if g.has("mtp") else None
    golden = f.obj("golden", None)
    tokenizer = f.obj("tokenizer", None)
    tokenizer_files = tuple(check_name(n, tokenizer.where("files"), f.error)
                            for n in tokenizer.strs("files", (), max_len=16)) if tokenizer else ()
    optional = {
        "quantization": lambda s: read_quantization(s), "tensorrt": TensorRTSection.read,
        "pruning": PruningRecord.read, "paging": lambda s: PagingSection.read(s, cfg), "engines": EnginesSection.read,
        "native": lambda s: NativeSection.read(s, cfg),
    }
    sections = {key: read(f.obj(key)) if f.has(key) else None for key, read in optional.items()}
    manifest = Manifest(
        created_utc=f.str("created_utc", "", max_len=64), producer=_str_map(f, "producer"), source=_str_map(f, "source"),
        model=cfg, target=target, precision=f.str("precision", max_len=16), export=export,
        context=f.int("context", lo=2, hi=cfg.max_position_embeddings), graphs=Graphs(decoder, mtp),
        tokenizer_files=tokenizer_files, stats=Stats.read(f.obj("stats")), files=_read_files(f),
        golden_file=check_name(golden.str("file"), golden.where("file"), f.error) if golden else None,
        memory_plan=f.mapping("memory_plan", None), mobile=f.mapping("mobile", None), schema_version=SCHEMA_VERSION,
        **sections)
    if manifest.is_paged and manifest.paging is None:
        f.fail("the decoder is paged but the manifest has no paging section", "graphs.decoder")
    if manifest.native is not None:  # routed experts: in the store (paged) or in the fused graph's data (routed)
        for i, layer in manifest.native.layers.items():
            if cfg.is_moe_layer(i) and (layer.routed is None) != manifest.is_paged:
                f.fail(f"layer {i}: the routed experts' location does not match the "
                       f"{'paged' if manifest.is_paged else 'fused'} decoder", "native")
        mtp = manifest.native.mtp
        if mtp is not None and (manifest.graphs.mtp is None or manifest.is_paged):
            f.fail("an MTP block for the native decoder in a bundle without a fused decoder and an MTP graph", "native")
        if mtp is not None and (mtp.layer.routed is None) == cfg.is_moe_layer(cfg.num_hidden_layers):
            f.fail("the MTP block's routed experts do not match its layer", "native")
    return dataclasses.replace(manifest, extra=f.rest())


def _str_map(f: Fields, key: str) -> dict[str, str]:
    value = f.mapping(key, {}, max_len=64)
    for k, v in value.items():
        if not isinstance(v, str) or len(v) > 1024:
            f.fail(f"{k}: expected a short string", key)
    return dict(value)
