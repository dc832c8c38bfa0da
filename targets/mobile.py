"""Phones: ONNX Runtime Mobile (a minimal build) running an ORT-format model, CPU-led.

The bundle holds `model.ort` and `required_operators.config` instead of the ONNX graph
(exporter/ort_mobile.py); the app links an ONNX Runtime built from that config and runs the decode
loop itself (docs/mobile.md). The fused com.microsoft MoE op exists only in ONNX Runtime's CPU
execution provider, so on both platforms the experts - most of the bytes a token reads - run on
the CPU whatever accelerator EP is registered first; the accelerator takes what it supports
of the rest and the CPU EP runs everything else.

Reference devices (figures recalled, not read from vendor pages here: re-check before relying on them):
- android-arm64: a Snapdragon 8 Gen 3 phone (e.g. Galaxy S24 Ultra) with 12 GB LPDDR5X at
  4800 MHz on a 64-bit bus, ~76.8 GB/s peak. CPU 1x Cortex-X4 + 5x Cortex-A720 + 2x Cortex-A520:
  we run 4 threads (the X4 and the fastest A720s) and cut experts in 4 shards to match
  (lowering.LoweringOptions.moe_shards: one shard per thread balances the MoE kernel's threads).
  "Usable" 6 GB is an estimate of what Android's low-memory killer leaves a foreground app on
  a 12 GB phone, not a vendor figure.
- ios-arm64: an iPhone 15 Pro (A17 Pro) with 8 GB LPDDR5-6400 on a 64-bit bus, ~51.2 GB/s peak.
  CPU 2 performance + 4 efficiency cores: 2 threads, 2 shards. "Usable" 5 GB is an estimate of the
  per-app (jetsam) limit with the `com.apple.developer.kernel.increased-memory-limit` entitlement;
  `os_proc_available_memory()` on the device is the authority.

Execution providers:
- Android: XNNPACK, then CPU. NNAPI is deprecated as of Android 15 (Android's NNAPI migration guide);
  QNN (Qualcomm's NPU) is not the default because its HTP backend wants a quantized (QDQ) model
  with static shapes, cannot run com.microsoft.MoE (so every layer would bounce between NPU and
  CPU), and needs Qualcomm's QNN libraries shipped with the app; it becomes worth a profile once
  the int8/int4 precisions exist.
- iOS: CoreML, then CPU. CoreML cannot run com.microsoft.MoE (nor the CPU-only fusions of a
  "Fixed" ORT model); those nodes fall back to the CPU EP. MLComputeUnits CPUAndGPU keeps the
  Neural Engine out: it computes in fp16, and an fp32 bundle must match the reference tokens.
Neither EP choice has been measured on a phone here: CPU-only is the parity baseline to compare
against (`EP_SETTINGS[...]["providers"]` minus its first entry).
"""

from .registry import Device, Target, register

ANDROID_THREADS = 4
IOS_THREADS = 2

ANDROID_ARM64 = register(Target(
    name="android-arm64",
    description="Android arm64-v8a phone (reference: Snapdragon 8 Gen 3, 12 GB), ONNX Runtime Mobile, XNNPACK + CPU",
    backend="onnxruntime-mobile",
    execution_providers=("XnnpackExecutionProvider", "CPUExecutionProvider"),
    moe_lowering="ort-moe",
    precisions=("fp32", "int8", "int4"),
    default_precision="fp32",
    moe_shards=ANDROID_THREADS,
    device=Device(memory_gb=12, usable_gb=6.0, bandwidth_gbs=76.8,
                  software="Android 14+, ONNX Runtime 1.32 minimal build (arm64-v8a, XNNPACK)"),
))

IOS_ARM64 = register(Target(
    name="ios-arm64",
    description="iPhone (reference: iPhone 15 Pro, A17 Pro, 8 GB), ONNX Runtime Mobile, CoreML + CPU",
    backend="onnxruntime-mobile",
    execution_providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
    moe_lowering="ort-moe",
    precisions=("fp32", "int8", "int4"),
    default_precision="fp32",
    moe_shards=IOS_THREADS,
    device=Device(memory_gb=8, usable_gb=5.0, bandwidth_gbs=51.2,
                  software="iOS 17+, ONNX Runtime 1.32 minimal build (arm64, CoreML)"),
))

# What the app passes to ONNX Runtime, per target: copied into the manifest by the build.
# "providers" in priority order, each with the provider options (string to string) an app gives
# SessionOptions.AppendExecutionProvider / addXnnpack / appendCoreMLExecutionProviderWithOptionsV2;
# "session" the SessionOptions fields and config entries. Keys are ONNX Runtime's own names.
_SESSION_ENTRIES = {
    # ORT-format models only (onnxruntime 1.32): map model.ort instead of reading it, and let the
    # initializers point into the mapping rather than copying the weights out of it.
    "session.use_memory_mapped_ort_model": "1",
    "session.use_ort_model_bytes_for_initializers": "1",
}

EP_SETTINGS: dict[str, dict] = {
    "android-arm64": {
        "providers": [
            # XNNPACK keeps its own thread pool (pthreadpool); size it like the CPU EP's pool.
            {"name": "XNNPACK", "options": {"intra_op_num_threads": str(ANDROID_THREADS)}},
            {"name": "CPU", "options": {}},
        ],
        "session": {
            # Not 1, as ONNX Runtime's XNNPACK page suggests for XNNPACK-heavy models: the MoE op and
            # the fused nodes run on the CPU EP and need its threads. Spinning off, so the two pools
            # do not burn each other's cores while the other works.
            "intra_op_num_threads": ANDROID_THREADS,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "config_entries": {"session.intra_op.allow_spinning": "0", **_SESSION_ENTRIES},
        },
    },
    "ios-arm64": {
        "providers": [
            {"name": "CoreML", "options": {
                "ModelFormat": "MLProgram",
                "MLComputeUnits": "CPUAndGPU",
                "RequireStaticInputShapes": "0",  # the decoder's seq and past_seq dims are dynamic
                "EnableOnSubgraphs": "0",
                "AllowLowPrecisionAccumulationOnGPU": "0",
                # also "ModelCacheDirectory": an app-owned directory, to skip CoreML compilation on later launches
            }},
            {"name": "CPU", "options": {}},
        ],
        "session": {
            "intra_op_num_threads": IOS_THREADS,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "config_entries": dict(_SESSION_ENTRIES),
        },
    },
}

# The ORT-format optimization style each target's bundle is converted with (exporter/ort_mobile.py).
# "Fixed" for both: the CPU EP runs the MoE layers either way and keeps its fusions; "Runtime" is the
# option to try if CoreML should claim more of the attention (it then needs
# session.enable_saved_runtime_optimizations=1, which convert_to_ort reports).
ORT_OPTIMIZATION_STYLE = {"android-arm64": "Fixed", "ios-arm64": "Fixed"}
