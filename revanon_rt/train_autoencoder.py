"""`revanon-rt train-autoencoder`: the first stage of a latent demo model, a small diffusers
AutoencoderKL trained on the same zip of face crops, in resumable pieces.

It writes MODEL_DIR/vae/ (spec §1: E(x) = posterior mean x scaling_factor). `revanon-rt train` then
finds vae/ in the same folder and trains its UNet on those latents.

Recovery encodes an image that the decoder made, so the loss asks for E(D(z)) = z as well as
D(E(x)) = x: without it nothing ties the encoder to the decoder's outputs, and every
anonymize/recover round trip would add that mismatch. It also pulls E(x) toward a linear latent
(LinearPatchLatent), whose directions all carry face energy: the sign flip spreads z_T over every
direction, and a direction the faces leave empty is one that the DDIM round trip cannot bring back.
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
                     "block_out_channels": "--channels", "batch": "--batch", "lr": "--lr",
                     "linear_latent_weight": "--linear-latent-weight", "consistency_weight": "--consistency-weight"}
# A resumed run may raise the consistency weight: a few minutes at 10 after a run at 1 narrowed the re-encoding
# miss (docs/demo-model.md: 15.1% against 17.4%), where 10 from the first step held reconstruction back. It may lower the
# rate too: 2e-4 after 5e-4 took reconstruction from 27.6 to 29.8 dB.
CHANGEABLE_ON_RESUME = ("consistency_weight", "lr")


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
    # Pulls E(x) toward each patch's principal components (LinearPatchLatent). Left free, the encoder packs
    # faces into a few directions (65% of them near-empty at 64 px), and recovery loses what lies in the
    # rest: with an ideal ε, 4 of 16 faces matched after recovery; anchored, 13 of 16
    # (bench/results/oracle-recovery-anchored-autoencoder.md).
    linear_latent_weight: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 2.0

    def __post_init__(self):
        from .masks import FACE_MAP_SIZE

        widths = tuple(self.block_out_channels)
        if not widths or any(w <= 0 or w % 16 for w in widths):
            raise UsageError(f"--channels {','.join(map(str, widths))}: give positive multiples of 16 (e.g. 32,64,128)")
        factor = self.downsampling
        if self.linear_latent_weight and self.latent_channels > 3 * factor * factor:
            raise UsageError(f"--latent-channels {self.latent_channels}: a linear latent of {factor} x {factor} patches "
                             f"has only {3 * factor * factor} directions; give --linear-latent-weight 0")
        if self.resolution % factor or FACE_MAP_SIZE % (self.resolution // factor):
            raise UsageError(f"--resolution {self.resolution} with {len(widths)} blocks gives a latent grid that "
                             f"spec §4's {FACE_MAP_SIZE}-pixel face map cannot be pooled onto")

    @property
    def downsampling(self) -> int:
        """How many times smaller than the crop the latent grid is: one halving per block after the first."""
        return 2 ** (len(self.block_out_channels) - 1)


class LinearPatchLatent:
    """The latent of a linear autoencoder: each P x P patch projected onto the first C principal
    components of the training patches, each scaled to unit variance. Fitted in float64 numpy, so a
    resumed run refits the same basis from the same crops."""

    def __init__(self, images: np.ndarray, patch: int, channels: int, count: int = 6000):
        dims = 3 * patch * patch
        total, outer, n = np.zeros(dims), np.zeros((dims, dims)), 0
        for start in range(0, min(count, len(images)), 500):  # in chunks: 6,000 crops of 128 px are 2.4 GB as float64
            chunk = self._patches(images[start:min(start + 500, count)].astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1, patch)
            total, outer, n = total + chunk.sum(0), outer + chunk.T @ chunk, n + len(chunk)
        self.patch, self.mean = patch, total / n
        covariance = (outer - n * np.outer(self.mean, self.mean)) / (n - 1)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1][:channels]
        self.basis, self.scale = vectors[:, order], np.sqrt(values[order])  # 3P² x C, and each component's std

    @staticmethod
    def _patches(x, patch: int):
        n, _, h, w = x.shape
        return x.reshape(n, 3, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 3 * patch * patch)

    def projector(self, dev):
        """x (N x 3 x H x W torch, [-1, 1]) -> its C x H/P x W/P latent."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=dev)
        projection = torch.tensor(self.basis / self.scale, dtype=torch.float32, device=dev)
        p = self.patch

        def project(x):
            n, _, h, w = x.shape
            patches = x.reshape(n, 3, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h // p, w // p, -1)
            return ((patches - mean) @ projection).permute(0, 3, 1, 2)

        return project


def build_autoencoder(cfg: AutoencoderConfig):
    from diffusers import AutoencoderKL

    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=16,
                         sample_size=cfg.resolution)


def pin_earlier_pieces(path: Path, saved: dict, keys) -> None:
    """Pieces logged before a setting could change on --resume carry no value of it. Write down the one they
    trained with, the checkpoint's, before the config takes a new one: the card would credit them with that."""
    if not path.exists():
        return
    pieces = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if all(key in piece for piece in pieces for key in keys):
        return
    path.write_text("".join(json.dumps({**piece, **{key: saved[key] for key in keys if key not in piece}}) + "\n"
                            for piece in pieces))


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
        saved = json.loads((ckpt / CONFIG).read_text())
        # a checkpoint from before the setting existed was trained without it
        saved.setdefault("linear_latent_weight", 0.0)
        cfg = AutoencoderConfig(**resumed_config(saved, given or {}, AUTOENCODER_FLAGS, CHANGEABLE_ON_RESUME))
        pin_earlier_pieces(ckpt / PIECES, saved, CHANGEABLE_ON_RESUME)
    else:
        check_new_run(out, ckpt / STATE, set())
    data_identity = training_data_identity(ckpt / DATA_RECORD, data, resume)
    dev = training_device(device)
    torch.manual_seed(cfg.seed)
    images = load_crops(data, cfg.resolution)
    log(f"{len(images)} crops at {cfg.resolution}px from {data}; training the autoencoder on {dev}")
    vae = build_autoencoder(cfg).to(dev)
    linear_latent = None
    if cfg.linear_latent_weight:
        linear_latent = LinearPatchLatent(images, cfg.downsampling, cfg.latent_channels).projector(dev)
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
            if linear_latent is not None:
                loss = loss + cfg.linear_latent_weight * torch.nn.functional.mse_loss(mean, linear_latent(x))
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
    record_piece(ckpt / PIECES, dev, step, seconds, lr=cfg.lr, scaling_factor=scaling_factor,
                 consistency_weight=cfg.consistency_weight)
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
