"""`revanon-rt train`: a small unconditional ε-prediction face model, trained on a zip of aligned crops
in time-boxed pieces that resume from local checkpoints. It works in pixel space, or in the latent space of
the vae/ that `train-autoencoder` left in the same folder.

The result is a diffusers folder (unet/ in fp16 safetensors, scheduler/, and vae/ for a latent model) that
the core engine loads (spec §1), with a model card, the loss curve and samples drawn from the model itself.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UsageError
from .fingerprint import public_config
from .images import image_members, zip_image_rgb
from .pixels import to_model

# DDPM's linear schedule: a pixel-space model needs ā(T) near 0.
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False, "prediction_type": "epsilon",
             "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"}
ARCHITECTURES = {
    # 6.9 M parameters, 13.1 MiB in fp16: under the 15 MB a committed demo model may take
    "small": {"block_out_channels": (64, 96, 128, 160), "layers_per_block": 1,
              "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
              "attention_head_dim": 32, "norm_num_groups": 32},
    # 3.7 M parameters: trainable at 64 px on a CPU (about 0.16 s per image per step on 2 cores)
    "compact": {"block_out_channels": (32, 64, 96, 128), "layers_per_block": 1,
                "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                "attention_head_dim": 32, "norm_num_groups": 16},
    # for the 8 x 16 x 16 latent of `train-autoencoder`: 6.7 M parameters, 13.5 MB in fp16
    "latent": {"block_out_channels": (96, 128, 160), "layers_per_block": 1,
               "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               "attention_head_dim": 32, "norm_num_groups": 32},
    # for tests and CPU smoke runs
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
             "attention_head_dim": 8, "norm_num_groups": 8},
}
MAX_WEIGHTS_BYTES = 15 * 1000 * 1000
DATA_RECORD = "data.json"
LFW_TRAIN_ZIP = "train-128.zip"  # ../shared/data/lfw's identity-disjoint training split, which the card describes


@dataclass
class TrainConfig:
    resolution: int = 128
    architecture: str = "small"
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.9995
    seed: int = 0
    checkpoint_minutes: float = 2.0


def load_crops(zip_path: Path, resolution: int) -> np.ndarray:
    """Every image of the zip as N x H x W x 3 uint8, resized (Lanczos) when needed."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{zip_path}: not a readable zip of face crops ({exc})") from None
    names = image_members(archive)
    if not names:
        raise UsageError(f"{zip_path}: holds no .jpg or .png images")
    out = np.empty((len(names), resolution, resolution, 3), np.uint8)
    for i, name in enumerate(names):
        im = zip_image_rgb(archive, name, zip_path)
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
        out[i] = np.asarray(im)
    return out


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr (a TrainConfig or an AutoencoderConfig), then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def resumed_config(saved: dict, given: dict, flags: dict, changeable: tuple = ()) -> dict:
    """A resumed run's settings: the checkpoint's, with those in `changeable` replaced where the user gave
    them. Any other setting the user gave must be the checkpoint's, since the weights were made with it and
    the card reports one value for the whole run; a different one is refused, not silently dropped."""
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    for key, value in given.items():
        if key not in changeable and shown(saved.get(key)) != shown(value):
            can = f"; only {' and '.join(flags[k] for k in changeable)} can change" if changeable else ""
            raise UsageError(f"{flags[key]} {shown(value)}: the checkpoint was trained with {flags[key]} "
                             f"{shown(saved.get(key))}, which a resumed run keeps{can}")
    return {**saved, **{k: v for k, v in given.items() if k in changeable}}


def training_device(device: str):
    """The torch device `--device` names; a GPU asked for and not there stops the run before it trains."""
    from .api import resolve_device
    from .reference import torch_device

    return torch_device(resolve_device(device))


