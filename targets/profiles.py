"""TensorRT optimization profiles against a graph's inputs: no onnx or tensorrt import, so the
export (targets/tensorrt_check.py) and the device build (targets/tensorrt_engine.py) share it."""

from __future__ import annotations

from dsexport.core.sections import ShapeRange


def profile_problems(graph: str, inputs: dict[str, list[int]], profiles) -> list[str]:
    """Dynamic-shape rule: every profile gives min <= opt <= max for every dynamic input (-1
    dims), matches fixed dims, and names only inputs. Used at export on the ONNX graph and on
    the device on the parsed TensorRT network (targets/tensorrt_engine.py)."""
    problems = []
    for k, profile in enumerate(profiles):
        where = f"optimization profile {k} of the {graph} graph"
        problems += [f"{where} names {name!r}, which is not an input of the graph" for name in profile if name not in inputs]
        for name, dims in inputs.items():
            rng = profile.get(name)
            if rng is None:
                if -1 in dims:
                    problems.append(f"{where} has no shape range for the dynamic input {name} {dims}")
                continue
            if isinstance(rng, dict):  # a profile as the manifest's JSON holds it
                rng = ShapeRange(*(tuple(rng.get(key, ())) for key in ("min", "opt", "max")))
            lo, opt, hi = list(rng.min), list(rng.opt), list(rng.max)
            if not len(lo) == len(opt) == len(hi) == len(dims):
                problems.append(f"{where}: {name} has rank {len(dims)}, its range is {lo} / {opt} / {hi}")
            elif any(not 0 <= a <= b <= c or (d != -1 and not a == b == c == d) for d, a, b, c in zip(dims, lo, opt, hi)):
                problems.append(f"{where}: range {lo} / {opt} / {hi} of {name} does not fit its shape {dims}")
    return problems
