"""The LFW identity evaluation with an ideal ε: the TAR a perfect model of a Gaussian face distribution reaches.

The backend is oracle_recovery.GaussianFaces (the exact posterior ε of a Gaussian fitted to the training
crops, at --model's size and noise schedule), or with --patch its LatentGaussian in a linear patch
autoencoder's latent, or for a latent --model in the latent of that model's own trained autoencoder (the
codec its UNet learned), run through the evaluation itself: the same pairs,
landmark masks, keys, conditions, attacks, linkage test, dlib scoring and summary as `revanon-rt eval
--genuine-only`. The gap between this and the trained model's evaluation is what training costs; what
this still misses, the method costs.

    python bench/oracle_eval.py --model models/demo-lfw64 [--limit 1200] [--out bench/work/eval-oracle]
        [--patch 4 --channels 8 --name eval-oracle-latent-p4c8-dev]
    python bench/oracle_eval.py --model models/demo-lfw64-latent --name eval-oracle-anchored-autoencoder-dev

A run too long for one sitting goes in pieces: `--start 600 --extend bench/results/NAME.json` runs pairs
600 on and adds them to the summary of the pairs before, at its threshold (`revanon-rt eval-merge --extend`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, WORK, machine  # noqa: E402
from oracle_recovery import (LFW_TRAIN_CROPS, GaussianFaces, LatentGaussian, PatchLatent,  # noqa: E402
                             TrainedAutoencoder, training_crops)

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


class IdealBackend:
    """The ideal ε as an evaluation backend: in pixels (GaussianFaces); with patch > 0, in the latent of a
    linear patch autoencoder; or, for a latent model, in the latent of its own trained autoencoder
    (LatentGaussian both)."""

    name = "ideal-eps"
    can_parse = False
    supports_fused = False
    precision = "fp64 ε, fp32 updates"

    def __init__(self, reference, crops: np.ndarray, components: int, patch: int = 0, channels: int = 8):
        alphas = np.asarray(reference.noise.alphas_cumprod)
        size = reference.image_size
        trained = reference.layout.autoencoder
        if patch or trained:
            codec = TrainedAutoencoder(reference) if trained else PatchLatent(crops, size, patch, channels)
            self.model = LatentGaussian(codec, crops, components, alphas)
            self.latent_shape = self.model.codec.shape
            gaussian = self.model.gaussian
        else:
            self.model = gaussian = GaussianFaces(crops, components, alphas, tuple(reference.latent_shape))
            self.latent_shape = tuple(reference.latent_shape)
        self.encode, self.decode, self.eps = self.model.encode, self.model.decode, self.model.eps
        self.noise = reference.noise
        self.image_size = size
        self.components = len(gaussian.variances)
        self.floor = gaussian.floor
        latent = (f"-autoencoder-{reference.fingerprint[:12]}" if trained else
                  f"-latent-p{patch}c{channels}" if patch else "")
        self.fingerprint = f"ideal-eps-gaussian-{len(crops)}-crops-{self.components}-components{latent}"

    def schedule(self, steps: int):
        return self.noise.for_steps(steps)

    def parse(self, image01: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the ideal ε has no face parser; the evaluation masks with landmarks")

    @property
    def identity(self) -> dict:
        return {"backend": self.name, "model": self.fingerprint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="pixel-space model whose size and schedule to use")
    parser.add_argument("--pairs", type=Path, default=LFW / "dev_pairs.txt")
    parser.add_argument("--images", type=Path, default=LFW / "dev-128.zip")
    parser.add_argument("--train", type=Path, default=LFW_TRAIN_CROPS)
    parser.add_argument("--fit", type=int, default=6000)
    parser.add_argument("--components", type=int, default=2000)
    parser.add_argument("--patch", type=int, default=0,
                        help="run the ideal ε in the latent of a linear patch autoencoder with this patch side")
    parser.add_argument("--channels", type=int, default=8, help="latent channels of --patch")
    parser.add_argument("--start", type=int, default=0, help="first pair to run")
    parser.add_argument("--limit", type=int, default=None, help="this many pairs only (default: all from --start)")
    parser.add_argument("--extend", type=Path, default=None,
                        help="an earlier piece's summary (.json) to add these pairs to, at its threshold")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=WORK / "eval-oracle")
    parser.add_argument("--name", default="eval-oracle-dev")
    args = parser.parse_args()

    from revanon_rt.evaluate import (ZipImages, extended, markdown, pair_ranges, read_pairs, read_summary, run_score,
                                     run_transform, summarize)
    from revanon_rt.faces import LandmarksMasker, Recognizer
    from revanon_rt.reference import TorchReference

    base = read_summary(args.extend) if args.extend else None  # one that cannot be extended fails before the run
    reference = TorchReference(args.model)
    if reference.layout.autoencoder and args.patch:
        raise SystemExit("--patch replaces the autoencoder: pass a pixel-space --model for its size and schedule")
    started = time.perf_counter()
    backend = IdealBackend(reference, training_crops(args.train, reference.image_size, args.fit), args.components,
                           args.patch, args.channels)
    print(f"fitted in {time.perf_counter() - started:.0f} s", flush=True)
    pairs = read_pairs(args.pairs)[args.start:][: args.limit]
    if not pairs:
        raise SystemExit(f"{args.pairs} has no pairs from {args.start} on")
    images = ZipImages(args.images, backend.image_size)
    chunk = args.out / f"chunk-{args.start:05d}-{args.start + len(pairs):05d}"
    last = {"phase": None, "n": 0, "time": time.monotonic()}

    def tick(phase: str, n: int) -> None:
        if phase != last["phase"]:
            print(f"{phase} started", flush=True)
            last.update(phase=phase, n=0)
        last["n"] += n
        if time.monotonic() - last["time"] > 60:
            print(f"{phase}: {last['n']}", flush=True)
            last["time"] = time.monotonic()

    run_transform(backend, pairs, images, chunk, masker=LandmarksMasker(), batch=args.batch, progress=tick,
                  genuine_only=True)
    run_score(chunk, images, Recognizer(), progress=tick)
    summary = summarize([chunk / "features.npz"]) if base is None else extended(base, [chunk / "features.npz"])
    summary["ideal_eps"] = {"model_schedule": str(args.model), "fit": args.fit, "components": backend.components,
                            "floor_variance": backend.floor, "patch": args.patch,
                            "trained_autoencoder": bool(reference.layout.autoencoder),
                            "channels": args.channels if args.patch else None}
    summary["wall_seconds"] = time.perf_counter() - started + (base["wall_seconds"] if base else 0.0)
    summary["machine"] = machine()
    shape = "x".join(map(str, backend.latent_shape))
    space = (f", in the {shape} latent of {args.model.name}'s own autoencoder" if reference.layout.autoencoder else
             f", in a {shape} linear patch latent" if args.patch else "")
    title = (f"LFW dev pairs {pair_ranges(summary['chunks'])} with an ideal ε (Gaussian fitted to {args.fit} training crops, "
             f"{backend.image_size} px{space}, schedule of {args.model.name})")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, title))
    print(markdown(summary, title))


if __name__ == "__main__":
    main()
