"""The manifest's sections other than the model and the graphs, typed (core/manifest.py holds
the whole). Each section reads itself from JSON with every value checked (`read`) and writes the
JSON it came from (`to_json`), so a manifest round-trips and a reader never indexes by string.
"""

from __future__ import annotations

import dataclasses

from dsexport.core.config import MAX_EXPERTS, MAX_LAYERS, ModelConfig
from .files import check_name
from .jsonio import Fields, check_float
from .quant import ABSORBED, ACTIVATIONS, BLOCK_SIZES, LOWERINGS, METHOD_NAMES, PARTS, SCHEMES, QuantSpec, part_widths

PRUNE_METHODS = ("drop", "merge")
MAX_BYTES = 1 << 50  # a petabyte: any size a manifest states must be below this
SHA256_HEX = 64


def read_quantization(f: Fields) -> QuantSpec:
    bits = {}
    for part, value in (f.mapping("bits") or {}).items():
        if part not in PARTS or isinstance(value, bool) or value not in part_widths(part):
            f.fail(f"bits: {part}={value!r}; parts are {', '.join(PARTS)}, bits 4 or 8 (or 6, except "
                   "routed_experts)", "bits")
        bits[part] = value
    expert_bits = {}
    for layer, widths in f.items("expert_bits", {}, max_len=MAX_LAYERS):
        if not layer.isdigit() or int(layer) >= MAX_LAYERS:
            widths.fail(f"layer {layer!r} is not a layer index")
        expert_bits[int(layer)] = {}
        for e, b in widths.data.items():
            if not e.isdigit() or int(e) >= MAX_EXPERTS or b not in (4, 8) or isinstance(b, bool):
                widths.fail(f"expert {e!r}: width {b!r}; expert ids are integers, widths 4 or 8")
            expert_bits[int(layer)][int(e)] = b
    block = f.int("block_size")
    if block not in BLOCK_SIZES:
        f.fail(f"{block} is not one of {', '.join(map(str, BLOCK_SIZES))}", "block_size")
    expert_block = f.int("expert_block_size", None)
    if expert_block is not None and expert_block not in BLOCK_SIZES:
        f.fail(f"{expert_block} is not one of {', '.join(map(str, BLOCK_SIZES))}", "expert_block_size")
    per_channel = f.ints("per_channel_bits", (), lo=4, hi=8, max_len=2)
    for key in ("symmetric", "scale_dtype"):  # derived, written for readers of the JSON
        f.raw(key, None)
    method = f.str("method", "round-to-nearest", choices=tuple(METHOD_NAMES.values()))
    return QuantSpec(bits, block, expert_block, f.str("activations", "fp32", choices=ACTIVATIONS), expert_bits,
                     f.str("scheme", "absmax", choices=SCHEMES), tuple(per_channel),
                     f.str("lowering", "ort", choices=LOWERINGS), {v: k for k, v in METHOD_NAMES.items()}[method],
                     f.str("absorbed", "fp32", choices=ABSORBED))


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclasses.dataclass(frozen=True)
class EngineGraph:
    file: str
    engine: str
    profiles: tuple[dict[str, ShapeRange], ...]

    def to_json(self) -> dict:
        return {"file": self.file, "engine": self.engine,
                "profiles": [{name: r.to_json() for name, r in p.items()} for p in self.profiles]}


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """What `dsexport engine` does on the device (targets/tensorrt_plan.py decides it)."""
    tensorrt: str
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    tf32: bool
    fp32_layers: tuple[str, ...]
    workspace_bytes: int
    timing_cache: str | None
    int64_io_as_int32: bool
    context: int
    max_batch: int
    prefill_tokens: int
    graphs: dict[str, EngineGraph]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(builder_flags=list(self.builder_flags), fp32_layers=list(self.fp32_layers),
                   graphs={name: g.to_json() for name, g in self.graphs.items()})
        return out

    @classmethod
    def read(cls, f: Fields) -> "EnginePlan":
        graphs = {}
        for name, g in f.items("graphs", max_len=8):
            profiles = []
            for p in g.objs("profiles", max_len=16):
                ranges = {}
                for tensor, r in p.entries(max_len=4 * MAX_LAYERS):
                    ranges[tensor] = ShapeRange(*(r.ints(k, lo=0, hi=1 << 31, max_len=8) for k in ("min", "opt", "max")))
                profiles.append(ranges)
            graphs[name] = EngineGraph(check_name(g.str("file"), g.where("file"), f.error),
                                       check_name(g.str("engine"), g.where("engine"), f.error), tuple(profiles))
        timing = f.str("timing_cache", None)
        return cls(f.str("tensorrt", max_len=32), f.str("precision", max_len=16), f.bool("strongly_typed"),
                   f.strs("builder_flags", max_len=16), f.bool("tf32"), f.strs("fp32_layers", max_len=256),
                   f.int("workspace_bytes", lo=0, hi=MAX_BYTES),
                   check_name(timing, f.where("timing_cache"), f.error) if timing else None,
                   f.bool("int64_io_as_int32"), f.int("context", lo=1, hi=1 << 24), f.int("max_batch", lo=1, hi=1 << 16),
                   f.int("prefill_tokens", lo=1, hi=1 << 24), graphs)