def check_new_run(out: Path, state: Path, allowed: set[str]) -> None:
    """A run without --resume starts only in a folder that is new, empty or holds just `allowed` (what an
    earlier stage left): never over an unfinished run's checkpoint or over files it did not write."""
    if state.exists():
        raise UsageError(f"{out}: holds the checkpoint of an unfinished run; --resume continues it, or choose "
                         "another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed) if out.is_dir() else []
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise UsageError(f"--out {out}: holds {', '.join(foreign[:3])}{more}, which training would overwrite or mix "
                         "with; choose a new or empty folder")


def training_data_identity(record: Path, data: Path, resume: bool) -> dict:
    """The data zip's name, size and sha256, which the checkpoint keeps in `record`. A run keeps one data
    set over all its pieces: the card names one, and its license note follows it. A checkpoint from before
    the record was kept takes the data given."""
    from .engines.manifest import file_sha256

    try:
        identity = {"name": Path(data).name, "bytes": Path(data).stat().st_size, "sha256": file_sha256(data)}
    except OSError as exc:
        raise UsageError(f"--data {data}: cannot be read ({exc.strerror or exc})") from None
    if resume and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("sha256") != identity["sha256"]:
            raise UsageError(f"--data {data}: this run was trained on {saved.get('name')} ({saved.get('bytes')} bytes, "
                             f"sha256 {str(saved.get('sha256'))[:12]}…), and a resumed run keeps its data; give that "
                             "zip, or start a new run in another --out")
    return identity


def trim_loss_log(path: Path, step: int) -> None:
    """On resume: drop the rows a killed piece logged after its last checkpoint, which the resumed piece
    trains and logs again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    logged_steps = [line.split(",", 1)[0] for line in lines[1:]]
    kept = lines[:1] + [line for line, logged in zip(lines[1:], logged_steps) if logged.isdigit() and int(logged) <= step]
    if len(kept) != len(lines):
        path.with_name(path.name + ".tmp").write_text("".join(kept))
        path.with_name(path.name + ".tmp").replace(path)


TRAIN_FLAGS = {"resolution": "--resolution", "architecture": "--architecture", "batch": "--batch", "lr": "--lr",
               "ema_decay": "--ema-decay"}


def train(data: Path, out: Path, minutes: float, resume: bool, cfg: TrainConfig, device: str = "auto",
          max_steps: int | None = None, log=print, given: dict | None = None) -> dict:
    """`given`: the settings the user chose. On --resume, lr and ema_decay among them replace the saved ones
    from the resumed step on; the others must match the checkpoint."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    out = Path(out)
    state_path = out / "checkpoint" / "state.pt"
    if resume:
        if not state_path.exists():
            raise UsageError(f"{state_path}: no checkpoint to resume from")
        saved_cfg = json.loads((out / "checkpoint" / "config.json").read_text())
        cfg = TrainConfig(**resumed_config(saved_cfg, given or {}, TRAIN_FLAGS, ("lr", "ema_decay")))
        changes = {k: v for k, v in (given or {}).items() if k in ("lr", "ema_decay")}
        if changes:
            log(f"from here on: {changes}")
    else:
        if (out / "unet").exists():
            resumable = "--resume continues it, or " if state_path.exists() else ""  # a committed model has no checkpoint
            raise UsageError(f"{out}: already holds a model; {resumable}choose another --out")
        check_new_run(out, state_path, {"vae", "checkpoint"})  # vae/: train-autoencoder's, for a latent model
    data_identity = training_data_identity(out / "checkpoint" / DATA_RECORD, data, resume)
    dev = training_device(device)
    torch.manual_seed(cfg.seed)
    images = load_crops(data, cfg.resolution)
    log(f"{len(images)} crops at {cfg.resolution}px from {data}; training on {dev}")
    samples = training_samples(images, out, dev, log)
    channels, side = samples.shape[2], samples.shape[3]
    unet = UNet2DModel(sample_size=side, in_channels=channels, out_channels=channels, **ARCHITECTURES[cfg.architecture]).to(dev)
    ema = UNet2DModel(sample_size=side, in_channels=channels, out_channels=channels, **ARCHITECTURES[cfg.architecture]).to(dev)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    scheduler = DDIMScheduler.from_config(public_config(SCHEDULER))
    abar = scheduler.alphas_cumprod.to(dev)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    if resume:
        step = restore_training_state(state_path, {"unet": unet, "ema": ema}, optimizer, rng, dev)
        log(f"resumed at step {step}")
        trim_loss_log(out / "checkpoint" / "loss.csv", step)
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    (out / "checkpoint" / "config.json").write_text(json.dumps(asdict(cfg)))
    (out / "checkpoint" / DATA_RECORD).write_text(json.dumps(data_identity))
    loss_log = out / "checkpoint" / "loss.csv"
    new_log = not loss_log.exists()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    # on a GPU the crops live there and the loss is read back every 100 steps: anything that waits for a
    # step keeps the next one from being queued
    samples_on_device = torch.from_numpy(samples).to(dev)
    started = last_ckpt = time.monotonic()
    window: list = []
    with open(loss_log, "a", newline="") as fh, timed_conv_kernels(dev):
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "loss", "lr", "seconds"])
        unet.train()
        while time.monotonic() - started < minutes * 60 and (max_steps is None or step < max_steps):
            idx = rng.integers(0, len(images), cfg.batch)
            flip = rng.random(cfg.batch) < 0.5
            draws = np.concatenate([idx, flip.astype(np.int64), rng.integers(0, 1000, cfg.batch)])
            idx_on_device, flip_on_device, t = to_device_without_waiting(draws, dev).split(cfg.batch)
            x0 = samples_on_device[idx_on_device, flip_on_device]
            if x0.dtype == torch.uint8:
                x0 = x0.float() / 127.5 - 1
            noise = torch.randn_like(x0)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            with autocast:
                pred = unet(xt, t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, unet_params, 1 - decay)  # one launch, not one per tensor
            step += 1
            window.append(loss.detach())
            if step % 100 == 0 or step == max_steps:
                mean_loss = torch.stack(window).double().mean().item()
                writer.writerow([step, round(mean_loss, 5), lr_at(step, cfg), round(time.monotonic() - started, 1)])
                fh.flush()
                log(f"step {step}: loss {mean_loss:.4f}")
                window = []
            if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                save_training_state(state_path, {"unet": unet, "ema": ema}, optimizer, step, rng, dev)
                last_ckpt = time.monotonic()
    save_training_state(state_path, {"unet": unet, "ema": ema}, optimizer, step, rng, dev)
    save_model(ema, out)
    seconds = time.monotonic() - started
    record_piece(out / "checkpoint" / "pieces.jsonl", dev, step, seconds, lr=cfg.lr, ema_decay=cfg.ema_decay)
    log(f"{step} steps; weights in {out / 'unet'}")
    return {"steps": step, "seconds": seconds, "crops": len(images)}


