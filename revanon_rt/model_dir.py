"""Checking a diffusers model folder (spec §1) before anything heavy is loaded. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .fingerprint import read_config, weight_files
from .masks import FACE_MAP_SIZE


@dataclass(frozen=True)
class ModelLayout:
    root: Path
    autoencoder: str | None  # "vqvae", "vae" or None for a pixel-space model
    scheduler_config: dict
    autoencoder_config: dict | None
    image_size: int
    latent_shape: tuple[int, int, int]  # C, h, w

    @property
    def scaling_factor(self) -> float:
        # VQ latents are always unscaled (spec §1): the CompVis config omits scaling_factor
        # and diffusers' default of 0.18215 would be wrong there.
        if self.autoencoder != "vae":
            return 1.0
        return float(self.autoencoder_config.get("scaling_factor", 0.18215))


WEIGHTS_NAME = "diffusion_pytorch_model"


def loaded_weight_files(component_dir: Path) -> list[Path]:
    """The weight files diffusers' from_pretrained reads for this component when told which format
    (reference.py passes use_safetensors): the single file, or the shards its index lists."""
    suffix = weight_files(component_dir)[0].suffix
    single = component_dir / f"{WEIGHTS_NAME}{suffix}"
    if single.is_file():
        return [single]
    index = component_dir / f"{WEIGHTS_NAME}{suffix}.index.json"
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return sorted({component_dir / str(name) for name in shards})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{component_dir}: no {single.name} (nor a readable {index.name} for shards), which is "
                         "the file diffusers loads") from None


def check_weights_are_the_fingerprinted_ones(component_dir: Path) -> None:
    """The fingerprint (spec §7) covers every *.safetensors file of a component (or every *.bin where there is
    none), while diffusers loads one file or one set of shards: a folder where these differ (an extra
    .fp16.safetensors variant, a stray copy) could run weights that the fingerprint does not cover."""
    hashed = set(weight_files(component_dir))
    loaded = set(loaded_weight_files(component_dir))
    if hashed != loaded:
        extra = sorted(p.name for p in hashed - loaded)
        missing = sorted(p.name for p in loaded - hashed)
        what = (f"holds {', '.join(extra)} besides the weights diffusers loads" if extra else
                f"its index names {', '.join(missing)}, which is not there")
        raise UsageError(f"{component_dir}: {what}; the model fingerprint covers every "
                         f"*{next(iter(hashed)).suffix} file, so keep only the loaded ones (move a variant such "
                         "as .fp16.safetensors to a model folder of its own)")


def _side(value, what: str, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UsageError(f"{path}: {what} {value} is not square; revanon models are square")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise UsageError(f"{path}: {what} {value!r} is not a positive integer")
    return value


def inspect_model_dir(root: Path) -> ModelLayout:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such model folder")
    for needed in ("unet", "scheduler"):
        if not (root / needed).is_dir():
            raise UsageError(f"{root}: not a diffusers model folder (no {needed}/ inside)")
    present = [name for name in ("vqvae", "vae") if (root / name).is_dir()]
    if len(present) > 1:
        raise UsageError(f"{root}: holds both vqvae/ and vae/; keep the one the UNet was trained with")
    autoencoder = present[0] if present else None
    for component in ["unet"] + present:
        if not weight_files(root / component):
            raise UsageError(f"{root / component}: no weights (*.safetensors or *.bin)")
        check_weights_are_the_fingerprinted_ones(root / component)

    unet = read_config(root / "unet", "unet")
    scheduler = read_config(root / "scheduler", "scheduler")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UsageError(f"{root / 'scheduler'}: the model predicts {prediction!r}; revanon v1 needs epsilon")
    unet_class = unet.get("_class_name", "UNet2DModel")
    if unet_class != "UNet2DModel":
        raise UsageError(f"{root / 'unet'}: a {unet_class}; revanon v1 needs an unconditional UNet2DModel")
    in_ch, out_ch = unet.get("in_channels", 3), unet.get("out_channels", 3)
    if in_ch != out_ch:
        raise UsageError(f"{root / 'unet'}: {out_ch} output channels for {in_ch} inputs; "
                         "a model that learns its variance does not predict plain epsilon")
    sample = _side(unet.get("sample_size"), "unet sample_size", root / "unet")
    if FACE_MAP_SIZE % sample:
        raise UsageError(f"{root / 'unet'}: a {sample}x{sample} latent grid; revanon v1 max-pools the "
                         f"{FACE_MAP_SIZE}x{FACE_MAP_SIZE} face map onto it, so its side must divide {FACE_MAP_SIZE}")

    ae_config = None
    factor = 1
    if autoencoder:
        ae_config = read_config(root / autoencoder, autoencoder)
        factor = 2 ** (len(ae_config.get("block_out_channels", [64])) - 1)
        latent_channels = ae_config.get("latent_channels", 4 if autoencoder == "vae" else 3)
        if latent_channels != in_ch:
            raise UsageError(f"{root}: the {autoencoder} makes {latent_channels}-channel latents, "
                             f"the UNet takes {in_ch} channels")
    elif in_ch != 3:
        raise UsageError(f"{root / 'unet'}: a pixel-space model needs 3 input channels, not {in_ch}")
    return ModelLayout(root, autoencoder, scheduler, ae_config, sample * factor, (in_ch, sample, sample))
