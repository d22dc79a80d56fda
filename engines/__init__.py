"""Engines: build, load, check and run exported graphs. Importing this never imports torch."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .backend import EngineBackend
from .manifest import read_manifest

BACKENDS = ("onnxruntime", "tensorrt", "compiled")


def engine_class(backend: str, manifest_data: dict | None = None):
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if backend == "tensorrt":
        from .tensorrt import NativeTensorRTEngine, TensorRTEngine

        native = (manifest_data or {}).get("tensorrt", {}).get("runtime") == "native"
        return NativeTensorRTEngine if native else TensorRTEngine
    if backend == "compiled":
        from .compiled import CompiledEngine, EagerKernelEngine, JitCompiledEngine

        facts = (manifest_data or {}).get("compiled", {})
        by_compiler = {"jit": JitCompiledEngine, "eager": EagerKernelEngine}.get(facts.get("compiler"), CompiledEngine)
        return by_compiler.with_conv_lowering(facts.get("conv_lowering", "native"))
    raise UsageError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def load_engine(engine_dir: Path, device: str = "cpu"):
    manifest = read_manifest(engine_dir)
    if manifest.backend in ("onnxruntime", "tensorrt"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError("running this engine needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    return engine_class(manifest.backend, manifest.data)(manifest, device)


def open_engine(engine_dir: Path, device: str = "cpu") -> EngineBackend:
    return EngineBackend(load_engine(engine_dir, device))