@contextlib.contextmanager
def timed_conv_kernels(dev):
    """On a GPU, cuDNN's timed choice of convolution kernels: every training step has the same shapes, so it
    is made once and paid back at every step, and training needs no deterministic kernels (the card's
    samples, drawn after, do)."""
    import torch

    before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, dev.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def to_device_without_waiting(array: np.ndarray, dev):
    """A step's host data on the device. A copy from pageable memory synchronizes the stream, so it would
    wait for the steps still queued; one from pinned memory does not."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else tensor


def training_samples(images: np.ndarray, out: Path, dev, log=print) -> np.ndarray:
    """What the UNet learns to denoise, as N x 2 x C x h x w (each crop and its mirror image): the
    pixels of a pixel-space model, kept as uint8 (a quarter of the memory), or, when OUT holds the vae/
    of `train-autoencoder`, the float32 latents E(x) of spec §1, computed once here, not at every step."""
    import torch

    with_mirrors = np.stack([images, images[:, :, ::-1]], axis=1)
    if not (Path(out) / "vae").is_dir():
        return np.ascontiguousarray(with_mirrors.transpose(0, 1, 4, 2, 3))
    pixels = to_model(with_mirrors)
    from diffusers import AutoencoderKL

    from .nets import KLEncoder
    from .reference import load_pretrained

    vae = load_pretrained(AutoencoderKL, Path(out), "vae").to(dev)
    if vae.config.sample_size != images.shape[1]:
        raise UsageError(f"{out / 'vae'}: trained on {vae.config.sample_size}px crops; "
                         f"pass --resolution {vae.config.sample_size}")
    encoder = KLEncoder(vae, vae.config.scaling_factor)
    flat = pixels.reshape(-1, *pixels.shape[2:])
    latents = []
    with torch.inference_mode():
        for start in range(0, len(flat), 128):
            latents.append(encoder(torch.from_numpy(flat[start:start + 128]).to(dev)).float().cpu().numpy())
    latents = np.concatenate(latents)
    log(f"latent space: {latents.shape[1]} x {latents.shape[2]} x {latents.shape[3]} from {out / 'vae'} "
        f"(std {latents.std():.3f} after scaling)")
    return latents.reshape(len(images), 2, *latents.shape[1:])


def cpu_name() -> str:
    import os

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def training_pieces(out: Path, log_name: str = "pieces.jsonl") -> list[dict]:
    path = Path(out) / "checkpoint" / log_name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def save_training_state(path: Path, modules: dict, optimizer, step: int, rng, dev) -> None:
    """What the next piece resumes from, replaced whole: the modules' and the optimizer's state, the step and
    every random generator (without the GPU's, a resumed piece would replay the first piece's noise)."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({**{name: module.state_dict() for name, module in modules.items()},
                "optimizer": optimizer.state_dict(), "step": step, "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}, tmp)
    tmp.replace(path)