@dataclasses.dataclass(frozen=True)
class TensorRTSection:
    route: str
    checked_against: str
    checks: dict  # {TensorRT version: {graph: {ok, errors, nodes}}}: a report, shown as it is
    engine_plan: EnginePlan

    def to_json(self) -> dict:
        return {"route": self.route, "checked_against": self.checked_against, "checks": self.checks,
                "engine_plan": self.engine_plan.to_json()}

    def check_ok(self, version: str) -> dict[str, bool]:
        return {role: bool(r.get("ok")) for role, r in self.checks.get(version, {}).items()}

    @classmethod
    def read(cls, f: Fields) -> "TensorRTSection":
        checks = {}
        for version, graphs in f.items("checks", max_len=16):
            checks[version] = {}
            for role, r in graphs.entries(max_len=8):
                checks[version][role] = {"ok": r.bool("ok"), "errors": r.list("errors", max_len=1 << 16),
                                         "nodes": r.int("nodes", lo=0, hi=1 << 31)}
        return cls(f.str("route", max_len=32), f.str("checked_against", max_len=32), checks,
                   EnginePlan.read(f.obj("engine_plan")))


@dataclasses.dataclass(frozen=True)
class EnginesSection:
    """Written on the device by `dsexport engine`."""
    tensorrt_version: str
    gpu: str
    compute_capability: str
    built_utc: str
    precision: str
    files: dict[str, str]  # graph -> engine file

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "files": dict(self.files)}

    @classmethod
    def read(cls, f: Fields) -> "EnginesSection":
        files = {g: check_name(v, f"{f.where('files')}.{g}", f.error) for g, v in (f.mapping("files", max_len=8)).items()}
        return cls(f.str("tensorrt_version", max_len=64), f.str("gpu", max_len=256), str(f.raw("compute_capability")),
                   f.str("built_utc", max_len=64), f.str("precision", max_len=16), files)


@dataclasses.dataclass(frozen=True)
class StoreMatrix:
    bits: int
    block: int
    padded: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StoreLayer:
    """One MoE layer's records in the paged bundle's expert store (exporter/paged.py)."""
    experts: int
    intermediate: int
    hidden: int
    record_bytes: int
    offsets: tuple[int, ...]
    router: int
    bias: int | None
    groups: tuple[int, ...]
    quantized: dict[str, StoreMatrix] | None = None  # "gate_up", "down"

    def to_json(self) -> dict:
        out = {"experts": self.experts, "intermediate": self.intermediate, "hidden": self.hidden,
               "record_bytes": self.record_bytes, "offsets": list(self.offsets), "router": self.router,
               "bias": self.bias, "groups": list(self.groups)}
        if self.quantized is not None:
            out["quantized"] = {k: m.to_json() for k, m in self.quantized.items()}
        return out

    @classmethod
    def read(cls, f: Fields) -> "StoreLayer":
        experts = f.int("experts", lo=1, hi=MAX_EXPERTS)
        quantized = None
        if f.has("quantized"):
            q = f.obj("quantized")
            quantized = {}
            for name in ("gate_up", "down"):
                m = q.obj(name)
                bits, block = m.int("bits"), m.int("block", lo=1, hi=1 << 20)
                if bits not in (4, 8):
                    m.fail(f"{bits} bits; the store holds 4 or 8", "bits")
                quantized[name] = StoreMatrix(bits, block, m.int("padded", lo=1, hi=1 << 20))
        offsets = f.ints("offsets", lo=0, hi=MAX_BYTES, max_len=MAX_EXPERTS)
        if len(offsets) != experts:
            f.fail(f"{len(offsets)} offsets for {experts} experts", "offsets")
        groups = f.ints("groups", (), lo=0, hi=MAX_EXPERTS, max_len=MAX_EXPERTS)
        if groups and len(groups) != experts:
            f.fail(f"{len(groups)} routing groups for {experts} experts", "groups")
        return cls(experts, f.int("intermediate", lo=1, hi=1 << 20), f.int("hidden", lo=1, hi=1 << 20),
                   f.int("record_bytes", lo=1, hi=1 << 40), offsets, f.int("router", lo=0, hi=MAX_BYTES),
                   f.int("bias", None, lo=0, hi=MAX_BYTES), groups, quantized)


