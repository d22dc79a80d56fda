"""ONNX Runtime engines: deterministic fp32 sessions over the exported graphs. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .manifest import EngineManifest


def _cpu_threads() -> int:
    env = os.environ.get("REVANON_ORT_THREADS")
    if env:
        if not env.strip().isdigit():
            raise UsageError(f"REVANON_ORT_THREADS={env!r}: give a whole number of threads")
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def session_options(threads: int | None = None, optimization: str = "all", mem_pattern: bool = True,
                    cpu_arena: bool = True, spinning: bool = True):
    """Deterministic compute and a fixed thread count, so that runs repeat bit for bit."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.use_deterministic_compute = True
    so.intra_op_num_threads = threads or _cpu_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[optimization]
    so.enable_mem_pattern = mem_pattern
    so.enable_cpu_mem_arena = cpu_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def cuda_device_id(device: str) -> int:
    """0 for cuda and auto, N for cuda:N."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def cpu_or_cuda_providers(device: str) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cuda = device in ("cuda", "auto") or device.startswith("cuda:")
    if wants_cuda and "CUDAExecutionProvider" in available:
        # DEFAULT conv algorithm search: no per-run benchmarking whose winner could change the bits
        options = {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": 0, "device_id": cuda_device_id(device)}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        raise UsageError("--device cuda: this onnxruntime has no CUDAExecutionProvider; "
                         "pip install onnxruntime-gpu (and uninstall onnxruntime)")
    return ["CPUExecutionProvider"]


def _format_hint(manifest: EngineManifest) -> str:
    """What the graphs need, for a runtime too old to load them: the manifest records the format."""
    onnx = manifest.data.get("onnx", {})
    if "ir_version" not in onnx:
        return ""
    return (f". The engine is ONNX IR version {onnx['ir_version']}, opset {onnx.get('opset', '?')}; "
            "a runtime that refuses them is too old: pip install -U onnxruntime (or onnxruntime-gpu)")


class OnnxRuntimeEngine:
    """Builds (through the export stage), loads, checks and runs one engine folder."""

    kind = "onnxruntime"

    def __init__(self, manifest: EngineManifest, device: str = "cpu"):
        import onnxruntime as ort

        self.manifest = manifest
        self.device = device
        providers = self.session_providers(manifest, device)
        options = session_options()
        self.sessions = {}
        for name in manifest.graphs:
            try:
                self.sessions[name] = ort.InferenceSession(str(manifest.graph_path(name)), sess_options=options,
                                                           providers=providers)
            except Exception as exc:
                raise UsageError(f"{manifest.graph_path(name)}: onnxruntime {ort.__version__} cannot load it "
                                 f"({exc}){_format_hint(manifest)}") from None
        self.on_gpu = self.sessions and self.sessions[next(iter(self.sessions))].get_providers()[0] != "CPUExecutionProvider"
        if device.startswith("cuda") and not self.on_gpu:
            # onnxruntime falls back to the CPU when the CUDA provider cannot start, and says so only in a log
            raise UsageError(f"--device {device}: onnxruntime's CUDA provider did not start (check the CUDA and "
                             "cuDNN libraries onnxruntime-gpu needs); --device cpu runs on the CPU")
        self._bindings = {name: session.io_binding() for name, session in self.sessions.items()}

    @classmethod
    def session_providers(cls, manifest: EngineManifest, device: str) -> list:
        return cpu_or_cuda_providers(device)

    precisions = ("fp32",)

    @classmethod
    def require_available(cls) -> None:
        """Raise a UsageError saying what to install when this backend cannot build here."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError("this backend needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None

    @classmethod
    def reference_device(cls, device: str) -> str:
        """Where the build runs PyTorch: exports trace on the CPU."""
        return "cpu"

    @classmethod
    def export_graph(cls, descriptor, staging_dir: Path, precision: str) -> list[Path]:
        """fp32 ONNX; returns the files written, the graph first."""
        from ..export.onnx import export_onnx

        return export_onnx(descriptor, staging_dir / f"{descriptor.name}.onnx")

    @classmethod
    def prepare(cls, staging_dir: Path, graphs: dict, log, device: str) -> dict:
        """Backend-specific step after export, returning manifest fields. ONNX Runtime needs none;
        the ONNX format facts are recorded here."""
        from ..export.onnx import graph_info

        return {"onnx": {**graph_info(staging_dir / graphs["unet"]["file"]),
                         "exporter": "torch.onnx.export(dynamo=True) + polygraphy fold"}}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One call with IOBinding: inputs are bound once per call and the output lands in an
        ORT-allocated buffer on the session's device, copied to the host only at the end."""
        binding = self._bindings[graph]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        device, device_id = ("cuda", cuda_device_id(self.device)) if self.on_gpu else ("cpu", 0)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for output in self.sessions[graph].get_outputs():
            binding.bind_output(output.name, device, device_id)
        self.sessions[graph].run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
