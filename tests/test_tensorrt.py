"""TensorRT engines built on the device (targets/tensorrt_engine.py) and run by the torch-free
backend (runtime/tensorrt_backend.py).

Here (no TensorRT, no GPU): the pure parts, the errors a machine without TensorRT gives, and the
build and run plumbing against stand-ins for `tensorrt` and cuda-python whose "engines" run the
bundle's ONNX graphs in ONNX Runtime on host memory. The stand-ins encode the API as read from
the TensorRT 8.5/10.3/11.4 bindings; only the device tests at the end check it against the real
thing, and they are skipped (with the reason printed) wherever TensorRT or a GPU is missing.
"""

from __future__ import annotations

import ctypes
import enum
import json
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from dsexport.core.errors import BundleError, InternalError, UserError
from dsexport.core.manifest import Manifest
from dsexport.core.sections import EnginesSection, ShapeRange
from dsexport.runtime.bundle import read_bundle
from dsexport.runtime.tensorrt_backend import engine_mismatch, select_profile
from dsexport.targets.tensorrt_engine import (build_engines, builder_flags, check_profiles, engine_plan, fp32_layer,
                                              record_engines)

ROOT = Path(__file__).resolve().parents[1]
NO_TRT = "TensorRT is not installed: engine build and TensorRT generation need the device"


def _manifest(trt="10.3.0.30", gpu="Orin", cc="8.7") -> EnginesSection:
    return EnginesSection(trt, gpu, cc, "2026-12-01T00:00:00+00:00", "fp16", {})


# ---- pure parts ---------------------------------------------------------------------------------
def test_engine_mismatch_requires_the_same_tensorrt_release_and_compute_capability():
    assert engine_mismatch(_manifest(), "10.3.0.30", "Orin", "8.7") is None
    assert engine_mismatch(_manifest(), "10.3.0.26", "Orin", "8.7") is None  # the build number may differ
    assert engine_mismatch(_manifest(gpu="Orin"), "10.3.0", "NVIDIA Jetson Orin NX", "8.7") is None  # name: info only
    reason = engine_mismatch(_manifest(), "10.4.0.1", "Orin", "8.7")
    assert "TensorRT 10.3.0" in reason and "10.4.0" in reason and "--force" in reason and "\n" not in reason
    reason = engine_mismatch(_manifest(), "10.3.0.30", "NVIDIA H200", "9.0")
    assert "compute capability 8.7" in reason and "9.0" in reason and "NVIDIA H200" in reason
    assert "dsexport engine" in engine_mismatch(None, "10.3.0", "Orin", "8.7")
    assert engine_mismatch(_manifest(cc="unknown"), "10.3.0", "Orin", "8.7") is None  # TensorRT itself refuses


def test_select_profile_picks_the_first_range_holding_every_shape():
    prof = lambda lo, hi: {"input_ids": ShapeRange((1, lo), (1, lo), (1, hi)),
                           "past_latent.0": ShapeRange((1, 0, 8), (1, 0, 8), (1, 64, 8))}
    profiles = [prof(2, 16), prof(2, 128)]
    assert select_profile(profiles, {"input_ids": (1, 8), "past_latent.0": (1, 0, 8)}) == 0
    assert select_profile(profiles, {"input_ids": (1, 100), "past_latent.0": (1, 64, 8)}) == 1
    assert select_profile(profiles, {"input_ids": (1, 200), "past_latent.0": (1, 0, 8)}) is None
    assert select_profile(profiles, {"input_ids": (2, 8), "past_latent.0": (2, 0, 8)}) is None  # batch 2
    assert select_profile(profiles, {"attention_mask": (1, 8)}) is None  # no range for it


def test_check_profiles_names_the_uncovered_dynamic_input():
    inputs = {"input_ids": [-1, -1], "past_latent.0": [-1, -1, 8]}
    good = {"input_ids": ShapeRange((1, 1), (1, 1), (1, 1)),
            "past_latent.0": ShapeRange((1, 0, 8), (1, 4, 8), (1, 9, 8))}
    check_profiles("decoder", inputs, [good])
    with pytest.raises(BundleError, match="past_latent.0"):
        check_profiles("decoder", inputs, [{"input_ids": good["input_ids"]}])
    with pytest.raises(BundleError, match="does not fit"):  # a static dim must be exact
        check_profiles("decoder", inputs, [{**good, "past_latent.0": ShapeRange((1, 0, 8), (1, 0, 9), (1, 9, 9))}])
    with pytest.raises(BundleError, match="not an input"):
        check_profiles("decoder", inputs, [{**good, "nope": good["input_ids"]}])


