"""Validation thresholds, reports and JUnit output. No torch: a device runs this (the golden-output
check is runtime/golden.py; the comparison with the reference model is exporter/validate.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from dsexport.core.manifest import Manifest



# Kernels that quantize activations to int8 (MatMulNBits / QMoE at accuracy_level 4, 8-bit QMoE):
# the reference emulates them to ~1e-6 per op, but a rounding tie resolved differently moves later
# logits; the build's golden check and `validate` allow this much (docs/quantization.md).
ACTIVATION_QUANT_LOGIT_TOL = 0.5


# Quality budgets: how much perplexity a compressed bundle may lose against the original model,
# by the narrowest weights it holds (docs/validate.md). On the specialized test model int4 (block
# 32) costs +1.9% and removing 12.5% of its experts +11.8%; on the embedded model 25% pruning +0.3%.
QUALITY_BUDGETS = {None: 0.005, 8: 0.01, 4: 0.03}


def quality_budget(manifest: Manifest) -> float:
    q = manifest.quantization
    widths = set(q.bits.values()) | q.expert_widths() if q is not None else set()
    return QUALITY_BUDGETS[min(widths) if widths else None]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_logit_diff: float  # exact bundles: every logit
    min_top1: float
    max_ppl_delta: float  # relative: |ppl_bundle / ppl_reference - 1|
    # bundles whose kernels round activations (compared on their own latent cache, exporter/validate.py)
    max_median_logit_diff: float = 1e-3
    max_expert_logit_diff: float = 0.05
    min_latent_agreement: float = 0.9

    @classmethod
    def for_bundle(cls, manifest: Manifest, backend: str = "onnxruntime") -> "Thresholds":
        """What a bundle is held to: a TensorRT engine at its precision; ONNX Runtime at fp32's
        limits, except where the bundle's kernels round activations to int8 (core/quant.py:
        QuantSpec.rounds_activations): there the golden check allows ACTIVATION_QUANT_LOGIT_TOL
        per logit, and the comparison with the reference uses statistics a rounding flip cannot
        move (docs/validate.md)."""
        if backend == "tensorrt":
            return cls.for_precision(manifest.precision)
        if manifest.rounds_activations:
            return cls(max_logit_diff=ACTIVATION_QUANT_LOGIT_TOL, min_top1=0.98, max_ppl_delta=2e-3)
        return cls.for_precision("fp32")

    @classmethod
    def for_precision(cls, precision: str) -> "Thresholds":
        # fp32: the export only reorders float32 arithmetic (~1e-5 on the test models); 1e-3
        # leaves room for deeper models and still fails any real error (>= 1e-2 in the tests).
        if precision == "fp32":
            return cls(max_logit_diff=1e-3, min_top1=0.99, max_ppl_delta=1e-3)
        return cls(max_logit_diff=float("inf"), min_top1=0.9, max_ppl_delta=0.02, max_median_logit_diff=float("inf"),
                   max_expert_logit_diff=float("inf"), min_latent_agreement=0.0)


@dataclasses.dataclass
class Check:
    name: str
    value: float
    limit: float
    kind: str  # "max" (value <= limit passes) or "min" (value >= limit passes)

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.limit) if self.kind == "max" else bool(self.value >= self.limit)


@dataclasses.dataclass
class Report:
    bundle: str
    mode: str  # "reference" or "golden"
    precision: str
    metrics: dict
    checks: list[Check]
    data: dict
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {
            "bundle": self.bundle, "mode": self.mode, "precision": self.precision, "passed": self.passed,
            "metrics": self.metrics, "data": self.data, "seconds": round(self.seconds, 3),
            "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "kind": c.kind, "passed": c.passed}
                       for c in self.checks],
        }

    def write_junit(self, path: str | Path) -> None:
        """One test suite, one test case per check; a failed check is a <failure>."""
        failures = sum(not c.passed for c in self.checks)
        lines = ['<?xml version="1.0" encoding="UTF-8"?>',
                 f'<testsuites><testsuite name="dsexport.validate" tests="{len(self.checks)}" failures="{failures}" '
                 f'errors="0" time="{self.seconds:.3f}">']
        for c in self.checks:
            op = "<=" if c.kind == "max" else ">="
            lines.append(f'<testcase classname={quoteattr(f"dsexport.validate.{self.mode}")} name={quoteattr(c.name)}>')
            if not c.passed:
                lines.append(f'<failure message={quoteattr(f"{c.name} = {c.value:.6g}, required {op} {c.limit:.6g}")}/>')
            lines.append("</testcase>")
        lines.append("</testsuite></testsuites>")
        Path(path).write_text("\n".join(lines) + "\n")


def match_length(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def teacher_forced_logits(engine, tokens: list[int]) -> np.ndarray:
    """The bundle's logits [T, V] for every position of one sequence, in one prefill."""
    ids = np.asarray([tokens], np.int64)
    logits, _ = engine.forward(ids, np.arange(len(tokens))[None], np.ones_like(ids), engine.empty_cache(1))
    return logits[0]


def failed_report(engine, mode: str, reason: str) -> Report:
    """A report of a bundle that could not be compared because it computes NaN/Inf: it fails."""
    return Report(str(engine.directory), mode, engine.manifest.precision, {"error": reason},
                  [Check("finite_logits", 0.0, 1.0, "min")], {"source": mode, "sequences": 0, "tokens": 0})