@dataclasses.dataclass(frozen=True)
class PagingSection:
    """A paged bundle's expert store (docs/paging.md)."""
    version: int
    file: str
    align: int
    precision: str
    bits: int | None
    block: int | None
    scheme: str | None
    zero_points: bool
    activations: str
    record: str
    layers: dict[int, StoreLayer]
    routed_expert_bytes: int
    store_bytes: int
    non_expert_bytes: int
    default_cache_mb: float | None
    activation_block: int | None = None

    @property
    def activation_quant_block(self) -> int | None:
        """The block the store's experts round activations in (the fused QMoE's behavior), or None."""
        return self.activation_block if self.activations == "int8" else None

    def to_json(self) -> dict:
        out = {"version": self.version, "file": self.file, "align": self.align, "precision": self.precision,
               "bits": self.bits, "block": self.block, "scheme": self.scheme, "zero_points": self.zero_points,
               "activations": self.activations}
        if self.activation_block is not None:
            out["activation_block"] = self.activation_block
        out.update(record=self.record, layers={str(i): layer.to_json() for i, layer in self.layers.items()},
                   routed_expert_bytes=self.routed_expert_bytes, store_bytes=self.store_bytes,
                   non_expert_bytes=self.non_expert_bytes, default_cache_mb=self.default_cache_mb)
        return out

    @classmethod
    def read(cls, f: Fields, cfg: ModelConfig) -> "PagingSection":
        layers = {}
        for name, entry in f.items("layers", max_len=MAX_LAYERS):
            if not name.isdigit() or not cfg.is_moe_layer(int(name)) or int(name) >= cfg.num_hidden_layers:
                entry.fail(f"layer {name!r} is not a MoE layer of the model")
            layer = StoreLayer.read(entry)
            if (layer.experts, layer.hidden, layer.intermediate) != (cfg.num_experts(int(name)), cfg.hidden_size,
                                                                      cfg.moe_intermediate_size):
                entry.fail("its experts' count or shapes differ from the model's")
            layers[int(name)] = layer
        bits = f.int("bits", None)
        if bits not in (None, 4, 8):
            f.fail(f"{bits} bits; the store holds fp32, 8 or 4", "bits")
        return cls(f.int("version", lo=1, hi=1), check_name(f.str("file"), f.where("file"), f.error),
                   f.int("align", lo=1, hi=1 << 20), f.str("precision", choices=("fp32", "int8", "int4")), bits,
                   f.int("block", None, lo=1, hi=1 << 20), f.str("scheme", None, choices=SCHEMES),
                   f.bool("zero_points", False), f.str("activations", "fp32", choices=ACTIVATIONS),
                   f.str("record", "", max_len=1024), layers, f.int("routed_expert_bytes", lo=0, hi=MAX_BYTES),
                   f.int("store_bytes", lo=0, hi=MAX_BYTES), f.int("non_expert_bytes", lo=0, hi=MAX_BYTES),
                   f.float("default_cache_mb", None, lo=0.0, lo_open=True, hi=1e12),
                   f.int("activation_block", None, lo=1, hi=1 << 20))


@dataclasses.dataclass(frozen=True)
class ExpertMerge:
    """One kept expert that absorbed removed ones (exporter/merge.py): its weights become
    weight x its own + sum(w x aligned source)."""
    into: int
    weight: float
    sources: tuple[tuple[int, float], ...]  # (removed expert id, coefficient)

    def to_json(self) -> dict:
        return {"into": self.into, "weight": self.weight, "sources": [[e, w] for e, w in self.sources]}

    @classmethod
    def read(cls, f: Fields, kept: set[int], removed: set[int]) -> "ExpertMerge":
        into = f.int("into", lo=0, hi=MAX_EXPERTS)
        if into not in kept:
            f.fail(f"expert {into} is not kept", "into")
        sources = []
        for i, pair in enumerate(f.list("sources", max_len=MAX_EXPERTS)):
            where = f"{f.where('sources')}[{i}]"
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                    and not isinstance(pair[0], bool) and pair[0] in removed):
                raise f.error(f"{where}: expected [removed expert id, coefficient]")
            sources.append((pair[0], check_float(pair[1], where, f.error, lo=0.0, hi=1.0)))
        weight = f.float("weight", lo=0.0, hi=1.0)
        if not sources or abs(weight + sum(w for _, w in sources) - 1.0) > 1e-6:
            f.fail("a merge needs sources and coefficients that sum to 1", "sources")
        return cls(into, weight, tuple(sources))


