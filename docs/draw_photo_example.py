"""Draws docs/photo-example.png: a group photo of faces *sampled from the demo model* (no real
person), anonymized and recovered by the command-line tool in photo mode.

    python docs/draw_photo_example.py [--model models/demo-lfw128] [--device cuda] [--seed 3]

The faces are sampled, enlarged and placed on a plain canvas at different sizes and tilts; then
`revanon-rt run anonymize --mode photo` and `run deanonymize` run in subprocesses, exactly as a
user would run them. The figure is before | anonymized | recovered.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
BACKGROUND = (196, 204, 212)
# (side in the photo, tilt in degrees, top-left corner)
PLACES = [(150, -6.0, (30, 50)), (200, 4.0, (215, 20)), (120, 8.0, (450, 85))]


def compose(faces: np.ndarray) -> np.ndarray:
    canvas = Image.new("RGB", (600, 250), BACKGROUND)
    for face, (side, tilt, corner) in zip(faces, PLACES):
        im = Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)
        im = im.rotate(tilt, Image.Resampling.BICUBIC, expand=False, fillcolor=BACKGROUND)
        canvas.paste(im, corner)
    return np.asarray(canvas).copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE.parent / "models" / "demo-lfw128")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "photo-example.png")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from revanon_rt.reference import TorchReference
    from revanon_rt.train import sample_faces

    faces = sample_faces(TorchReference(args.model, device=args.device), len(PLACES), seed=args.seed)
    photo = compose(faces)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        Image.fromarray(photo).save(tmp / "in" / "group.png")

        def tool(*argv):
            run = subprocess.run([sys.executable, "-m", "revanon_rt", *map(str, argv)], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"revanon-rt {' '.join(map(str, argv))} failed:\n{run.stderr}")
            return run

        tool("keygen", tmp / "k.key")
        tool("run", "anonymize", tmp / "in", "--out", tmp / "anon", "--mode", "photo", "--model", args.model,
             "--masker", "landmarks", "--key", tmp / "k.key", "--device", args.device)
        tool("run", "deanonymize", tmp / "anon", "--out", tmp / "rec", "--model", args.model, "--key", tmp / "k.key",
             "--device", args.device)
        info = json.loads(tool("info", tmp / "anon" / "group.png").stdout)
        anonymized = np.asarray(Image.open(tmp / "anon" / "group.png").convert("RGB"))
        recovered = np.asarray(Image.open(tmp / "rec" / "group.png").convert("RGB"))
    if len(info["faces"]) != len(PLACES):
        raise SystemExit(f"found {len(info['faces'])} of {len(PLACES)} faces; try another --seed")
    gap = np.full((photo.shape[0], 6, 3), 255, np.uint8)
    figure = Image.fromarray(np.concatenate([photo, gap, anonymized, gap, recovered], axis=1))
    draw = ImageDraw.Draw(figure)
    for k, label in enumerate(["before (faces sampled from the demo model)", "anonymized", "recovered with the key"]):
        draw.text((k * (photo.shape[1] + 6) + 6, photo.shape[0] - 16), label, fill=(20, 20, 20))
    figure.save(args.out)
    print(f"{args.out}: {len(info['faces'])} faces")


if __name__ == "__main__":
    main()
