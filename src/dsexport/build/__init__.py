"""Building bundles: the plan (torch-free), the export backends, the staged pipeline, publishing.

    from dsexport.build import BuildConfig, build_bundle, resolve_plan

    plan = resolve_plan(BuildConfig("ckpt/", target="x86-cpu", precision="int4"))   # what build will do
    build_bundle(BuildConfig("ckpt/", "dist/model", precision="int4"))               # do it
"""

from .plan import BuildConfig, BuildPlan, resolve_plan

__all__ = ["BuildConfig", "BuildPlan", "BuildResult", "build_bundle", "resolve_plan"]


def __getattr__(name: str):
    # the pipeline imports the exporter (torch, onnx) only when a build is asked for, so
    # `dsexport plan` on a runtime-only install can import this package
    if name in ("build_bundle", "BuildResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
