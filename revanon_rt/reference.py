"""The PyTorch reference backend: diffusers models in strict fp32, run eagerly."""

from __future__ import annotations

import os
import pickle
import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import UsageError
from .fingerprint import model_fingerprint, public_config, weight_files
from .model_dir import ModelLayout, inspect_model_dir
from .schedule import NoiseSchedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from . import nets  # noqa: E402


def set_tf32(allowed: bool) -> None:
    """TF32 in cuBLAS and cuDNN, or strict fp32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    torch.set_float32_matmul_precision("high" if allowed else "highest")


def use_strict_fp32() -> None:
    """No TF32, no autotuning, deterministic kernels: the reference must mean the same thing everywhere."""
    set_tf32(False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    # deterministic mode would also NaN-fill every new buffer: ~300 extra writes per UNet call, and no
    # kernel here reads memory it did not write
    torch.utils.deterministic.fill_uninitialized_memory = False


def tf32_off():
    """TF32 off for the reference's own calls. A tf32 compiled engine in the same process turns it on
    globally, and the reference must stay strict fp32 beside it."""
    return tf32_mode(False)


# TF32 is one switch for the whole process: models in other threads (a library's Anonymizers each have
# their own lock) take turns here, so that none runs under another's setting or leaves it set.
_TF32_SWITCH = threading.RLock()


@contextmanager
def tf32_mode(allowed: bool):
    """TF32 as one caller needs it, whatever the process-wide switch says, restored afterwards."""
    with _TF32_SWITCH:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision())
        set_tf32(allowed)
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
            torch.set_float32_matmul_precision(saved[2])


def torch_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name != "cpu":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch")
        if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return torch.device(name)


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def load_noise_schedule(layout: ModelLayout) -> NoiseSchedule:
    from diffusers import DDIMScheduler

    _quiet_diffusers()
    try:
        scheduler = DDIMScheduler.from_config(public_config(layout.scheduler_config))
    except Exception as exc:
        raise UsageError(f"{layout.root / 'scheduler'}: not a usable DDIM config ({exc})") from None
    return NoiseSchedule(scheduler.alphas_cumprod.to(torch.float32).numpy().copy(),
                         scheduler.config.timestep_spacing, int(scheduler.config.steps_offset))


def load_pretrained(cls, root: Path, subfolder: str):
    """A diffusers component from a local model folder: fp32, eval mode, no gradients; a clear error if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the format the fingerprint covered (model_dir checks the files are the same ones)
            model = cls.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                        torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                        use_safetensors=weight_files(root / subfolder)[0].suffix == ".safetensors")
    except Exception as exc:
        raise UsageError(f"{root / subfolder}: cannot load the weights ({type(exc).__name__}: {exc})") from None
    _align_tensors(model)
    return model.eval().requires_grad_(False)


def _align_tensors(model: torch.nn.Module) -> None:
    """diffusers leaves safetensors weights at unaligned addresses, and a CPU GEMM rounds differently by
    alignment: an exported copy of the same weights (aligned, as every fresh tensor is) then gave other
    numbers than the reference, 1e-7 apart on one linear layer."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def _bisenet_class():
    """facexlib's BiSeNet. The facexlib package's __init__ imports OpenCV, detection and tracking
    code that parsing does not need; where those are missing, load only the parsing modules."""
    try:
        from facexlib.parsing.bisenet import BiSeNet

        return BiSeNet
    except ImportError as exc:
        import importlib.machinery
        import importlib.util
        import sys
        import types

        spec = importlib.util.find_spec("facexlib")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError("the bisenet masker needs facexlib: pip install facexlib") from exc
        root = Path(list(spec.submodule_search_locations)[0])
        for name, folder in (("facexlib", root), ("facexlib.parsing", root / "parsing")):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                package = types.ModuleType(name)
                package.__path__ = [str(folder)]
                sys.modules[name] = package
        from facexlib.parsing.bisenet import BiSeNet

        return BiSeNet


def load_bisenet(path: Path) -> torch.nn.Module:
    """facexlib's 19-class BiSeNet from a local .pth, with no download."""
    BiSeNet = _bisenet_class()

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = BiSeNet(num_class=19)
        net.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such BiSeNet weights file") from None
    except Exception as exc:
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Weights only" in text:
            # torch's own message goes on to suggest weights_only=False, which would run code from the file
            detail = "not a PyTorch file of tensors"
        else:
            detail = f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:200]}"
        raise UsageError(f"{path}: not facexlib BiSeNet weights ({detail})") from None
    return net.to(torch.float32).eval().requires_grad_(False)


class TorchReference:
    """Backend with encode / decode / eps / parse on numpy float32 arrays."""

    name = "pytorch"
    precision = "fp32"
    supports_fused = False
    batch = 1  # faces per call that runs go for: any size works, one keeps memory predictable

    def __init__(self, model_dir: Path, device: str = "cpu", parser: Path | None = None):
        # the folder's structure and weight files are checked before diffusers is imported (seconds)
        self.layout = inspect_model_dir(model_dir)
        self.device = torch_device(device)
        self.fingerprint = model_fingerprint(self.layout.root)
        use_strict_fp32()
        _quiet_diffusers()
        from diffusers import AutoencoderKL, UNet2DModel, VQModel

        self.noise = load_noise_schedule(self.layout)
        self.image_size = self.layout.image_size
        self.latent_shape = self.layout.latent_shape
        unet = load_pretrained(UNet2DModel, self.layout.root, "unet")
        self.eps_net = nets.EpsNet(unet).to(self.device).eval()
        self.encoder = self.decoder = None
        if self.layout.autoencoder == "vqvae":
            vq = load_pretrained(VQModel, self.layout.root, "vqvae").to(self.device)
            self.encoder, self.decoder = nets.VQEncoder(vq).eval(), nets.VQDecoder(vq).eval()
        elif self.layout.autoencoder == "vae":
            vae = load_pretrained(AutoencoderKL, self.layout.root, "vae").to(self.device)
            sf = self.layout.scaling_factor
            self.encoder, self.decoder = nets.KLEncoder(vae, sf).eval(), nets.KLDecoder(vae, sf).eval()
        self.face_map_net = nets.FaceMapNet(load_bisenet(parser)).to(self.device).eval() if parser else None

    @property
    def can_parse(self) -> bool:
        return self.face_map_net is not None

    @property
    def identity(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}

    def schedule(self, steps: int):
        return self.noise.for_steps(steps)

    def _run(self, module, *arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), tf32_off():
            out = module(*(torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays))
        return out.cpu().numpy()

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32, copy=True) if self.encoder is None else self._run(self.encoder, x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return z.astype(np.float32, copy=True) if self.decoder is None else self._run(self.decoder, z)

    def eps(self, z: np.ndarray, t: int) -> np.ndarray:
        return self._run(self.eps_net, z, np.full((z.shape[0],), t, dtype=np.int64))

    def parse(self, image01: np.ndarray) -> np.ndarray:
        if self.face_map_net is None:
            raise UsageError("the bisenet masker needs --parser BISENET.pth (facexlib's parsing_bisenet.pth)")
        return self._run(self.face_map_net, image01)
