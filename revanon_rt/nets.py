"""The torch graphs behind E, D, ε and the face parser (spec §1 and §4).

The reference backend runs these modules eagerly and the export stage traces the very
same modules, so each model's semantics are written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masks import BISENET_CLASSES, BISENET_FACE_LABELS, FACE_MAP_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EpsNet(nn.Module):
    """ε(x, t): sample N x C x h x w, timestep N (int64) -> eps."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


class VQEncoder(nn.Module):
    """E(x) = vqvae.encode(x).latents, the pre-quantization latent, unscaled."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode(image).latents


class VQDecoder(nn.Module):
    """D(z) = vqvae.decode(z).sample, which quantizes to the codebook first."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode(latent).sample


class KLEncoder(nn.Module):
    """E(x) = posterior mean x scaling_factor."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.scaling_factor


class KLDecoder(nn.Module):
    """D(z) = decode(z / scaling_factor)."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


class FaceMapNet(nn.Module):
    """BiSeNet face parsing to the 512 x 512 face map F: image in [0, 1] -> uint8 {0, 1}."""

    def __init__(self, bisenet: nn.Module):
        super().__init__()
        self.bisenet = bisenet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        is_face = torch.zeros(BISENET_CLASSES, dtype=torch.uint8)
        is_face[list(BISENET_FACE_LABELS)] = 1
        self.register_buffer("is_face", is_face)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image01, size=(FACE_MAP_SIZE, FACE_MAP_SIZE), mode="bilinear",
                          align_corners=False, antialias=False)
        logits = self.bisenet((x - self.mean) / self.std)[0]
        return self.is_face[logits.argmax(dim=1)]
