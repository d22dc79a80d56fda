"""Random-weight models with the real architectures, saved the way users' models are stored.

No weights can be downloaded in CI, so tests, the demo and the benchmarks build these:
a tiny latent model (UNet2DModel + VQModel whose config lacks `scaling_factor`, as the
published CompVis one does), a tiny pixel-space model (optionally with ε ≡ 0), a facexlib
BiSeNet `.pth`, and the full CompVis/ldm-celebahq-256 architecture from its configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .fingerprint import public_config

# The published CompVis/ldm-celebahq-256 scheduler config, legacy keys included.
COMPVIS_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.0195,
    "beta_schedule": "scaled_linear", "beta_start": 0.0015, "clip_sample": False,
    "timestep_values": None, "timesteps": 1000, "trained_betas": None,
}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_scheduler(model_dir: Path, config: dict | None = None) -> None:
    _write_json(Path(model_dir) / "scheduler" / "scheduler_config.json", config or COMPVIS_SCHEDULER)


def _drop_scaling_factor(component_dir: Path) -> None:
    path = component_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("scaling_factor", None)
    _write_json(path, config)


def _spread_codebook(vq, image_size: int, generator: torch.Generator) -> None:
    """Codebook entries drawn from the encoder's own outputs on smooth random images, so that
    quantization keeps information instead of collapsing every vector onto one code."""
    with torch.no_grad():
        coarse = torch.rand(16, 3, 4, 4, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
        latents = vq.encode(images).latents
        vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        n = vq.quantize.embedding.weight.shape[0]
        picks = torch.randint(0, vectors.shape[0], (n,), generator=generator)
        jitter = 0.05 * vectors.std() * torch.randn(n, vectors.shape[1], generator=generator)
        vq.quantize.embedding.weight.copy_(vectors[picks] + jitter)


def save_tiny_ldm(model_dir: Path, seed: int = 0, latent_size: int = 16) -> Path:
    """A latent model: 64 x 64 images, 3 x 16 x 16 VQ latents, attention in the UNet."""
    from diffusers import UNet2DModel, VQModel

    model_dir = Path(model_dir)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=latent_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
        flip_sin_to_cos=True, freq_shift=0,
    )
    vq = VQModel(
        in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=256, layers_per_block=1,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=latent_size * 4,
    )
    _spread_codebook(vq, latent_size * 4, generator)
    unet.save_pretrained(model_dir / "unet")
    vq.save_pretrained(model_dir / "vqvae")
    _drop_scaling_factor(model_dir / "vqvae")
    save_scheduler(model_dir)
    return model_dir


def save_tiny_pixel(model_dir: Path, seed: int = 0, image_size: int = 32, zero_eps: bool = False,
                    constant_eps: float | None = None) -> Path:
    """A pixel-space model. With zero_eps, conv_out is zeroed so that ε ≡ 0 and the transform
    must round-trip exactly (spec §3). With constant_eps = b, ε ≡ b: the walks still invert each other
    exactly, but the flipped face is denoised to about −x − 2·sqrt(1 − ā_T)/sqrt(ā_T)·b, far beyond the
    pixel range, so 8-bit storage clamps it and recovery cannot bring it back."""
    from diffusers import UNet2DModel

    model_dir = Path(model_dir)
    torch.manual_seed(seed)
    levels = 2 if image_size <= 32 else 3  # attention only on the coarsest grid keeps CPU runs quick
    unet = UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32)[:levels], down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1), norm_num_groups=8, attention_head_dim=8,
    )
    if zero_eps or constant_eps is not None:
        with torch.no_grad():
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.fill_(constant_eps or 0.0)
    unet.save_pretrained(model_dir / "unet")
    save_scheduler(model_dir)
    return model_dir


def save_random_bisenet(path: Path, seed: int = 0) -> Path:
    """A facexlib-format BiSeNet state dict with random weights."""
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    net = BiSeNet(num_class=19)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def save_compvis_architecture(model_dir: Path, config_dir: Path, seed: int = 0) -> Path:
    """CompVis/ldm-celebahq-256 with random weights, from its published configs."""
    from diffusers import UNet2DModel, VQModel

    model_dir, config_dir = Path(model_dir), Path(config_dir)

    def public(name: str) -> dict:
        return public_config(json.loads((config_dir / name).read_text()))

    torch.manual_seed(seed)
    UNet2DModel.from_config(public("unet_config.json")).save_pretrained(model_dir / "unet")
    VQModel.from_config(public("vqvae_config.json")).save_pretrained(model_dir / "vqvae")
    _drop_scaling_factor(model_dir / "vqvae")
    save_scheduler(model_dir, json.loads((config_dir / "scheduler_config.json").read_text()))
    return model_dir
