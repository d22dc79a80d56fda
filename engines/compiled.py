"""Compiled PyTorch engines: one AOTInductor package (.pt2) per model, static shapes for a fixed
batch, and a fused loop over device-resident buffers. On CUDA the whole transform (encode, the
inversion steps, the keyed flip, the denoising steps with re-injection, decode) is captured once
as a CUDA graph and replayed per batch of faces.

This backend needs torch, and a package is tied to the torch version and device kind it was built
with: build it on the machine that runs it. `--compiler jit` stores exported programs instead and
compiles them with torch.compile when the engine loads (a slower start, the same Inductor settings),
for a torch whose AOTInductor loader crashes: torch 2.11+cu130 segfaults loading any CUDA package.
`--compiler eager` runs the exported programs on PyTorch's own kernels inside the same fused loop and
CUDA graph: the numbers of eager PyTorch, without its launch overhead.
The loop's update math is sampler.ddim_update and sampler.reinject, compiled; `verify` compares the
fused loop with the plain functions.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from collections import OrderedDict
from functools import cache, partial
from pathlib import Path

import numpy as np

from ..errors import UsageError

try:
    import torch
except ImportError:
    raise UsageError("the compiled backend needs torch: pip install 'revanon-rt[torch]'") from None

from ..reference import set_tf32, tf32_mode, use_strict_fp32
from ..sampler import ddim_coefficients, ddim_update, keyed_flip, reinject
from .manifest import EngineManifest, rebuild_hint

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
LOAD_CHECK_SECONDS = 300  # a package of the real UNet loads in seconds; a hung loader must not eat a GPU window
# on CPU-only machines Inductor's C++ toolchain probe warns about CUDA_HOME on every build
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def apply_precision(precision: str) -> None:
    """The reference's strict fp32 and deterministic kernels, with TF32 only when it is asked for."""
    use_strict_fp32()  # importing the reference has set CUBLAS_WORKSPACE_CONFIG before torch starts CUDA
    if precision == "tf32":
        set_tf32(True)


def compute_dtype(precision: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def inductor_configs() -> dict:
    """No autotuning whose winner could change between builds or runs."""
    from torch._inductor import config

    wanted = {"max_autotune": False, "max_autotune_gemm": False, "coordinate_descent_tuning": False,
              "deterministic": True}
    return {key: value for key, value in wanted.items() if hasattr(config, key)}


def eager_numerics_options() -> dict:
    """For the loop's update kernels: Triton would contract a·b + c into FMAs, divide approximately and
    flush denormals, where numpy rounds each operation. These keep the fused loop equal to the plain
    functions bit for bit, so that a face anonymized here recovers on every other backend."""
    from torch._inductor import config

    wanted = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
              "eager_numerics.disable_ftz": True}
    return {key: value for key, value in wanted.items() if key in config._config}


