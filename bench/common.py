"""Shared helpers for the benchmarks: machine facts, medians, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"
LFW_DEV_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "dev-128.zip"
SHARED_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "compvis-ldm-celebahq-256"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo-lfw64"


def machine() -> dict:
    cpu = "unknown"
    flags = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx"))]
    except OSError:
        pass
    import os

    out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "simd": sorted(set(flags)),
           "platform": platform.platform(), "python": platform.python_version()}
    for package in ("torch", "diffusers", "onnx", "onnxruntime", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def match_threshold(size: int) -> tuple[float, str]:
    """dlib's cosine threshold at FAR = 0.1% from the dev evaluation at this image size (else the 64 px one),
    and the results file it came from."""
    at_size = RESULTS / f"eval-lfw{size}-dev.json"
    summary = at_size if at_size.is_file() else RESULTS / "eval-lfw64-dev.json"
    return json.loads(summary.read_text())["threshold_cosine_far_0.1%"], summary.stem


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)


def dev_crop_arguments(parser) -> None:
    """The options of the benchmarks that run a model on the first aligned LFW dev crops."""
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=LFW_DEV_CROPS)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="results file stem")


def dev_crop_setup(args):
    """The reference backend of --model; the first --count aligned LFW crops at its size (N x H x W x 3
    uint8); the template face region as a latent mask (h x w); one flip pattern per crop under a fixed
    key (N x C x h x w)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from revanon_rt.faces import template_region
    from revanon_rt.keys import flip_pattern, flip_subkey
    from revanon_rt.masks import latent_mask
    from revanon_rt.reference import TorchReference

    backend = TorchReference(args.model, device=args.device)
    size = backend.image_size
    archive = zipfile.ZipFile(args.images)
    names = sorted(n for n in archive.namelist() if n.endswith((".jpg", ".png")))[: args.count]
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")
                               .resize((size, size), Image.Resampling.LANCZOS)) for n in names])
    c, h, w = backend.latent_shape
    mask = latent_mask(template_region(size), (h, w))
    k_flip = flip_subkey(bytes(32))
    flips = np.stack([flip_pattern(k_flip, bytes([i]) * 16, (c, h, w)) for i in range(len(rgb))])
    return backend, rgb, mask, flips


def run_cli(*args: object) -> None:
    """The real command line, in a subprocess; a failure stops the benchmark."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "revanon_rt", *map(str, args)], check=True, capture_output=True)


def cli_workspace(name: str, size: int, count: int) -> tuple[Path, list[Path], Path]:
    """For the benchmarks of the command line: the work folder WORK/name, the first `count` LFW dev crops
    at the model's size as PNGs in its faces/ (LFW crops stay in the ignored work folder), and a key."""
    import io
    import zipfile

    from PIL import Image

    from revanon_rt.keys import keygen

    root = WORK / name
    (root / "faces").mkdir(parents=True, exist_ok=True)
    paths = []
    with zipfile.ZipFile(LFW_DEV_CROPS) as z:
        for entry in sorted(n for n in z.namelist() if n.endswith((".png", ".jpg")))[:count]:
            im = Image.open(io.BytesIO(z.read(entry))).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
            paths.append(root / "faces" / (Path(entry).stem + ".png"))
            im.save(paths[-1])
    key = root / "k.key"
    if not key.exists():
        keygen(key)
    return root, paths, key