@dataclasses.dataclass(frozen=True)
class PruningRecord:
    """How the kept experts were chosen (calibration/pruning.py), for `inspect` and users; with
    --prune-method merge, which removed experts each kept one absorbed (the export and the
    reference both apply it)."""
    fraction: float
    criterion: str
    scope: str
    removed_experts: int
    routed_experts: int
    bytes_saved: int
    bytes_per_expert: int
    refused_removals: int
    layers: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # layer -> (kept, removed)
    calibration: dict | None = None  # the profile's model identity and data sources, as recorded
    method: str = "drop"  # "drop" | "merge"
    merges: dict[int, tuple[ExpertMerge, ...]] = dataclasses.field(default_factory=dict)  # layer -> merges

    @property
    def calibration_paths(self) -> list[str]:
        data = (self.calibration or {}).get("data") or []
        return [str(d.get("path")) for d in data if isinstance(d, dict)]

    def to_json(self) -> dict:
        layers = {}
        for i, (k, r) in self.layers.items():
            layers[str(i)] = {"kept": list(k), "removed": list(r)}
            if self.merges.get(i):
                layers[str(i)]["merged"] = [m.to_json() for m in self.merges[i]]
        out = {"fraction": self.fraction, "criterion": self.criterion, "scope": self.scope,
               "removed_experts": self.removed_experts, "routed_experts": self.routed_experts,
               "bytes_saved": self.bytes_saved, "bytes_per_expert": self.bytes_per_expert,
               "refused_removals": self.refused_removals, "layers": layers}
        if self.method != "drop":
            out["method"] = self.method
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    @classmethod
    def read(cls, f: Fields) -> "PruningRecord":
        layers, merges = {}, {}
        for name, entry in f.items("layers", max_len=MAX_LAYERS):
            if not name.isdigit():
                entry.fail(f"layer {name!r} is not a layer index")
            kept = entry.ints("kept", lo=0, hi=MAX_EXPERTS, max_len=MAX_EXPERTS)
            removed = entry.ints("removed", lo=0, hi=MAX_EXPERTS, max_len=MAX_EXPERTS)
            layers[int(name)] = (kept, removed)
            if entry.has("merged"):
                merged = tuple(ExpertMerge.read(m, set(kept), set(removed))
                               for m in entry.objs("merged", max_len=MAX_EXPERTS))
                sources = [e for m in merged for e, _ in m.sources]
                if len(set(sources)) != len(sources) or len({m.into for m in merged}) != len(merged):
                    entry.fail("an expert is merged twice", "merged")
                merges[int(name)] = merged
        calibration = f.mapping("calibration", None)
        method = f.str("method", "drop", choices=PRUNE_METHODS)
        if merges and method != "merge":
            f.fail("merged experts are listed but the method is not merge", "method")
        return cls(f.float("fraction", lo=0.0, hi=1.0), f.str("criterion", max_len=64), f.str("scope", max_len=64),
                   f.int("removed_experts", lo=0, hi=MAX_EXPERTS * MAX_LAYERS),
                   f.int("routed_experts", lo=0, hi=MAX_EXPERTS * MAX_LAYERS), f.int("bytes_saved", lo=0, hi=MAX_BYTES),
                   f.int("bytes_per_expert", lo=0, hi=MAX_BYTES), f.int("refused_removals", 0, lo=0, hi=1 << 30),
                   layers, calibration, method, merges)


@dataclasses.dataclass(frozen=True)
class Stats:
    parameters: int
    active_parameters_per_token: int
    weight_bytes: int
    decode_weight_bytes_per_token: int
    cache_bytes_per_token: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, f: Fields) -> "Stats":
        return cls(*(f.int(k, lo=0, hi=MAX_BYTES) for k in (
            "parameters", "active_parameters_per_token", "weight_bytes", "decode_weight_bytes_per_token",
            "cache_bytes_per_token")))