class CastIO(torch.nn.Module):
    """float32 in and out whatever the compute precision, so the loop math stays fp32."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = copy.deepcopy(module).to(dtype) if dtype != torch.float32 else module

    def forward(self, *args):
        dtype = next(self.inner.parameters()).dtype
        out = self.inner(*(a.to(dtype) if a.is_floating_point() else a for a in args))
        return out.float() if out.is_floating_point() else out


class CompiledEngine:
    kind = "compiled"
    precisions = PRECISIONS
    compiler = "aot"
    packager = "torch._inductor.aoti_compile_and_package"
    # an AOTInductor package holds kernels compiled for the build's GPU architecture; jit and eager compile
    # or dispatch when they load, so they run on any GPU
    tied_to_gpu_architecture = True
    # fused loops kept per engine, one per timestep schedule: recovery takes its step count from each image,
    # and every loop holds its latents and a captured CUDA graph
    MAX_FUSED_LOOPS = 2

    @classmethod
    def require_available(cls) -> None:
        """Importing this module needs torch, so a compiled engine can always build once it is imported."""

    @classmethod
    def reference_device(cls, device: str) -> str:
        """Packages are compiled for the device they will run on, from modules living there."""
        if device.startswith("cuda:"):
            raise UsageError(f"--device {device}: the compiled backend runs on the current CUDA device; "
                             "choose it with CUDA_VISIBLE_DEVICES and give --device cuda")
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return "cuda"
        if device == "cuda":
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")
        return "cpu"

    @classmethod
    def export_graph(cls, descriptor, staging_dir: Path, precision: str) -> list[Path]:
        apply_precision(precision)
        device = next(descriptor.module.parameters()).device
        # the parser stays fp32: the mask it draws is stored, so it must not depend on the precision
        dtype = torch.float32 if descriptor.name == "parser" else compute_dtype(precision)
        path = staging_dir / f"{descriptor.name}.pt2"
        with torch.no_grad():
            module = CastIO(descriptor.module, dtype).eval()
            program = torch.export.export(module, descriptor.torch_args(device), strict=False)
            cls.package(program, path)
        return [path]

    @staticmethod
    def model_inductor_configs() -> dict:
        """The Inductor settings the model graphs are compiled with (the update kernels have their own)."""
        return inductor_configs()

    @staticmethod
    def package(program, path: Path) -> None:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=inductor_configs())

    def load_runner(self, path: Path):
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path), run_single_threaded=self.on_gpu)

    @classmethod
    def prepare(cls, staging_dir: Path, graphs: dict, log, device: str) -> dict:
        facts = {"torch": torch.__version__, "device": cls.reference_device(device), "compiler": cls.compiler,
                 "packager": cls.packager, "inductor_configs": cls.model_inductor_configs()}
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name()
            facts["gpu_capability"] = list(torch.cuda.get_device_capability())
        if facts["device"] == "cuda":  # where a loader crash was seen; on a CPU the check costs a torch start
            cls.check_loadable(staging_dir / min(graphs.values(), key=lambda g: g["bytes"])["file"])
        return {"compiled": facts}

    @classmethod
    def check_loadable(cls, package: Path) -> None:
        """Some torch builds crash loading their own packages; in a child process that shows as a signal
        and a hint, where in this one it would end the build without a word."""
        load = "import sys, torch._inductor as i; i.aoti_load_package(sys.argv[1])"
        try:
            result = subprocess.run([sys.executable, "-c", load, str(package)], capture_output=True, text=True,
                                    timeout=LOAD_CHECK_SECONDS)
        except subprocess.TimeoutExpired:
            raise UsageError(f"torch {torch.__version__} did not finish loading the AOTInductor package it had "
                             f"just built within {LOAD_CHECK_SECONDS} s; give --compiler jit, which stores exported "
                             "programs and compiles them when the engine loads") from None
        if result.returncode < 0:
            raise UsageError(f"torch {torch.__version__} crashed (signal {-result.returncode}) loading the "
                             "AOTInductor package it had just built; give --compiler jit, which stores exported "
                             "programs and compiles them when the engine loads")
        if result.returncode != 0:
            raise UsageError(f"torch {torch.__version__} could not load the AOTInductor package it had just "
                             f"built:\n{result.stderr.strip()[-2000:]}")

    def __init__(self, manifest: EngineManifest, device: str = "auto"):
        facts = manifest.data.get("compiled", {})
        if facts.get("torch") != torch.__version__:
            raise UsageError(f"{manifest.engine_dir}: compiled with torch {facts.get('torch')}, this is torch "
                             f"{torch.__version__}; compiled packages are tied to their torch version, "
                             f"{rebuild_hint(manifest.engine_dir, manifest.data)}")
        built_on = facts.get("device", "cpu")
        if device.startswith("cuda:"):
            self.reference_device(device)
        if device not in ("auto", built_on):
            raise UsageError(f"{manifest.engine_dir}: compiled for {built_on}, asked to run on {device}; "
                             f"{rebuild_hint(manifest.engine_dir, manifest.data)} --device {device}")
        if built_on == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"{manifest.engine_dir}: compiled for CUDA, and no GPU is visible")
        built_for = facts.get("gpu_capability")
        if (built_on == "cuda" and self.tied_to_gpu_architecture and built_for is not None
                and tuple(built_for) != torch.cuda.get_device_capability()):
            raise UsageError(f"{manifest.engine_dir}: compiled for {facts.get('gpu')} (sm_{''.join(map(str, built_for))}), "
                             f"this is {torch.cuda.get_device_name()} (sm_"
                             f"{''.join(map(str, torch.cuda.get_device_capability()))}); AOTInductor kernels are "
                             f"tied to the GPU architecture, {rebuild_hint(manifest.engine_dir, manifest.data)}")
        self.manifest = manifest
        self.precision = manifest.data["precision"]
        apply_precision(self.precision)
        self.device = torch.device(built_on)
        self.on_gpu = built_on == "cuda"
        self.runners = {name: self.load_runner(manifest.graph_path(name)) for name in manifest.graphs}
        self._loops: OrderedDict = OrderedDict()

    def call(self, graph: str, *tensors):
        # TF32 is one switch for the whole process, and a reference built beside this engine turns it off.
        # The parser is fp32 in every precision: the mask it draws is stored.
        with tf32_mode(self.precision == "tf32" and graph != "parser"):
            return _call(self.runners, graph, *tensors)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        names = [spec["name"] for spec in self.manifest.graphs[graph]["inputs"]]
        with torch.inference_mode():
            out = self.call(graph, *(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in names))
        return out.cpu().numpy()

    def fused_transform(self, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray, schedule) -> np.ndarray:
        """sampler.transform for one full batch, on device, as one CUDA graph replay on a GPU."""
        key = tuple(schedule.timesteps)
        if key in self._loops:
            self._loops.move_to_end(key)
        else:
            while len(self._loops) >= self.MAX_FUSED_LOOPS:
                self._loops.popitem(last=False)
            self._loops[key] = FusedLoop(self, schedule)
        with tf32_mode(self.precision == "tf32"):  # kernels are chosen at capture, and replayed as captured
            return self._loops[key].run(x, mask, pattern)


class JitCompiledEngine(CompiledEngine):
    """Exported programs, compiled by torch.compile in each process that loads the engine."""

    compiler = "jit"
    packager = "torch.export.save"
    tied_to_gpu_architecture = False

    @staticmethod
    def package(program, path: Path) -> None:
        torch.export.save(program, str(path))

    @classmethod
    def check_loadable(cls, package: Path) -> None:
        """Loading is compiling: the build's parity run does it."""

    def load_runner(self, path: Path):
        module = torch.export.load(str(path)).module()
        return torch.compile(module, fullgraph=True, dynamic=False, options=inductor_configs())