def restore_training_state(path: Path, modules: dict, optimizer, rng, dev) -> int:
    """save_training_state's state put back into the modules, the optimizer and the generators; returns the step."""
    import torch

    # loaded on the CPU: AdamW keeps each "step" where it was loaded, and on a GPU it would read them back with a
    # sync per parameter per step; load_state_dict moves weights and moments to the model's device
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"].cpu())
    if dev.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), dev)
    return state["step"]


def record_piece(path: Path, dev, step: int, seconds: float, **settings) -> None:
    """One line of the pieces log that the model card sums up: where a piece ran, to which step, how long."""
    import torch

    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    with open(path, "a") as fh:
        fh.write(json.dumps({"device": dev.type, "hardware": hardware, "steps_to": step, "seconds": round(seconds, 1),
                             **settings, "torch": torch.__version__}) + "\n")


def save_fp16(model, folder: Path, **config) -> None:
    """A diffusers model's weights in fp16 safetensors, one file under the 15 MB a committed demo model may take;
    the engine computes in fp32 from these exact values. `config` is added to its config.json."""
    import copy

    half = copy.deepcopy(model).to("cpu").half()
    if config:
        half.register_to_config(**config)
    half.save_pretrained(folder, safe_serialization=True)
    weights = Path(folder) / "diffusion_pytorch_model.safetensors"
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise UsageError(f"{weights}: {weights.stat().st_size} bytes, over the 15 MB a demo model may take")


def save_model(ema, out: Path) -> None:
    """The EMA weights and the DDIM scheduler config."""
    save_fp16(ema, out / "unet")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")


def sample_faces(backend, count: int, steps: int = 50, seed: int = 0, clip: bool = True) -> np.ndarray:
    """Faces sampled from the model with DDIM (η = 0), decoded to uint8 images: never training images.

    `clip` bounds each predicted x0 of a pixel-space model to the pixel range, as diffusers' `clip_sample` does. A small or
    short-trained model predicts ε poorly at low noise, and without the bound its samples drift into
    saturated colour noise. This is for generating faces only: the transform never clips, because
    clipping cannot be inverted."""
    from .pixels import to_u8
    from .sampler import ddim_coefficients, ddim_update

    sched = backend.schedule(steps)
    z = np.random.default_rng(seed).standard_normal((count, *backend.latent_shape)).astype(np.float32)
    pixel_space = tuple(backend.latent_shape) == (3, backend.image_size, backend.image_size)
    for i in range(sched.steps):
        eps = backend.eps(z, sched.timesteps[i])
        s_from, r_from, s_to, r_to = ddim_coefficients(sched.levels[i], sched.levels[i + 1])
        if clip and pixel_space:
            x0 = np.clip((z - r_from * eps) / s_from, -1.0, 1.0)
            eps = (z - s_from * x0) / r_from
        z = ddim_update(z, eps, s_from, r_from, s_to, r_to)
    return to_u8(backend.decode(z))


