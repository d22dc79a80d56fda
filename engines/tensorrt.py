"""TensorRT engines, in strict fp32: through onnxruntime's TensorRT execution provider, or
natively with the tensorrt module and polygraphy when those are importable.

Not exercised by this project's CI (neither is installable there); see the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .manifest import EngineManifest, file_sha256
from .onnxruntime import OnnxRuntimeEngine, cuda_device_id

INSTALL_HINT = ("the tensorrt backend needs onnxruntime-gpu built with TensorRT (TensorrtExecutionProvider), "
                "or the tensorrt and polygraphy packages: pip install tensorrt polygraphy")


def native_available() -> bool:
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


def ort_trt_available() -> bool:
    try:
        import onnxruntime as ort
        return "TensorrtExecutionProvider" in ort.get_available_providers()
    except ImportError:
        return False


def require_tensorrt() -> str:
    """'ort-trt' or 'native'; one clear error when neither can run."""
    if ort_trt_available():
        return "ort-trt"
    if native_available():
        return "native"
    raise UsageError(INSTALL_HINT)


class TensorRTEngine(OnnxRuntimeEngine):
    """ONNX Runtime sessions on the TensorRT EP: fp16 off, engine and timing caches in the engine folder."""

    kind = "tensorrt"

    def __init__(self, manifest: EngineManifest, device: str = "cuda"):
        super().__init__(manifest, device)
        # a TensorRT EP that cannot start leaves the CUDA EP first, which would pass for this backend
        for name, session in self.sessions.items():
            if session.get_providers()[0] != "TensorrtExecutionProvider":
                raise UsageError(f"{manifest.graph_path(name)}: onnxruntime's TensorRT provider did not start "
                                 f"(it ran on {session.get_providers()[0]}; check the TensorRT libraries "
                                 "onnxruntime-gpu needs); the onnxruntime backend runs the same graphs on CUDA")

    @classmethod
    def require_available(cls) -> None:
        require_tensorrt()

    @classmethod
    def session_providers(cls, manifest: EngineManifest, device: str) -> list:
        if not ort_trt_available():
            raise UsageError(INSTALL_HINT)
        # the EP has no TF32 switch and TensorRT allows TF32 by default; NVIDIA's libraries read this
        # variable when they start, before the first session
        os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
        cache = manifest.engine_dir / "trt_cache"
        cache.mkdir(exist_ok=True)
        device_id = cuda_device_id(device)
        trt_options = {"device_id": device_id, "trt_fp16_enable": False, "trt_int8_enable": False,
                       "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
        return [("TensorrtExecutionProvider", trt_options),
                ("CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "DEFAULT", "use_tf32": 0})]

    @classmethod
    def prepare(cls, staging_dir: Path, graphs: dict, log, device: str) -> dict:
        onnx_facts = OnnxRuntimeEngine.prepare(staging_dir, graphs, log, device)
        if require_tensorrt() == "ort-trt":
            return {**onnx_facts, "tensorrt": {"runtime": "ort-trt", "fp16": False}}
        return {**onnx_facts, **NativeTensorRTEngine.prepare(staging_dir, graphs, log, device)}


class NativeTensorRTEngine:
    """Serialized TensorRT plans built with polygraphy, TF32 and FP16 off."""

    kind = "tensorrt"

    def __init__(self, manifest: EngineManifest, device: str = "cuda"):
        if not native_available():
            raise UsageError(INSTALL_HINT)
        if cuda_device_id(device) != 0:
            # polygraphy's runners use the process's current CUDA device, which this engine does not switch
            raise UsageError(f"--device {device}: native TensorRT engines run on the first visible GPU; "
                             f"choose the GPU with CUDA_VISIBLE_DEVICES={cuda_device_id(device)} and --device cuda")
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.manifest = manifest
        self.device = device
        self.on_gpu = True
        self.runners = {}
        for name, entry in manifest.graphs.items():
            runner = TrtRunner(EngineFromBytes(BytesFromPath(str(manifest.engine_dir / entry["plan"]))))
            runner.activate()
            self.runners[name] = runner

    @classmethod
    def prepare(cls, staging_dir: Path, graphs: dict, log, device: str) -> dict:
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

        for name, entry in graphs.items():
            log(f"building the TensorRT plan for {name} (fp32, TF32 off)")
            plan = staging_dir / f"{name}.plan"
            build = EngineFromNetwork(NetworkFromOnnxPath(str(staging_dir / entry["file"])),
                                      config=CreateConfig(tf32=False, fp16=False))
            SaveEngine(build, str(plan))()
            entry["plan"] = plan.name
            entry.setdefault("extra_files", []).append({"file": plan.name, "sha256": file_sha256(plan)})
        return {"tensorrt": {"runtime": "native", "fp16": False, "tf32": False}}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        outputs = self.runners[graph].infer(feeds)
        # polygraphy may reuse its output buffers on the next call: the result must be a copy
        return np.array(next(iter(outputs.values())), copy=True)
