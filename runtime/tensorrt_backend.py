"""Run a bundle's TensorRT engines (built on the device by `dsexport engine`). No torch.

    backend = TensorRTBackend.load(read_bundle("dist/mymodel"))
    logits, cache = backend.forward(ids, positions, mask, backend.empty_cache(1))

The latent cache stays on the GPU: each step's `present_latent.{i}` buffers are handed back as
the next step's `past_latent.{i}` (docs/graph-contract.md). `tensorrt` and cuda-python are
imported only when a backend is loaded, so this module imports anywhere.

API notes (checked against the TensorRT 8.5.3 / 10.3 / 11.4 Python bindings and NVIDIA's
samples/python/common_runtime.py): TensorRT 8.5 added the name-based I/O API
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`), which 10.x keeps and which is the
only one left in 10+; older engines fall back to the binding list and `execute_async_v2`.
TensorRT 8.5's ONNX parser turns int64 graph inputs into int32 bindings, so input dtypes are
taken from the engine, never assumed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from dsexport.core.contract import LOGITS, past_name, present_name
from dsexport.core.errors import BundleError, EngineUnavailable, InternalError, UserError
from dsexport.core.sections import EnginesSection

from .backends import token_feed
from .bundle import Bundle

# Jetson boards whose GPU is known from /proc/device-tree/model when nothing else answers.
_JETSON_CC = (("Thor", "11.0"), ("Orin", "8.7"), ("Xavier", "7.2"))


def import_tensorrt(who: str = "TensorRT engines run"):
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailable(f"TensorRT is not installed (import tensorrt failed): {who} on the device, "
                                "where JetPack provides it") from None
    return tensorrt


def _cudart():
    try:  # cuda-python >= 12.6 (cuda-bindings)
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # older cuda-python (JetPack 5's CUDA 11.4 needs cuda-python 11.x)
            from cuda import cudart
        except ImportError:
            return None
    return cudart


def _trt_version(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def engine_mismatch(engines: EnginesSection | None, trt_version: str, gpu: str, compute_capability: str) -> str | None:
    """Why the bundle's engines cannot run here, in one line, or None when they can.

    TensorRT engines are tied to the TensorRT release (major.minor.patch) and to the GPU's
    compute capability. The GPU name is reported but not compared: every Jetson Orin module
    calls its GPU "Orin", and boards of one compute capability share a JetPack.
    """
    if engines is None:
        return "the bundle has no TensorRT engines: build them on this device with `dsexport engine BUNDLE`"
    built_trt, built_cc = _trt_version(engines.tensorrt_version), engines.compute_capability
    built_on = f"TensorRT {built_trt} on {engines.gpu or 'an unknown GPU'} (compute capability {built_cc})"
    here = f"this device has TensorRT {_trt_version(trt_version)} and {gpu} ({compute_capability})"
    rebuild = "rebuild them here with `dsexport engine BUNDLE --force`"
    if built_trt != _trt_version(trt_version):
        return f"the engines were built with {built_on}; {here}: {rebuild}"
    if built_cc not in (None, "", "unknown") and str(built_cc) != str(compute_capability):
        return f"the engines were built for {built_on}; {here}: {rebuild}"
    return None


def device_info() -> tuple[str, str]:
    """(GPU name, compute capability "M.m") without torch: cuda-python, nvidia-smi, or the Jetson device tree."""
    cudart = _cudart()
    if cudart is not None:
        err, dev = cudart.cudaGetDevice()
        if err == cudart.cudaError_t.cudaSuccess:
            err, prop = cudart.cudaGetDeviceProperties(dev)
            if err == cudart.cudaError_t.cudaSuccess:
                return _text(prop.name), f"{prop.major}.{prop.minor}"
    try:  # `compute_cap` needs a driver from 2021 or later
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        first = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        name, _, cc = first.rpartition(",")
        if name and cc.strip().replace(".", "").isdigit():
            return name.strip(), cc.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    model = Path("/proc/device-tree/model")  # Jetson: nvidia-smi may be missing or limited
    if model.is_file():
        text = model.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
        for key, cc in _JETSON_CC:
            if key in text:
                return text, cc
        return text, "unknown"
    raise EngineUnavailable("no NVIDIA GPU found (cuda-python, nvidia-smi and /proc/device-tree/model all failed): "
                            "TensorRT engines run on the device")


def _text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode(errors="replace")
    return str(value).strip()


def select_profile(profiles, shapes: dict[str, tuple]) -> int | None:
    """Index of the first optimization profile whose [min, max] range holds every given shape."""
    for index, profile in enumerate(profiles):
        ok = True
        for name, shape in shapes.items():
            rng = profile.get(name)
            if rng is None or len(rng.min) != len(shape) or not all(
                    lo <= s <= hi for lo, s, hi in zip(rng.min, shape, rng.max)):
                ok = False
                break
        if ok:
            return index
    return None


class _Cuda:
    """The few cuda-python runtime calls the backend needs, with errors turned into dsexport's."""

    def __init__(self):
        rt = _cudart()
        if rt is None:
            raise EngineUnavailable("cuda-python is not installed (pip install \"dsexport[tensorrt]\", or cuda-python "
                                    "matching the device's CUDA): the TensorRT backend needs it for GPU memory")
        self.rt = rt
        err, self.device = rt.cudaGetDevice()
        if err != rt.cudaError_t.cudaSuccess:
            raise EngineUnavailable(f"no usable CUDA GPU ({self._name(err)}): TensorRT engines run on the device")
        prop = self.call(rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        self.gpu, self.cc = _text(prop.name), f"{prop.major}.{prop.minor}"
        self.stream = self.call(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)
        self.closed = False
        # Stream-ordered allocation (CUDA 11.2+, where the device supports memory pools) reuses
        # freed cache buffers instead of a cudaMalloc/cudaFree pair per layer and step.
        attr = getattr(rt.cudaDeviceAttr, "cudaDevAttrMemoryPoolsSupported", None)
        self.pooled = attr is not None and bool(self.call(rt.cudaDeviceGetAttribute(attr, self.device), "attr"))
        if self.pooled:
            try:  # keep freed blocks in the pool across synchronizations (default threshold 0 returns them)
                try:  # the value type lives in the driver module
                    from cuda.bindings.driver import cuuint64_t
                except ImportError:
                    from cuda.cuda import cuuint64_t
                pool = self.call(rt.cudaDeviceGetDefaultMemPool(self.device), "cudaDeviceGetDefaultMemPool")
                self.call(rt.cudaMemPoolSetAttribute(pool, rt.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                                     cuuint64_t(2**64 - 1)), "cudaMemPoolSetAttribute")
            except (ImportError, AttributeError, TypeError, InternalError):
                pass  # only slower

    def _name(self, err) -> str:
        try:
            return _text(self.rt.cudaGetErrorName(err)[1])
        except Exception:  # the name is only for the message
            return str(err)

    def call(self, result, what: str):
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            if err == self.rt.cudaError_t.cudaErrorMemoryAllocation:
                raise EngineUnavailable(f"out of GPU memory in {what}")
            raise InternalError(f"CUDA error {self._name(err)} in {what}")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        if self.pooled and not self.closed:
            return int(self.call(self.rt.cudaMallocAsync(nbytes, self.stream), f"cudaMallocAsync({nbytes})"))
        return int(self.call(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        if self.pooled and not self.closed:
            self.call(self.rt.cudaFreeAsync(ptr, self.stream), "cudaFreeAsync")
        else:  # synchronizes: safe once the stream is gone
            self.call(self.rt.cudaFree(ptr), "cudaFree")

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        kinds = {"h2d": "cudaMemcpyHostToDevice", "d2h": "cudaMemcpyDeviceToHost", "d2d": "cudaMemcpyDeviceToDevice"}
        self.call(self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kinds[kind]), self.stream),
                  f"cudaMemcpyAsync {kind}")

    def sync(self) -> None:
        self.call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if not self.closed:
            self.sync()
            self.closed = True
            self.call(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")


class DeviceTensor:
    """A dense tensor in GPU memory: one layer's latent cache, opaque to the caller."""

    def __init__(self, cuda: _Cuda, shape: tuple, dtype):
        self.cuda, self.shape, self.dtype = cuda, tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        # TensorRT wants a non-null address even for an empty tensor (past_seq = 0): one element.
        self.ptr = cuda.malloc(max(self.nbytes, self.dtype.itemsize))

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            self.cuda.copy(out.ctypes.data, self.ptr, self.nbytes, "d2h")
        self.cuda.sync()
        return out

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.cuda.free(ptr)

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: the process frees GPU memory anyway
            pass


class _Runner:
    """One engine, its execution context, and its I/O description."""

    def __init__(self, trt, cuda: _Cuda, engine, graph: str, profiles):
        self.trt, self.cuda, self.engine, self.graph, self.profiles = trt, cuda, engine, graph, profiles
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineUnavailable(f"TensorRT could not create an execution context for the {graph} engine "
                                    "(out of GPU memory?)")
        self.profile = 0
        self.named = hasattr(self.context, "execute_async_v3") and hasattr(engine, "num_io_tensors")
        if self.named:  # TensorRT >= 8.5
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
            self.dtypes = {n: _np_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
            host = [n for n in self.inputs if hasattr(engine, "is_shape_inference_io") and engine.is_shape_inference_io(n)]
            if host:
                raise InternalError(f"the {graph} engine takes {host[0]} as a shape tensor; the graph contract "
                                    "has no shape tensors")
        else:  # TensorRT < 8.5: bindings, repeated once per optimization profile
            self.per_profile = engine.num_bindings // max(engine.num_optimization_profiles, 1)
            names = [engine.get_binding_name(i) for i in range(self.per_profile)]
            self.inputs = {n for i, n in enumerate(names) if engine.binding_is_input(i)}
            self.dtypes = {n: _np_dtype(trt, engine.get_binding_dtype(i)) for i, n in enumerate(names)}
        self.names = names

    def run(self, profile: int, inputs: dict[str, tuple[int, tuple]], outputs: dict[str, DeviceTensor | None]):
        """inputs: name -> (device pointer, shape); outputs: name -> None, filled with new DeviceTensors."""
        ctx, cuda = self.context, self.cuda
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, cuda.handle)
            self.profile = profile
        if self.named:
            for name, (ptr, shape) in inputs.items():
                if not ctx.set_input_shape(name, shape):
                    raise UserError(f"{self.graph} engine: shape {list(shape)} of {name} is outside profile {profile}")
                ctx.set_tensor_address(name, ptr)
            for name in outputs:
                outputs[name] = DeviceTensor(cuda, self._shape(ctx.get_tensor_shape(name), name), self.dtypes[name])
                ctx.set_tensor_address(name, outputs[name].ptr)
            ok = ctx.execute_async_v3(cuda.handle)
        else:
            base = profile * self.per_profile
            bindings = [0] * self.engine.num_bindings
            for name, (ptr, shape) in inputs.items():
                index = base + self.names.index(name)
                if not ctx.set_binding_shape(index, shape):
                    raise UserError(f"{self.graph} engine: shape {list(shape)} of {name} is outside profile {profile}")
                bindings[index] = ptr
            for name in outputs:
                index = base + self.names.index(name)
                outputs[name] = DeviceTensor(cuda, self._shape(ctx.get_binding_shape(index), name), self.dtypes[name])
                bindings[index] = outputs[name].ptr
            ok = ctx.execute_async_v2(bindings, cuda.handle)
        if not ok:
            raise InternalError(f"TensorRT failed to enqueue the {self.graph} engine (see the TensorRT log)")

    def close(self) -> None:
        self.context = None  # a context goes before its engine
        self.engine = None

    def _shape(self, dims, name: str) -> tuple:
        shape = tuple(int(d) for d in dims)
        if any(d < 0 for d in shape):
            raise InternalError(f"{self.graph} engine: the shape of {name} is not known from the inputs ({shape})")
        return shape


def _np_dtype(trt, dtype) -> np.dtype:
    table = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "int8": np.int8,
             "uint8": np.uint8, "bool": np.bool_}
    for name, np_type in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return np.dtype(np_type)
    raise InternalError(f"engine tensor type {dtype} has no numpy equivalent")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, trt, cuda: _Cuda, runtime, logger, runners: dict[str, _Runner], num_layers: int,
                 latent_dim: int):
        self.trt, self.cuda, self._runtime, self._logger = trt, cuda, runtime, logger
        self.runners = runners
        self.num_layers, self.latent_dim = num_layers, latent_dim
        self.cache_dtype = runners["decoder"].dtypes[past_name(0)]
        self._scratch: dict[str, DeviceTensor] = {}

    @classmethod
    def load(cls, bundle: Bundle, options=None) -> "TensorRTBackend":
        if bundle.manifest.tensorrt is None:
            raise BundleError(f"{bundle.directory}: not a TensorRT bundle (no tensorrt.engine_plan in the manifest)")
        trt = import_tensorrt()
        cuda = _Cuda()
        try:
            return cls._load(trt, cuda, bundle)
        except BaseException:
            try:
                cuda.close()
            except Exception:  # keep the first error
                pass
            raise

    @classmethod
    def _load(cls, trt, cuda: _Cuda, bundle: Bundle) -> "TensorRTBackend":
        manifest, directory = bundle.manifest, bundle.directory
        plan = manifest.tensorrt.engine_plan
        reason = engine_mismatch(manifest.engines, trt.__version__, cuda.gpu, cuda.cc)
        if reason:
            raise BundleError(f"{directory}: {reason}")
        model = manifest.model
        layers, latent = model.num_hidden_layers, model.latent_dim
        io = set(manifest.graphs.decoder.contract.input_names()) | {LOGITS} | {present_name(i) for i in range(layers)}
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        runners = {}
        for graph, rel in manifest.engines.files.items():
            path = bundle.path(rel, f"engines.files.{graph}")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT {trt.__version__} cannot load this engine (see the TensorRT log); "
                                  f"rebuild it with `dsexport engine {directory} --force`")
            if graph not in plan.graphs:
                raise BundleError(f"{directory}: the engine plan has no {graph!r} graph")
            runners[graph] = _Runner(trt, cuda, engine, graph, plan.graphs[graph].profiles)
            if set(runners[graph].names) != io:
                odd = sorted(set(runners[graph].names) ^ io)
                raise BundleError(f"{path}: the engine's inputs and outputs are not the graph contract's ({odd[0]})")
        if "decoder" not in runners:
            raise BundleError(f"{directory}: the manifest lists no decoder engine")
        if len({r.dtypes[past_name(0)] for r in runners.values()}) != 1:
            raise BundleError(f"{directory}: the engines disagree on the cache dtype")
        return cls(trt, cuda, runtime, logger, runners, layers, latent)

    def empty_cache(self, batch: int) -> list[DeviceTensor]:
        return [DeviceTensor(self.cuda, (batch, 0, self.latent_dim), self.cache_dtype) for _ in range(self.num_layers)]

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [c.numpy() for c in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> list[DeviceTensor]:
        out = []
        for a in arrays:
            a = np.ascontiguousarray(a, self.cache_dtype)
            t = DeviceTensor(self.cuda, a.shape, a.dtype)
            if a.nbytes:
                self.cuda.copy(t.ptr, a.ctypes.data, a.nbytes, "h2d")
            out.append(t)
        self.cuda.sync()
        return out

    def _upload(self, name: str, array: np.ndarray) -> tuple[int, tuple]:
        """Copy a host input into a reused device buffer (grown when too small)."""
        buf = self._scratch.get(name)
        if buf is None or buf.nbytes < array.nbytes:
            if buf is not None:
                buf.free()
            buf = self._scratch[name] = DeviceTensor(self.cuda, array.shape, array.dtype)
        if array.nbytes:
            self.cuda.copy(buf.ptr, array.ctypes.data, array.nbytes, "h2d")
        return buf.ptr, array.shape

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """logits [B, T, V] float32 as numpy (copied to host), and the grown cache (still on the GPU)."""
        batch, new = input_ids.shape
        past = cache[0].shape[1]
        # one engine; its optimization profiles cover decode (1 new token) and prompts (2..chunk)
        runner = self.runners["decoder"]
        host = token_feed(input_ids, position_ids, attention_mask)
        shapes = {name: tuple(np.shape(value)) for name, value in host.items()}
        shapes.update({past_name(i): c.shape for i, c in enumerate(cache)})
        profile = select_profile(runner.profiles, shapes)
        if profile is None:
            raise UserError(f"{new} new tokens after {past} cached (batch {batch}) fit no optimization profile of the "
                            f"{runner.graph} engine; the engine plan sets the limits (dsexport engine rebuilds it)")
        arrays = {name: np.ascontiguousarray(value, dtype=runner.dtypes[name]) for name, value in host.items()}
        inputs = {name: self._upload(name, array) for name, array in arrays.items()}
        for i, c in enumerate(cache):
            inputs[past_name(i)] = (c.ptr, c.shape)
        outputs = {LOGITS: None, **{present_name(i): None for i in range(self.num_layers)}}
        runner.run(profile, inputs, outputs)
        logits = outputs.pop(LOGITS)
        host_logits = logits.numpy()  # synchronizes the stream: inputs and cache are no longer in use
        logits.free()
        return host_logits.astype(np.float32, copy=False), [outputs[present_name(i)] for i in range(self.num_layers)]

    def close(self) -> None:
        if getattr(self, "cuda", None) is None or self.cuda.closed:
            return
        for buf in self._scratch.values():
            buf.free()
        self._scratch.clear()
        self.cuda.sync()
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()  # contexts, then engines, then the runtime, as TensorRT requires
        self._runtime = None
        self.cuda.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