def sample_grid(model_dir: Path, count: int = 16, steps: int = 50, seed: int = 0, device: str = "cpu") -> np.ndarray:
    from .reference import TorchReference

    backend = TorchReference(model_dir, device=device)
    faces = sample_faces(backend, count, steps, seed)
    side = int(math.ceil(math.sqrt(count)))
    size = backend.image_size
    grid = np.full((side * size, side * size, 3), 255, np.uint8)
    for k, face in enumerate(faces):
        r, c = divmod(k, side)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = face
    return grid


def loss_curve_png(loss_csv: Path, width: int = 640, height: int = 240) -> np.ndarray:
    """The training loss on a log scale, drawn with Pillow (no plotting dependency)."""
    from PIL import ImageDraw

    rows = list(csv.DictReader(open(loss_csv)))
    steps = np.array([float(r["step"]) for r in rows])
    losses = np.log10(np.array([float(r["loss"]) for r in rows]))
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    if len(rows) >= 2:
        lo, hi = losses.min(), losses.max() if losses.max() > losses.min() else losses.min() + 1
        xs = 40 + (steps - steps.min()) / max(1, steps.max() - steps.min()) * (width - 60)
        ys = 20 + (hi - losses) / (hi - lo) * (height - 50)
        draw.line(list(zip(xs, ys)), fill=(200, 40, 40), width=2)
        draw.text((5, 5), f"loss {10 ** hi:.3f}", fill="black")
        draw.text((5, height - 25), f"loss {10 ** lo:.3f}   steps {int(steps.min())}..{int(steps.max())}", fill="black")
    return np.asarray(im)


def linear_latent_term(ae_cfg: dict) -> str:
    weight = ae_cfg.get("linear_latent_weight", 0.0)
    return f" + {weight:g} × squared distance of E(x) from its patches' principal components" if weight else ""


def _rate(value: float) -> str:
    """3e-04, 1.5e-04: the digits a learning rate was given with, no more and no fewer."""
    return f"{value:.1e}".replace(".0e", "e")


def _setting_history(pieces: list[dict], key: str, final: float, show=str) -> str:
    """'2e-04 to step 844, then 6e-04' from the pieces' records (a setting changed with --resume)."""
    spans: list[list] = []
    for piece in pieces:
        if spans and spans[-1][0] == piece[key]:
            spans[-1][1] = piece["steps_to"]
        else:
            spans.append([piece[key], piece["steps_to"]])
    if len(spans) < 2:
        return show(final)
    return ", then ".join(show(value) + (f" to step {end}" if i < len(spans) - 1 else "")
                          for i, (value, end) in enumerate(spans))