# ---- the native decoder's index (exporter/native_index.py, runtime/native_backend.py) -------------
NATIVE_BLOCKS = (32, 64, 128)
NATIVE_DTYPES = {"float32": 4, "uint8": 1}
NATIVE_LAYER_ROLES = ("attn_norm", "qkv", "q_a_norm", "q_b", "kv_norm", "w_uk", "w_uv", "o_proj", "mlp_norm",
                      "gate_up", "down")
NATIVE_LINEAR_ROLES = ("qkv", "q_b", "o_proj", "gate_up", "down", "head")
NATIVE_GLOBALS = ("embed", "inv_freq", "final_norm", "head")


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """An initializer's bytes in one of the bundle's external-data files."""
    file: str
    offset: int
    bytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"file": self.file, "offset": self.offset, "bytes": self.bytes, "dtype": self.dtype,
                "shape": list(self.shape)}

    @classmethod
    def read(cls, f: Fields) -> "TensorRef":
        dtype = f.str("dtype", choices=tuple(NATIVE_DTYPES))
        shape = f.ints("shape", lo=1, hi=1 << 31, max_len=4)
        size = f.int("bytes", lo=1, hi=MAX_BYTES)
        count = 1
        for d in shape:
            count *= d
        if count * NATIVE_DTYPES[dtype] != size:
            f.fail(f"{size} bytes for a {dtype} tensor of shape {list(shape)}", "bytes")
        return cls(check_name(f.str("file"), f.where("file"), f.error), f.int("offset", lo=0, hi=MAX_BYTES), size,
                   dtype, tuple(shape))


