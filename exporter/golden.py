"""Golden outputs a build stores in the bundle, computed by the reference model.

For a few fixed prompts: the greedy continuation and the reference's top-k logits at every
continuation position (teacher-forced on the same tokens, so a near-tie the bundle resolved
differently does not shift later positions). The reference runs layer by layer (reference.streamed_logits), so this
costs one more pass over the checkpoint, not a second copy of the model in memory. The build
also checks here that the exported graph agrees with the reference: a bundle whose greedy tokens
leave the reference's at a clear margin is never written.
"""

from __future__ import annotations

import numpy as np

from dsexport.core.errors import InternalError
from dsexport.runtime.validate import ACTIVATION_QUANT_LOGIT_TOL, GOLDEN_SCHEMA

from .checkpoint import CheckpointReader
from .reference import streamed_logits

GOLDEN_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning",
    "def fibonacci(n):",
    "Edge devices have little memory, so",
)
NEW_TOKENS = 16
TOP_K = 8
BUILD_LOGIT_TOL = 1e-3  # the fp32 validate default; see docs/validate.md
# Kernels that quantize activations to int8 (MatMulNBits accuracy_level 4, 8-bit QMoE): the
# reference emulates them, to ~1e-6 at almost every position, but a rare rounding that differs
# moves later logits (greedy picks differing at top-2 gaps up to 0.54 were seen on the random
# test models; docs/quantization.md); the tests
# check the typical position tightly instead (tests/test_quantize.py).
# (the value lives with the runtime's validation thresholds, which apply it on the device)


def logit_tolerance(quant) -> float:
    """The build's parity tolerance for a bundle of this QuantSpec (None: fp32 weights)."""
    return ACTIVATION_QUANT_LOGIT_TOL if quant is not None and quant.rounds_activations else BUILD_LOGIT_TOL


def golden_prompts(engine, vocab_size: int) -> list[list[int]]:
    if engine.tokenizer is not None:
        return [engine.encode(p) or [0] for p in GOLDEN_PROMPTS]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (8, 3, 5, 6)]


def golden_generations(engine, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, the bundle's greedy continuations): the graph's half of the golden outputs."""
    prompts = golden_prompts(engine, vocab_size)
    return prompts, [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids for p in prompts]


def make_golden(reader: CheckpointReader, prompts: list[list[int]], outputs: list[list[int]], quant=None) -> dict:
    """The reference's half: its top-k logits along the bundle's continuations, and the check that
    the bundle's greedy tokens are the reference's (golden_generations ran the bundle first, so
    the bundle's session can be closed before the reference loads: peak memory is one of them).
    quant: the bundle's QuantConfig; the reference then runs the same dequantized weights."""
    reference = streamed_logits(reader, [p + o for p, o in zip(prompts, outputs)], quant)
    cases = []
    for prompt, output, logits in zip(prompts, outputs, reference):
        logits = logits[len(prompt) - 1:-1].numpy()  # [new, V]: the positions that predict `output`
        order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
        top = np.take_along_axis(logits, order, axis=1)
        for step, token in enumerate(output):
            if order[step, 0] != token and top[step, 0] - top[step, 1] > 2 * logit_tolerance(quant):
                raise InternalError(f"exported graph disagrees with the reference model: greedy token {step} of "
                                    f"golden prompt {prompts.index(prompt)} is {token}, the reference's is "
                                    f"{order[step, 0]} by a margin of {top[step, 0] - top[step, 1]:.3g}")
        cases.append({"prompt_ids": prompt, "output_ids": output, "top_ids": order.tolist(),
                      "top_logits": top.astype(float).round(7).tolist()})
    return {"schema": GOLDEN_SCHEMA, "producer": "reference", "new_tokens": NEW_TOKENS, "top_k": TOP_K, "cases": cases}
