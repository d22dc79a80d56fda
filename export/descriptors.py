"""One export descriptor per model: graph name, input/output names and static shapes, and a
sample input. The modules are the reference backend's own (revanon_rt.nets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..masks import FACE_MAP_SIZE


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_manifest(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ExportDescriptor:
    name: str
    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def torch_args(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        # contiguous, as every engine feeds its graphs: an exported program is traced for its sample's strides,
        # and a sample in another layout (a CPU encoder's output can be channels-last) lets export drop a
        # .contiguous() that a later .view() needs, which then fails on eager kernels at run time
        return tuple(torch.from_numpy(np.ascontiguousarray(self.sample[spec.name])).to(device) for spec in self.inputs)


def _smooth_images(batch: int, size: int, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((batch, 3, 8, 8)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()
    noise = rng.normal(0, 0.03, up.shape).astype(np.float32)
    return np.clip(low + (high - low) * (up + noise), low, high).astype(np.float32)


def descriptors_for(reference, batch: int, seed: int = 0) -> list[ExportDescriptor]:
    """What `build` exports for a loaded reference backend, with static shapes for `batch`."""
    rng = np.random.default_rng(seed)
    size = reference.image_size
    c, h, w = reference.latent_shape
    latent = (batch, c, h, w)
    image = (batch, 3, size, size)
    sample_image = _smooth_images(batch, size, rng, -1.0, 1.0)
    out = [ExportDescriptor(
        "unet", reference.eps_net,
        (TensorSpec("sample", latent, "float32"), TensorSpec("timestep", (batch,), "int64")),
        (TensorSpec("eps", latent, "float32"),),
        {"sample": rng.standard_normal(latent).astype(np.float32),
         "timestep": np.full((batch,), 500, dtype=np.int64)})]
    if reference.encoder is not None:
        z = reference.encode(sample_image)
        out.append(ExportDescriptor("encoder", reference.encoder, (TensorSpec("image", image, "float32"),),
                                    (TensorSpec("latent", latent, "float32"),), {"image": sample_image}))
        out.append(ExportDescriptor("decoder", reference.decoder, (TensorSpec("latent", latent, "float32"),),
                                    (TensorSpec("image", image, "float32"),), {"latent": z}))
    if reference.face_map_net is not None:
        out.append(ExportDescriptor(
            "parser", reference.face_map_net, (TensorSpec("image", image, "float32"),),
            (TensorSpec("face_map", (batch, FACE_MAP_SIZE, FACE_MAP_SIZE), "uint8"),),
            {"image": _smooth_images(batch, size, rng, 0.0, 1.0)}))
    return out