class EagerKernelEngine(JitCompiledEngine):
    """Exported programs run uncompiled, on the kernels eager PyTorch dispatches to (cuDNN convolutions,
    ATen's group norm, its attention), inside the same fused loop and CUDA graph. Inductor's fused kernels
    round differently, and over 100 chained UNet calls of a random-weight model that grew to 8e-5 of the
    final latent on an H100; these kernels give eager PyTorch's numbers, for users who need them exactly."""

    compiler = "eager"

    @staticmethod
    def model_inductor_configs() -> dict:
        return {}

    def load_runner(self, path: Path):
        return torch.export.load(str(path)).module()


class FusedLoop:
    """Static buffers for one (schedule, batch): the kept latents, the step coefficients and timesteps
    as device tensors, and the two fused update kernels."""

    def __init__(self, engine: CompiledEngine, schedule):
        m = engine.manifest
        self.runners = engine.runners  # not the engine, which holds this loop: no reference cycle
        self.on_gpu = engine.on_gpu
        b, (c, h, w), size = m.batch, m.latent_shape, m.image_size
        dev = engine.device
        steps, levels = schedule.steps, schedule.levels
        self.steps = steps
        self.has_autoencoder = "encoder" in m.graphs
        self.x_in = torch.zeros((b, 3, size, size), device=dev)
        self.mask = torch.zeros((b, 1, h, w), device=dev)
        self.pattern = torch.zeros((b, c, h, w), device=dev)
        self.keep = torch.zeros((steps + 1, b, c, h, w), device=dev)
        self.x_out = torch.zeros((b, 3, size, size), device=dev)
        inv = [ddim_coefficients(levels[i + 1], levels[i]) for i in range(steps - 1, -1, -1)]
        den = [ddim_coefficients(levels[i], levels[i + 1]) for i in range(steps)]
        self.inv_coeffs = torch.tensor(inv, dtype=torch.float32, device=dev)
        self.den_coeffs = torch.tensor(den, dtype=torch.float32, device=dev)
        # one tensor per step: rows of one table would sit at offsets AOTI finds misaligned and copies
        self.inv_t = [torch.full((b,), schedule.timesteps[i], dtype=torch.int64, device=dev)
                      for i in range(steps - 1, -1, -1)]
        self.den_t = [torch.full((b,), t, dtype=torch.int64, device=dev) for t in schedule.timesteps]
        self.invert_update, self.denoise_update = _compiled_updates()
        self.graph = None

    def _body(self) -> None:
        call, keep = partial(_call, self.runners), self.keep
        keep[0].copy_(call("encoder", self.x_in) if self.has_autoencoder else self.x_in)
        for n in range(self.steps):
            eps = call("unet", keep[n], self.inv_t[n])
            keep[n + 1].copy_(self.invert_update(keep[n], eps, self.inv_coeffs[n]))
        z = keyed_flip(keep[self.steps], self.mask, self.pattern)
        for i in range(self.steps):
            eps = call("unet", z, self.den_t[i])
            z = self.denoise_update(z, eps, keep[self.steps - 1 - i], self.mask, self.den_coeffs[i])
        self.x_out.copy_(call("decoder", z) if self.has_autoencoder else z)

    def run(self, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            self.x_in.copy_(torch.from_numpy(x))
            self.mask.copy_(torch.from_numpy(mask))
            self.pattern.copy_(torch.from_numpy(pattern))
            if not self.on_gpu:
                self._body()
            else:
                if self.graph is None:
                    self._capture()
                self.graph.replay()
            return self.x_out.cpu().numpy()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, compilation
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up's stream, so per-stream workspaces (cuBLAS) already exist; other threads'
        # CUDA work (a host's own, another engine's) must not make this capture fail, as "global" mode would
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = graph


def _call(runners: dict, graph: str, *tensors):
    out = runners[graph](*tensors)
    return out[0] if isinstance(out, (list, tuple)) else out


@cache
def _compiled_updates():
    """The two update kernels, compiled once per process: each torch.compile call registers a backend that
    torch keeps until a reset, and a service that meets many step counts rebuilds its loops."""
    options = eager_numerics_options()
    return (torch.compile(_invert_update, fullgraph=True, dynamic=False, options=options),
            torch.compile(_denoise_update, fullgraph=True, dynamic=False, options=options))


def _invert_update(z, eps, coeffs):
    return ddim_update(z, eps, coeffs[0], coeffs[1], coeffs[2], coeffs[3])


def _denoise_update(z, eps, kept, mask, coeffs):
    return reinject(ddim_update(z, eps, coeffs[0], coeffs[1], coeffs[2], coeffs[3]), mask, kept)