def write_model_card(out: Path, data: Path, result: dict, samples: int, device: str) -> None:
    """README.md, loss.png and samples.png beside the weights."""
    from .images import encode_png, write_atomic

    out = Path(out)
    loss_csv = out / "checkpoint" / "loss.csv"
    write_atomic(out / "loss.png", encode_png(loss_curve_png(loss_csv), None, None, {}), overwrite=True)
    if samples:
        write_atomic(out / "samples.png", encode_png(sample_grid(out, samples, device=device), None, None, {}),
                     overwrite=True)
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    rows = list(csv.DictReader(open(loss_csv)))
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    pieces = training_pieces(out)
    hardware = "; ".join(sorted({p["hardware"] for p in pieces})) or "not recorded"
    wall = sum(p["seconds"] for p in pieces)
    steps = result.get("steps") or (pieces[-1]["steps_to"] if pieces else rows[-1]["step"] if rows else 0)
    latent = (out / "vae").is_dir()
    if latent:
        from .train_autoencoder import PIECES

        ae = json.loads((out / "vae" / "config.json").read_text())
        ae_record = out / "checkpoint" / "autoencoder-config.json", out / "checkpoint" / "autoencoder-loss.csv"
        ae_mb = (out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
        side = cfg["resolution"] // 2 ** (len(ae["block_out_channels"]) - 1)
        space = (f"in the {ae['latent_channels']}×{side}×{side} latent of its own autoencoder,\nfor "
                 f"{cfg['resolution']}×{cfg['resolution']} crops")
        loads = (f"a revanon v1 latent model (spec §1):\n`vae/` (diffusers AutoencoderKL, fp16 safetensors, "
                 f"{ae_mb:.1f} MB, scaling factor {ae['scaling_factor']:.4f}),")
        if all(path.is_file() for path in ae_record):
            ae_cfg = json.loads(ae_record[0].read_text())
            ae_pieces = training_pieces(out, PIECES)
            # pieces from before --consistency-weight were trained at the checkpoint's one value
            consistency = _setting_history([{"consistency_weight": ae_cfg["consistency_weight"], **p} for p in ae_pieces],
                                           "consistency_weight", ae_cfg["consistency_weight"])
            consistency = f"({consistency})" if "then" in consistency else consistency
            ae_rows = list(csv.DictReader(open(ae_record[1])))
            ae_line = (f"- **Autoencoder:** `revanon-rt train-autoencoder`, "
                       f"{ae_pieces[-1]['steps_to'] if ae_pieces else '?'} "
                       f"steps, batch {ae_cfg['batch']}, AdamW lr {_setting_history(ae_pieces, 'lr', ae_cfg['lr'], _rate)},\n"
                       f"  blocks {ae_cfg['block_out_channels']}; loss = pixel MSE + {consistency} × "
                       f"E(D(z)) consistency + {_rate(ae_cfg['kl_weight'])} × KL"
                       f"{linear_latent_term(ae_cfg)}.\n"
                       f"  Last logged reconstruction {10 * math.log10(4 / float(ae_rows[-1]['reconstruction_mse'])):.1f} dB "
                       f"(training crops), {len(ae_pieces)} piece(s), {sum(p['seconds'] for p in ae_pieces) / 60:.0f} "
                       "minutes.\n")
        else:  # a vae/ copied in: its training record stayed where it was trained
            ae_line = "- **Autoencoder:** `vae/` was trained elsewhere; its training record is not in this folder.\n"
        bounded = "decoded, latents never bounded"
    else:
        space = f"in pixel space\n({cfg['resolution']}×{cfg['resolution']})"
        loads = "a revanon v1 pixel-space model (spec §1):"
        ae_line = ""
        bounded = "each predicted x0 bounded to the pixel range as diffusers' `clip_sample` does"
    if Path(data).name == LFW_TRAIN_ZIP:
        data_text = ("LFW crops (centre 196 of 250 px, resized), 4,085 people who appear in\n  none of the evaluation "
                     "folds")
        license_text = ("the weights derive from Labeled Faces in the Wild, a research data set: use this model for\n"
                        "  research and testing only.")
    else:
        data_text = f"{result['crops']} face crops" if result.get("crops") else "face crops"
        license_text = f"the weights derive from `{Path(data).name}`, whose terms govern their use."
    lr_history = _setting_history(pieces, "lr", cfg["lr"], _rate)
    ema_history = _setting_history(pieces, "ema_decay", cfg["ema_decay"])
    card = f"""# revanon-rt demo face model

An unconditional ε-prediction diffusion model of aligned face crops, {space}, trained by `revanon-rt train`
for the project's demo, tests and evaluation.
It loads as {loads} `unet/` (diffusers UNet2DModel, EMA weights,
fp16 safetensors, {weights.stat().st_size / 1e6:.1f} MB) and `scheduler/` (DDIM, linear betas 1e-4..0.02, 1000 steps).

- **Data:** `{Path(data).name}`: {data_text}, with horizontal flips.
{ae_line}- **Training:** {steps} steps, batch {cfg['batch']}, AdamW lr {lr_history} (a linear warm-up over the
  first {cfg['warmup']} steps), EMA {ema_history}, bf16 autocast on GPU (fp32 on CPU), seed {cfg['seed']},
  architecture `{cfg['architecture']}`. Final loss {rows[-1]['loss'] if rows else 'n/a'}.
  Trained on {hardware}: {len(pieces)} piece(s), {wall / 60:.0f} minutes of wall time.
- **Loss curve:** `loss.png`. **Samples:** `samples.png` shows faces *sampled from the model* (DDIM, 50 steps,
  {bounded}), not training images.
  The transform itself never bounds anything: it follows spec §3 and §6 exactly.
- **License:** {license_text} It is small and blurry by design; it is not a product model.
"""
    (out / "README.md").write_text(card)