@dataclasses.dataclass(frozen=True)
class NativeLinear:
    """A projection as the graph computes it: fp32 (the MatMul weight, stored [cols, total],
    columns col_start..col_start+rows) or MatMulNBits rows (q [rows, blocks, B*bits/8], scales)."""
    bits: int
    block: int | None
    rows: int
    cols: int
    activations: str  # "int8": the input rounded per block (accuracy_level 4); "fp32"
    weight: TensorRef  # fp32 weight or packed q
    scales: TensorRef | None
    col_start: int = 0
    bias: TensorRef | None = None
    layout: str = "matmul"  # fp32: "matmul" (stored [cols, total]) or "rows" ([rows, cols]: a head tied to the embedding)

    def to_json(self) -> dict:
        out = {"bits": self.bits, "block": self.block, "rows": self.rows, "cols": self.cols,
               "activations": self.activations, "weight": self.weight.to_json()}
        if self.layout != "matmul":
            out["layout"] = self.layout
        if self.scales is not None:
            out["scales"] = self.scales.to_json()
        if self.col_start:
            out["col_start"] = self.col_start
        if self.bias is not None:
            out["bias"] = self.bias.to_json()
        return out

    @classmethod
    def read(cls, f: Fields) -> "NativeLinear":
        bits, rows, cols = f.int("bits"), f.int("rows", lo=1, hi=1 << 24), f.int("cols", lo=1, hi=1 << 24)
        if bits not in (4, 8, 32):
            f.fail(f"{bits} bits; a native projection is fp32, 8 or 4 bits", "bits")
        block = f.int("block", None)
        weight = TensorRef.read(f.obj("weight"))
        scales = TensorRef.read(f.obj("scales")) if f.has("scales") else None
        bias = TensorRef.read(f.obj("bias")) if f.has("bias") else None
        col_start = f.int("col_start", 0, lo=0, hi=1 << 24)
        acts = f.str("activations", choices=("int8", "fp32"))
        layout = f.str("layout", "matmul", choices=("matmul", "rows"))
        if bits == 32 and layout == "rows":
            if weight.dtype != "float32" or weight.shape != (rows, cols) or col_start:
                f.fail(f"an fp32 weight of shape {list(weight.shape)} for {rows} x {cols} rows", "weight")
        elif bits == 32:
            if weight.dtype != "float32" or len(weight.shape) != 2 or weight.shape[0] != cols or \
                    col_start + rows > weight.shape[1]:
                f.fail(f"an fp32 weight of shape {list(weight.shape)} cannot hold {rows} x {cols} from column "
                       f"{col_start}", "weight")
        else:
            if block not in NATIVE_BLOCKS:
                f.fail(f"block {block}; the native decoder takes {', '.join(map(str, NATIVE_BLOCKS))}", "block")
            nb = -(-cols // block)
            if weight.dtype != "uint8" or weight.shape != (rows, nb, block * bits // 8):
                f.fail(f"packed weights of shape {list(weight.shape)} for {rows} x {cols} at {bits} bits, block {block}",
                       "weight")
            if scales is None or scales.dtype != "float32" or scales.shape != (rows * nb,):
                f.fail("the scales are missing or do not match the weights", "scales")
        if bias is not None and (bias.dtype != "float32" or bias.shape != (rows,)):
            f.fail(f"a bias of shape {list(bias.shape)} for {rows} rows", "bias")
        return cls(bits, block, rows, cols, acts, weight, scales, col_start, bias, layout)


def _native_role(f: Fields, role: str) -> "TensorRef | NativeLinear":
    return NativeLinear.read(f.obj(role)) if role in NATIVE_LINEAR_ROLES else TensorRef.read(f.obj(role))


@dataclasses.dataclass(frozen=True)
class NativeRouted:
    """A fused bundle's routed experts as its MoE / QMoE op holds them (exporter/lowering.py):
    fc1 [S*E, 2I/S, D] with gate and up rows interleaved, fc2 [S*E, D, I/S] times `fold`
    (routed_scaling_factor x S); slot s*E + e is shard s of expert e. Packed and with scales at 8
    or 4 bits. The router is columns router_col.. of an fp32 MatMul weight [D, total]."""
    bits: int  # 32: fp32 weights
    block: int | None
    activations: str  # "int8": inputs rounded per block (QMoE's 8-bit path, accuracy_level 4)
    shards: int
    fold: float
    fc1: TensorRef
    fc2: TensorRef
    fc1_scales: TensorRef | None
    fc2_scales: TensorRef | None
    router: TensorRef
    router_col: int
    bias: TensorRef | None
    groups: tuple[int, ...]

    def to_json(self) -> dict:
        out = {"bits": self.bits, "block": self.block, "activations": self.activations, "shards": self.shards,
               "fold": self.fold, "fc1": self.fc1.to_json(), "fc2": self.fc2.to_json()}
        if self.fc1_scales is not None:
            out.update(fc1_scales=self.fc1_scales.to_json(), fc2_scales=self.fc2_scales.to_json())
        out.update(router=self.router.to_json(), router_col=self.router_col, groups=list(self.groups))
        if self.bias is not None:
            out["bias"] = self.bias.to_json()
        return out

    def refs(self) -> list[TensorRef]:
        return [r for r in (self.fc1, self.fc2, self.fc1_scales, self.fc2_scales, self.router, self.bias) if r]

    @classmethod
    def read(cls, f: Fields, experts: int, hidden: int, inter: int) -> "NativeRouted":
        bits = f.int("bits")
        if bits not in (4, 8, 32):
            f.fail(f"{bits} bits; routed experts are fp32, 8 or 4 bits", "bits")
        shards = f.int("shards", lo=1, hi=64)
        if inter % shards:
            f.fail(f"{shards} shards do not divide the {inter} intermediate units", "shards")
        part, slots = inter // shards, shards * experts
        fc1, fc2 = TensorRef.read(f.obj("fc1")), TensorRef.read(f.obj("fc2"))
        block, s1, s2 = None, None, None
        if bits == 32:
            want = {"fc1": (fc1, "float32", (slots, 2 * part, hidden)), "fc2": (fc2, "float32", (slots, hidden, part))}
        else:
            block = f.int("block")
            if block not in NATIVE_BLOCKS or part % block:
                f.fail(f"block {block} for {part}-unit shards (the native decoder takes "
                       f"{', '.join(map(str, NATIVE_BLOCKS))}, dividing the shard)", "block")
            s1, s2 = TensorRef.read(f.obj("fc1_scales")), TensorRef.read(f.obj("fc2_scales"))
            nb = -(-hidden // block)
            want = {"fc1": (fc1, "uint8", (slots, 2 * part, nb * block * bits // 8)),
                    "fc2": (fc2, "uint8", (slots, hidden, part * bits // 8)),
                    "fc1_scales": (s1, "float32", (slots, 2 * part, nb)),
                    "fc2_scales": (s2, "float32", (slots, hidden, part // block))}
        for key, (ref, dtype, shape) in want.items():
            if ref.dtype != dtype or ref.shape != shape:
                f.fail(f"{ref.dtype} {list(ref.shape)}, expected {dtype} {list(shape)}", key)
        router = TensorRef.read(f.obj("router"))
        col = f.int("router_col", lo=0, hi=1 << 24)
        if router.dtype != "float32" or len(router.shape) != 2 or router.shape[0] != hidden or \
                col + experts > router.shape[1]:
            f.fail(f"a router of shape {list(router.shape)} cannot hold {hidden} x {experts} from column {col}",
                   "router")
        bias = TensorRef.read(f.obj("bias")) if f.has("bias") else None
        if bias is not None and (bias.dtype != "float32" or bias.shape != (experts,)):
            f.fail(f"a correction bias of shape {list(bias.shape)} for {experts} experts", "bias")
        groups = f.ints("groups", lo=0, hi=MAX_EXPERTS, max_len=MAX_EXPERTS)
        if len(groups) != experts:
            f.fail(f"{len(groups)} routing groups for {experts} experts", "groups")
        acts = f.str("activations", choices=("int8", "fp32"))
        if bits == 32 and acts != "fp32":
            f.fail("fp32 experts take fp32 activations", "activations")
        return cls(bits, block, acts, shards, f.float("fold", lo=0.0, lo_open=True, hi=1e6), fc1, fc2, s1, s2, router,
                   col, bias, tuple(groups))


@dataclasses.dataclass(frozen=True)
class NativeLayer:
    roles: dict  # role -> TensorRef | NativeLinear
    routed: NativeRouted | None = None  # fused bundles' MoE layers; paged bundles' experts are in the store

    def to_json(self) -> dict:
        out = {role: value.to_json() for role, value in self.roles.items()}
        if self.routed is not None:
            out["routed"] = self.routed.to_json()
        return out


def _read_native_layer(entry: Fields, cfg: ModelConfig, i: int) -> NativeLayer:
    """Layer i's roles (a decoder layer, or the MTP block's at index num_hidden_layers), shapes checked."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qdim, lora = H * (dn + dr), cfg.q_lora_rank is not None
    needed = ["attn_norm", "qkv", "kv_norm", "w_uk", "w_uv", "o_proj", "mlp_norm"]
    needed += ["q_a_norm", "q_b"] if lora else []
    needed += ["gate_up", "down"] if not cfg.is_moe_layer(i) or cfg.n_shared_experts else []
    roles = {role: _native_role(entry, role) for role in needed}
    inter = cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.is_moe_layer(i) else cfg.intermediate_size
    shapes = {"attn_norm": (D,), "kv_norm": (r,), "w_uk": (H, dn, r), "w_uv": (H, r, dv), "mlp_norm": (D,),
              "q_a_norm": (cfg.q_lora_rank,)}
    linears = {"qkv": ((cfg.q_lora_rank if lora else qdim) + r + dr, D), "q_b": (qdim, cfg.q_lora_rank),
               "o_proj": (D, H * dv), "gate_up": (2 * inter, D), "down": (D, inter)}
    for role, value in roles.items():
        if isinstance(value, TensorRef) and (value.shape != shapes[role] or value.dtype != "float32"):
            entry.fail(f"shape {list(value.shape)}, expected float32 {list(shapes[role])}", role)
        if isinstance(value, NativeLinear) and (value.rows, value.cols) != linears[role]:
            entry.fail(f"{value.rows} x {value.cols}, expected {linears[role][0]} x {linears[role][1]}", role)
    routed = None
    if entry.has("routed"):
        if not cfg.is_moe_layer(i):
            entry.fail("routed experts in a dense layer", "routed")
        routed = NativeRouted.read(entry.obj("routed"), cfg.num_experts(i), D, cfg.moe_intermediate_size)
    return NativeLayer(roles, routed)


def _linear_refs(value) -> list[TensorRef]:
    return [value] if isinstance(value, TensorRef) else [r for r in (value.weight, value.scales, value.bias) if r]


@dataclasses.dataclass(frozen=True)
class NativeMTP:
    """The MTP block (docs/mtp.md) as mtp.onnx holds it: its decoder layer (index num_hidden_layers),
    the two input norms, eh_proj [D, 2D] (fp32) and the head's norm. The embedding, rope and head
    are the decoder's (the MTP graph reads them from model.onnx.data too)."""
    layer: NativeLayer
    enorm: TensorRef
    hnorm: TensorRef
    eh_proj: NativeLinear
    norm: TensorRef

    def refs(self) -> list[TensorRef]:
        refs = [r for v in self.layer.roles.values() for r in _linear_refs(v)]
        refs += self.layer.routed.refs() if self.layer.routed else []
        return refs + [self.enorm, self.hnorm, self.norm] + _linear_refs(self.eh_proj)

    def to_json(self) -> dict:
        return {"layer": self.layer.to_json(), "enorm": self.enorm.to_json(), "hnorm": self.hnorm.to_json(),
                "eh_proj": self.eh_proj.to_json(), "norm": self.norm.to_json()}

    @classmethod
    def read(cls, f: Fields, cfg: ModelConfig) -> "NativeMTP":
        D = cfg.hidden_size
        norms = {name: TensorRef.read(f.obj(name)) for name in ("enorm", "hnorm", "norm")}
        for name, ref in norms.items():
            if ref.dtype != "float32" or ref.shape != (D,):
                f.fail(f"shape {list(ref.shape)}, expected float32 [{D}]", name)
        eh_proj = NativeLinear.read(f.obj("eh_proj"))
        if (eh_proj.bits, eh_proj.rows, eh_proj.cols) != (32, D, 2 * D):
            f.fail(f"{eh_proj.bits}-bit {eh_proj.rows} x {eh_proj.cols}, expected fp32 {D} x {2 * D}", "eh_proj")
        return cls(_read_native_layer(f.obj("layer"), cfg, cfg.num_hidden_layers), norms["enorm"], norms["hnorm"],
                   eh_proj, norms["norm"])


@dataclasses.dataclass(frozen=True)
class NativeSection:
    """Where the native decoder finds each weight in the bundle's files (docs/native.md).
    Shapes are checked against the model here; offsets against the files when the runtime loads."""
    version: int
    rope_scale: float
    latent_eps: float
    globals: dict  # embed, inv_freq, final_norm: TensorRef; head: NativeLinear
    layers: dict[int, NativeLayer]
    mtp: NativeMTP | None = None  # the MTP block, where the bundle has an MTP graph: drafting runs natively

    def refs(self) -> list[TensorRef]:
        """Every tensor the section names (one may be named twice: a weight shared by two roles)."""
        refs = []
        for value in [*self.globals.values(), *(v for layer in self.layers.values() for v in layer.roles.values())]:
            refs += _linear_refs(value)
        refs += [r for layer in self.layers.values() if layer.routed for r in layer.routed.refs()]
        return refs + (self.mtp.refs() if self.mtp else [])

    def files(self) -> set[str]:
        return {ref.file for ref in self.refs()}

    def to_json(self) -> dict:
        out = {"version": self.version, "rope_scale": self.rope_scale, "latent_eps": self.latent_eps,
               "globals": {k: v.to_json() for k, v in self.globals.items()},
               "layers": {str(i): layer.to_json() for i, layer in self.layers.items()}}
        if self.mtp is not None:
            out["mtp"] = self.mtp.to_json()
        return out

    @classmethod
    def read(cls, f: Fields, cfg: ModelConfig) -> "NativeSection":
        D, V, dr = cfg.hidden_size, cfg.vocab_size, cfg.qk_rope_head_dim
        g = f.obj("globals")
        globals_ = {role: _native_role(g, role) for role in NATIVE_GLOBALS}
        expect = {"embed": (V, D), "inv_freq": (dr // 2,), "final_norm": (D,)}
        for role, shape in expect.items():
            if globals_[role].shape != shape or globals_[role].dtype != "float32":
                g.fail(f"shape {list(globals_[role].shape)}, expected float32 {list(shape)}", role)
        if (globals_["head"].rows, globals_["head"].cols) != (V, D):
            g.fail("the head's shape is not vocab x hidden", "head")
        layers = {}
        for name, entry in f.items("layers", max_len=MAX_LAYERS):
            if not name.isdigit() or int(name) >= cfg.num_hidden_layers:
                entry.fail(f"layer {name!r} is not a layer of the model")
            layers[int(name)] = _read_native_layer(entry, cfg, int(name))
        if sorted(layers) != list(range(cfg.num_hidden_layers)):
            f.fail("the layers listed are not every layer of the model", "layers")
        mtp = NativeMTP.read(f.obj("mtp"), cfg) if f.has("mtp") else None
        return cls(f.int("version", lo=1, hi=1), f.float("rope_scale", lo=0.0, lo_open=True, hi=1e6),
                   f.float("latent_eps", lo=0.0, lo_open=True, hi=1.0), globals_, layers, mtp)