def test_builder_flags_refuse_fp16_on_a_tensorrt_without_weak_typing():
    plan = types.SimpleNamespace(precision="fp16", strongly_typed=False, builder_flags=("FP16", "OBEY_PRECISION_CONSTRAINTS"))
    assert builder_flags(plan, {"FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32"}, "10.3.0") == list(plan.builder_flags)
    with pytest.raises(UserError, match="strongly typed.*must carry the fp16 precision") as e:
        builder_flags(plan, {"TF32", "DEBUG"}, "11.4.0")  # TensorRT 11's BuilderFlag
    assert "BuilderFlag.FP16" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BundleError, match="strongly typed plan"):
        builder_flags(types.SimpleNamespace(**{**vars(plan), "strongly_typed": True}), {"FP16"}, "10.3.0")


def test_fp32_layer_patterns_match_onnx_node_names_and_parser_suffixes():
    patterns = ["n_*layernorm*", "n_*self_attn_probs*"]
    assert fp32_layer("n_layers.0_input_layernorm_pow", patterns) == "n_*layernorm*"
    assert fp32_layer("n_layers.3_self_attn_probs_1", patterns) == "n_*self_attn_probs*"
    assert fp32_layer("n_layers.3_mlp_down", patterns) is None


def test_engine_plan_errors_name_the_bundle_problem(artifacts, jetson_bundle, tmp_path):
    with pytest.raises(BundleError, match="no tensorrt.engine_plan"):
        engine_plan(read_bundle(artifacts.export("v3_noaux_tc")).manifest, tmp_path)
    manifest = json.loads((jetson_bundle / "manifest.json").read_text())
    manifest["tensorrt"]["engine_plan"]["graphs"]["decoder"]["engine"] = "../x.plan"
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        Manifest.from_json(manifest)


# ---- without TensorRT --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jetson_bundle(artifacts) -> Path:
    """A bundle exported for a TensorRT target: one graph (decode and prompt MoE branches) and an engine plan."""
    from dsexport.build import BuildConfig, build_bundle

    path = artifacts.root / "trt_jetson_v3_noaux_tc"
    if not (path / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, target="jetson-orin-nano-8gb"))
    return path


@pytest.fixture
def bundle_copy(jetson_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(jetson_bundle, tmp_path / "bundle"))


