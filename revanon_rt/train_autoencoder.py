"""`revanon-rt train-autoencoder`: the first stage of a latent demo model, a small diffusers
AutoencoderKL trained on the same zip of face crops, in resumable pieces.

It writes MODEL_DIR/vae/ (spec §1: E(x) = posterior mean x scaling_factor). `revanon-rt train` then
finds vae/ in the same folder and trains its UNet on those latents.

Recovery encodes an image that the decoder made, so the loss asks for E(D(z)) = z as well as
D(E(x)) = x: without it nothing ties the encoder to the decoder's outputs, and every
anonymize/recover round trip would add that mismatch.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError
from .train import (check_new_run, load_crops, lr_at, record_piece, restore_training_state, resumed_config,
                    save_fp16, save_training_state, timed_conv_kernels, to_device_without_waiting,
                    training_data_identity, training_device, trim_loss_log)

STATE = "autoencoder-state.pt"
CONFIG = "autoencoder-config.json"
LOSS_LOG = "autoencoder-loss.csv"
PIECES = "autoencoder-pieces.jsonl"
DATA_RECORD = "autoencoder-data.json"


AUTOENCODER_FLAGS = {"resolution": "--resolution", "latent_channels": "--latent-channels",
                     "block_out_channels": "--channels", "batch": "--batch", "lr": "--lr"}


@dataclass
class AutoencoderConfig:
    resolution: int = 64
    latent_channels: int = 8
    # three blocks: two downsamplings, so a 64 px crop becomes a 16 x 16 latent
    block_out_channels: tuple = (32, 64, 128)
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    kl_weight: float = 1e-6
    consistency_weight: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 2.0

    def __post_init__(self):
        from .masks import FACE_MAP_SIZE

        widths = tuple(self.block_out_channels)
        if not widths or any(w <= 0 or w % 16 for w in widths):
            raise UsageError(f"--channels {','.join(map(str, widths))}: give positive multiples of 16 (e.g. 32,64,128)")
        factor = 2 ** (len(widths) - 1)
        if self.resolution % factor or FACE_MAP_SIZE % (self.resolution // factor):
            raise UsageError(f"--resolution {self.resolution} with {len(widths)} blocks gives a latent grid that "
                             f"spec §4's {FACE_MAP_SIZE}-pixel face map cannot be pooled onto")


def build_autoencoder(cfg: AutoencoderConfig):
    from diffusers import AutoencoderKL

    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=16,
                         sample_size=cfg.resolution)


def train_autoencoder(data: Path, out: Path, minutes: float, resume: bool, cfg: AutoencoderConfig,
                      device: str = "auto", max_steps: int | None = None, log=print, given: dict | None = None) -> dict:
    """`given`: the settings the user chose; on --resume they must match the checkpoint."""
    import torch

    out = Path(out)
    ckpt = out / "checkpoint"
    if resume and not (ckpt / STATE).exists():
        raise UsageError(f"{ckpt / STATE}: no autoencoder checkpoint to resume from")
    if not resume and (out / "vae").exists():
        raise UsageError(f"{out}: already holds an autoencoder; --resume continues it, or choose another --out")
    if (out / "unet").exists() or (ckpt / "state.pt").exists():
        what = "a UNet" if (out / "unet").exists() else "the checkpoint of a UNet"
        raise UsageError(f"{out}: already holds {what} trained on the current autoencoder; "
                         "changing the autoencoder would invalidate it")
    if resume:
        cfg = AutoencoderConfig(**resumed_config(json.loads((ckpt / CONFIG).read_text()), given or {}, AUTOENCODER_FLAGS))
    else:
        check_new_run(out, ckpt / STATE, set())
    data_identity = training_data_identity(ckpt / DATA_RECORD, data, resume)
    dev = training_device(device)
    torch.manual_seed(cfg.seed)
    images = load_crops(data, cfg.resolution)
    log(f"{len(images)} crops at {cfg.resolution}px from {data}; training the autoencoder on {dev}")
    vae = build_autoencoder(cfg).to(dev)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    if resume:
        step = restore_training_state(ckpt / STATE, {"vae": vae}, optimizer, rng, dev)
        log(f"resumed at step {step}")
        trim_loss_log(ckpt / LOSS_LOG, step)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / CONFIG).write_text(json.dumps(asdict(cfg)))
    (ckpt / DATA_RECORD).write_text(json.dumps(data_identity))
    new_log = not (ckpt / LOSS_LOG).exists()
    started = last_save = time.monotonic()
    window: list = []
    with open(ckpt / LOSS_LOG, "a", newline="") as fh, timed_conv_kernels(dev):
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "reconstruction_mse", "consistency", "kl", "lr", "seconds"])
        vae.train()
        while time.monotonic() - started < minutes * 60 and (max_steps is None or step < max_steps):
            idx = rng.integers(0, len(images), cfg.batch)
            flip = rng.random(cfg.batch) < 0.5
            batch = np.where(flip[:, None, None, None], images[idx][:, :, ::-1], images[idx])
            x = to_device_without_waiting(batch, dev).permute(0, 3, 1, 2).float() / 127.5 - 1
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            mean = posterior.mean
            re_encoded = vae.encode(reconstruction).latent_dist.mean
            rec_loss = torch.nn.functional.mse_loss(reconstruction, x)
            # relative to the latents' own spread, so the weight does not depend on their scale
            cons_loss = torch.nn.functional.mse_loss(re_encoded, mean.detach()) / mean.detach().var().clamp_min(1e-6)
            kl = posterior.kl().mean() / mean[0].numel()
            loss = rec_loss + cfg.consistency_weight * cons_loss + cfg.kl_weight * kl
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            step += 1
            window.append(torch.stack([rec_loss.detach(), cons_loss.detach(), kl.detach()]))
            if step % 50 == 0 or step == max_steps:  # one read-back per log line, not three per step
                rec, cons, kl_mean = torch.stack(window).double().mean(dim=0).tolist()
                writer.writerow([step, round(rec, 6), round(cons, 6), round(kl_mean, 4), lr_at(step, cfg),
                                 round(time.monotonic() - started, 1)])
                fh.flush()
                log(f"step {step}: reconstruction {10 * np.log10(4 / max(rec, 1e-12)):.2f} dB, "
                    f"consistency {cons:.4f}")
                window = []
            if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                save_training_state(ckpt / STATE, {"vae": vae}, optimizer, step, rng, dev)
                last_save = time.monotonic()
    save_training_state(ckpt / STATE, {"vae": vae}, optimizer, step, rng, dev)
    vae.eval()
    scaling_factor = latent_scaling_factor(vae, images, dev)
    save_autoencoder(vae, scaling_factor, out)
    seconds = time.monotonic() - started
    record_piece(ckpt / PIECES, dev, step, seconds, lr=cfg.lr, scaling_factor=scaling_factor)
    log(f"{step} steps; autoencoder in {out / 'vae'} (scaling factor {scaling_factor:.4f})")
    return {"steps": step, "seconds": seconds, "scaling_factor": scaling_factor, "resolution": cfg.resolution}


def latent_scaling_factor(vae, images: np.ndarray, dev, count: int = 2048) -> float:
    """1 / std of the posterior means, as LDM sets it, so the UNet sees unit-variance latents."""
    import torch

    means = []
    with torch.inference_mode():
        for start in range(0, min(count, len(images)), 64):
            x = torch.from_numpy(images[start:start + 64]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
            means.append(vae.encode(x).latent_dist.mean.float().cpu())
    return float(1.0 / torch.cat(means).std())


def save_autoencoder(vae, scaling_factor: float, out: Path) -> None:
    save_fp16(vae, Path(out) / "vae", scaling_factor=scaling_factor)
