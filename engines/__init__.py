"""Engines: build, load, check and run exported graphs. Importing this never imports torch."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .backend import EngineBackend
from .manifest import EngineManifest, read_manifest, rebuild_hint

BACKENDS = ("onnxruntime", "tensorrt", "compiled")


def default_compiler(precision: str) -> str:
    """What `build --backend compiled` uses when no --compiler is given. Strict fp32 runs the exported programs
    on eager PyTorch's kernels: on an H200 (bench/results/gpu-h200) that gave eager PyTorch's final latent
    bit for bit (Inductor's kernels drifted 8.2e-5 away over 100 UNet calls on an H100) at Inductor's speed
    at batch 8 (cuDNN's convolutions take 80% of the GPU time either way), built in 25 s instead of two minutes.
    The fast precisions are not held to eager's numbers and keep AOTInductor's fused kernels."""
    return "eager" if precision == "fp32" else "aot"


def engine_class(backend: str, *, compiler: str = "aot", native_tensorrt: bool = False):
    """The class of an engine with these options: build's flags, or what a manifest records (engine_class_for).
    A tensorrt build always starts from TensorRTEngine, which chooses the runtime it can build for."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if backend == "tensorrt":
        from .tensorrt import NativeTensorRTEngine, TensorRTEngine

        return NativeTensorRTEngine if native_tensorrt else TensorRTEngine
    if backend == "compiled":
        from .compiled import CompiledEngine, EagerKernelEngine, JitCompiledEngine

        by_compiler = {"aot": CompiledEngine, "jit": JitCompiledEngine, "eager": EagerKernelEngine}
        if compiler not in by_compiler:
            raise UsageError(f"compiler {compiler!r}: this revanon-rt knows {', '.join(by_compiler)}")
        return by_compiler[compiler]
    raise UsageError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def engine_class_for(manifest: EngineManifest):
    """The class that runs the engine this manifest describes."""
    compiled = manifest.data.get("compiled", {})
    try:
        return engine_class(manifest.backend, compiler=compiled.get("compiler", "aot"),
                            native_tensorrt=manifest.data.get("tensorrt", {}).get("runtime") == "native")
    except UsageError as exc:  # an engine from another revanon-rt: say where, and how to make one for this
        raise UsageError(f"{manifest.engine_dir}: {exc}; {rebuild_hint(manifest.engine_dir, manifest.data)}") from None


def load_engine(engine_dir: Path, device: str = "cpu"):
    manifest = read_manifest(engine_dir)
    if manifest.backend in ("onnxruntime", "tensorrt"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError("running this engine needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    return engine_class_for(manifest)(manifest, device)


def open_engine(engine_dir: Path, device: str = "cpu") -> EngineBackend:
    return EngineBackend(load_engine(engine_dir, device))