def test_build_engines_without_tensorrt_is_a_one_line_user_error(bundle_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails here even where it is installed
    with pytest.raises(UserError) as e:
        build_engines(bundle_copy, log=lambda s: None)
    assert "TensorRT is not installed" in str(e.value) and "`dsexport engine`" in str(e.value)
    assert "\n" not in str(e.value) and not (bundle_copy / "engines").exists()


def test_loading_the_tensorrt_backend_without_tensorrt_says_so(bundle_copy, monkeypatch):
    from dsexport.core.errors import EngineUnavailable
    from dsexport.runtime import Engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        Engine.load(bundle_copy, backend="tensorrt")


def test_runtime_backend_imports_without_tensorrt_or_cuda(tmp_path):
    script = tmp_path / "edge.py"
    script.write_text(textwrap.dedent("""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorrt", "cuda", "torch", "onnx"):
                    raise ImportError(f"{name} is not installed here")
        sys.meta_path.insert(0, Refuse())
        from dsexport.runtime.tensorrt_backend import TensorRTBackend, engine_mismatch
        from dsexport.targets.tensorrt_engine import build_engines
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorrt", "cuda", "torch")))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- stand-ins for tensorrt and cuda-python ------------------------------------------------------
class Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class FakeCudart:
    """cuda.bindings.runtime on host memory: (err, value) tuples, as cuda-python returns them."""

    cudaError_t = Err
    cudaMemcpyKind = enum.Enum("K", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost cudaMemcpyDeviceToDevice")
    cudaDeviceAttr = enum.Enum("A", "cudaDevAttrMemoryPoolsSupported")
    cudaMemPoolAttr = enum.Enum("P", "cudaMemPoolAttrReleaseThreshold")

    def __init__(self, pooled: bool):
        self.pooled, self.blocks = pooled, {}

    def cudaGetDevice(self): return Err.cudaSuccess, 0
    def cudaGetDeviceProperties(self, dev): return Err.cudaSuccess, types.SimpleNamespace(name=b"Orin\0\0", major=8, minor=7)
    def cudaStreamCreate(self): return Err.cudaSuccess, 77
    def cudaStreamSynchronize(self, s): return (Err.cudaSuccess,)
    def cudaStreamDestroy(self, s): return (Err.cudaSuccess,)
    def cudaDeviceGetAttribute(self, attr, dev): return Err.cudaSuccess, int(self.pooled)
    def cudaDeviceGetDefaultMemPool(self, dev): return Err.cudaSuccess, "pool"
    def cudaMemPoolSetAttribute(self, pool, attr, value): return (Err.cudaSuccess,)
    def cudaGetErrorName(self, err): return Err.cudaSuccess, err.name.encode()

    def cudaMalloc(self, n):
        block = np.zeros(n, np.uint8)
        self.blocks[block.ctypes.data] = block
        return Err.cudaSuccess, block.ctypes.data

    def cudaMallocAsync(self, n, stream): return self.cudaMalloc(n)
    def cudaFree(self, ptr): del self.blocks[ptr]; return (Err.cudaSuccess,)  # noqa: E702
    def cudaFreeAsync(self, ptr, stream): return self.cudaFree(ptr)
    def cudaMemcpyAsync(self, dst, src, n, kind, stream): ctypes.memmove(dst, src, n); return (Err.cudaSuccess,)  # noqa: E702


def _host(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * max(n, 1)).from_address(ptr), dtype, int(np.prod(shape))).reshape(shape)


def fake_tensorrt(version: str, int_type: str = "int64", flags=("FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS"),
                  record: dict | None = None):
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    for t in ("float32", "float16", "int32", "int64", "bool"):
        setattr(trt, t, t)
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    record = record if record is not None else {}

    class Layer:
        def __init__(self, name):
            self.name, self.num_outputs, self.precision, self.types = name, 1, None, {}

        def get_output(self, j): return types.SimpleNamespace(dtype="float32")
        def set_output_type(self, j, t): self.types[j] = t

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.layers = flags, [], []
            self.num_inputs = self.num_layers = 0

        def get_input(self, i): return self.inputs[i]
        def get_layer(self, i): return self.layers[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger): self.network = network

        def parse_from_file(self, path):
            graph = onnx.load(path, load_external_data=False).graph
            net = self.network
            net.inputs = [types.SimpleNamespace(name=i.name, shape=[d.dim_value if d.HasField("dim_value") else -1
                                                                   for d in i.type.tensor_type.shape.dim])
                          for i in graph.input]
            net.layers = [Layer(n.name) for n in graph.node]
            net.num_inputs, net.num_layers = len(net.inputs), len(net.layers)
            return True

    class Config:
        def __init__(self): self.flags, self.cleared, self.profiles = set(), set(), []
        def set_memory_pool_limit(self, pool, n): self.workspace = n
        def set_flag(self, f): self.flags.add(f)
        def clear_flag(self, f): self.cleared.add(f)
        def add_optimization_profile(self, p): self.profiles.append(p)
        def create_timing_cache(self, data): return types.SimpleNamespace(data=data)
        def set_timing_cache(self, cache, ignore_mismatch): self.cache = cache; return True  # noqa: E702
        def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: self.cache.data + b"+")

    class Builder:
        def __init__(self, logger): self.logger = logger
        def create_network(self, flags): return Network(flags)
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            if record.get("fail"):
                self.logger.log(1, "Requested amount of GPU memory could not be allocated")
                return None
            record[len(record)] = (network, config)
            return json.dumps({"layers": [layer.name for layer in network.layers]}).encode()

    class Context:  # runs the graph in ONNX Runtime, reading and writing "device" memory
        def __init__(self, engine): self.engine, self.shapes, self.addr = engine, {}, {}
        def set_optimization_profile_async(self, index, stream): pass
        def set_input_shape(self, name, shape): self.shapes[name] = tuple(shape); return True  # noqa: E702

        def set_tensor_address(self, name, ptr):
            assert ptr, f"TensorRT needs a non-null address for {name}"
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            (b, t), p = self.shapes["input_ids"], self.shapes["past_latent.0"][1]
            return (b, t, self.engine.vocab) if name == "logits" else (b, p + t, self.engine.latent)

        def execute_async_v3(self, stream):
            feed = {n: _host(self.addr[n], s, self.engine.get_tensor_dtype(n)).astype(
                np.int64 if n in ("input_ids", "position_ids", "attention_mask") else np.float32)
                for n, s in self.shapes.items()}
            for name, value in zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feed)):
                out = _host(self.addr[name], self.get_tensor_shape(name), np.float32)
                out[...] = value
            return True

    class Engine:
        def __init__(self, spec):
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.vocab, self.latent = spec["vocab"], spec["latent"]
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.num_io_tensors = len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i): return (self.inputs + self.outputs)[i]
        def get_tensor_mode(self, n): return "in" if n in self.inputs else "out"
        def get_tensor_dtype(self, n): return int_type if n in ("input_ids", "position_ids", "attention_mask") else "float32"
        def create_execution_context(self): return Context(self)

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: Engine(json.loads(data))})
    return trt


def install(monkeypatch, trt=None, cudart=None) -> None:
    if trt is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if cudart is not None:
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, cudart
        for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, module)


# ---- build and run plumbing against the stand-ins -----------------------------------------------
def test_build_engines_writes_engines_cache_and_checksummed_manifest(bundle_copy, monkeypatch):
    record: dict = {}
    install(monkeypatch, fake_tensorrt("10.3.0.30", record=record), FakeCudart(pooled=True))
    lines: list[str] = []
    engines = build_engines(bundle_copy, log=lines.append)
    plan = json.loads((bundle_copy / "manifest.json").read_text())["tensorrt"]["engine_plan"]
    assert engines.files == {"decoder": "engines/decoder.plan"}
    assert (engines.gpu, engines.compute_capability, engines.tensorrt_version) == ("Orin", "8.7", "10.3.0.30")
    bundle = read_bundle(bundle_copy, verify=True)  # the new files are checksummed
    assert {"engines/decoder.plan", "engines/timing.cache"} <= set(bundle.manifest.to_json()["files"])
    assert (bundle_copy / "engines" / "timing.cache").read_bytes() == b"+"  # written by the (one) engine build
    network, config = record[0]
    assert network.flags == 1  # EXPLICIT_BATCH where the enum has it
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"} and config.cleared == {"TF32"}
    assert config.workspace == plan["workspace_bytes"] and len(config.profiles) == len(plan["graphs"]["decoder"]["profiles"])
    pinned = [layer.name for layer in network.layers if layer.precision == "float32"]
    assert any("layernorm" in n for n in pinned) and any("self_attn_probs" in n for n in pinned)
    assert all(fp32_layer(n, plan["fp32_layers"]) for n in pinned)
    assert not [f for f in (bundle_copy / "engines").iterdir() if f.name.startswith(".")]  # no temp files left
    with pytest.raises(UserError, match="--force"):
        build_engines(bundle_copy, log=lines.append)
    assert build_engines(bundle_copy, log=lines.append, force=True).files == engines.files
    before = {f.name: f.read_bytes() for f in [*(bundle_copy / "engines").iterdir(), bundle_copy / "manifest.json"]}
    record["fail"] = True
    with pytest.raises(InternalError, match="could not build the decoder engine: Requested amount of GPU memory"):
        build_engines(bundle_copy, log=lines.append, force=True)
    assert {f.name: f.read_bytes() for f in [*(bundle_copy / "engines").iterdir(), bundle_copy / "manifest.json"]} \
        == before  # a failed rebuild leaves the previous engines, no temp files, the same manifest


def test_build_engines_on_tensorrt_11_asks_for_a_strongly_typed_graph(bundle_copy, monkeypatch):
    install(monkeypatch, fake_tensorrt("11.4.0.106", flags=("TF32", "DEBUG")), FakeCudart(pooled=True))
    with pytest.raises(UserError, match="strongly typed"):
        build_engines(bundle_copy, log=lambda s: None)


@pytest.mark.parametrize("version,int_type,pooled", [("10.3.0.30", "int64", True), ("8.5.2.2", "int32", False)])
def test_backend_generates_what_onnxruntime_generates(bundle_copy, monkeypatch, version, int_type, pooled):
    from dsexport.runtime import Engine
    from dsexport.core.files import atomic_write

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    model = manifest["model"]
    files = {}
    for role, graph in manifest["tensorrt"]["engine_plan"]["graphs"].items():
        spec = {"onnx": str(bundle_copy / graph["file"]), "vocab": model["vocab_size"],
                "latent": model["kv_lora_rank"] + model["qk_rope_head_dim"]}
        (bundle_copy / graph["engine"]).parent.mkdir(exist_ok=True)
        atomic_write(bundle_copy / graph["engine"], json.dumps(spec).encode())
        files[role] = graph["engine"]
    manifest = record_engines(Manifest.from_json(manifest), bundle_copy, files, list(files.values()), version, "Orin",
                              "8.7", "fp16").to_json()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    cudart = FakeCudart(pooled)
    install(monkeypatch, fake_tensorrt(version, int_type), cudart)

    reference = Engine.load(bundle_copy)
    engine = Engine.load(bundle_copy, backend="tensorrt")
    prompts = [[5, 9, 2, 7, 11, 3], [4], [8, 1, 6]]
    for prompt in prompts:
        assert (engine.generate(prompt, max_new_tokens=6, ignore_eos=True).output_ids
                == reference.generate(prompt, max_new_tokens=6, ignore_eos=True).output_ids)
    with pytest.raises(UserError, match="batch 3"):  # the plan's profiles stop at max_batch 1
        engine.generate_batch(prompts, max_new_tokens=5, ignore_eos=True)
    ids = np.array([prompts[0]])
    logits, cache = engine.forward(ids, np.arange(6)[None], np.ones_like(ids), engine.empty_cache(1))
    expected, _ = reference.forward(ids, np.arange(6)[None], np.ones_like(ids), reference.empty_cache(1))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert logits.dtype == np.float32 and cache[0].shape == (1, 6, model["kv_lora_rank"] + model["qk_rope_head_dim"])
    del cache
    engine.backend.close()
    assert not cudart.blocks  # every cache, scratch and logits buffer was freed

    manifest["engines"]["compute_capability"] = "7.2"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="compute capability 7.2"):
        Engine.load(bundle_copy, backend="tensorrt")


# ---- on the device: real TensorRT and a GPU --------------------------------------------------------
@pytest.fixture(scope="module")
def device():
    try:
        import tensorrt
    except ImportError:
        pytest.skip(NO_TRT)
    from dsexport.core.errors import EngineUnavailable
    from dsexport.runtime.tensorrt_backend import _cudart, device_info

    if _cudart() is None:
        pytest.skip("cuda-python is not installed: the TensorRT backend needs it (pip install dsexport[tensorrt])")
    try:
        return tensorrt, device_info()
    except EngineUnavailable as e:
        pytest.skip(f"no GPU for TensorRT: {e}")


@pytest.fixture(scope="module")
def device_bundle(device, artifacts, tmp_path_factory) -> Path:
    from dsexport.build import BuildConfig, build_bundle

    trt, _ = device
    path = tmp_path_factory.mktemp("trt") / "bundle"
    version = ".".join(trt.__version__.split(".")[:2])
    build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, target="cuda-gpu", precision="fp32",
                             tensorrt=version, max_context=256))
    build_engines(path, log=print)
    return path


def test_device_tensorrt_greedy_tokens_match_onnxruntime(device_bundle):
    from dsexport.runtime import Engine
    from dsexport.runtime.validate import teacher_forced_logits

    reference, engine = Engine.load(device_bundle), Engine.load(device_bundle, backend="tensorrt")
    for prompt in ([5, 9, 2, 7, 11, 3, 1, 4], [4], [8, 1, 6]):
        want = reference.generate(prompt, max_new_tokens=16, ignore_eos=True).output_ids
        got = engine.generate(prompt, max_new_tokens=16, ignore_eos=True).output_ids
        ref_logits = teacher_forced_logits(reference, prompt + want)[len(prompt) - 1:-1]
        np.testing.assert_allclose(teacher_forced_logits(engine, prompt + want)[len(prompt) - 1:-1], ref_logits,
                                   atol=1e-3)  # fp32, TF32 off
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        if n < len(want):  # only a near-tie may resolve differently
            top2 = np.sort(ref_logits[n])[-2:]
            assert top2[1] - top2[0] <= 2e-3, f"greedy token {n} differs: {got} vs {want}"


def test_device_refuses_engines_of_another_tensorrt(device_bundle):
    manifest = json.loads((device_bundle / "manifest.json").read_text())
    wrong = {**manifest, "engines": {**manifest["engines"], "tensorrt_version": "9.9.9"}}
    from dsexport.runtime.bundle import Bundle
    from dsexport.runtime.tensorrt_backend import TensorRTBackend

    with pytest.raises(BundleError, match="TensorRT 9.9.9"):
        TensorRTBackend.load(Bundle(device_bundle, wrong))
    with pytest.raises(UserError, match="--force"):
        build_engines(device_bundle, log=print)
