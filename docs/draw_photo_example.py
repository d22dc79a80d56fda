"""Draws docs/photo-example.png: a group photo of faces *sampled from the demo model* (no real
person), anonymized and recovered by the command-line tool in photo mode.

    python docs/draw_photo_example.py [--model DIR (default: the demo model)] [--device cuda] [--seed 3]

docs/photo-example.png is models/demo-lfw64's: `--model models/demo-lfw64`.

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
PLACES = [(170, -6.0, (25, 45)), (215, 4.0, (220, 20)), (160, 8.0, (465, 60))]


def compose(faces: np.ndarray) -> np.ndarray:
    canvas = Image.new("RGB", (650, 250), BACKGROUND)
    for face, (side, tilt, corner) in zip(faces, PLACES):
        im = Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)
        im = im.rotate(tilt, Image.Resampling.BICUBIC, expand=False, fillcolor=BACKGROUND)
        canvas.paste(im, corner)
    return np.asarray(canvas).copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the committed demo model")
    parser.add_argument("--seed", type=int, default=3, help="first seed to try; the next ones follow until "
                        "dlib finds every sampled face")
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "photo-example.png")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.model is None:
        from revanon_rt.demo import demo_model

        args.model = demo_model()
        if args.model is None:
            raise SystemExit("no demo model is committed: pass --model")

    from revanon_rt.reference import TorchReference
    from revanon_rt.train import sample_faces

    from revanon_rt.faces import DlibFaces

    backend, detector = TorchReference(args.model, device=args.device), DlibFaces(detector="cnn")
    for seed in range(args.seed, args.seed + args.tries):
        photo = compose(sample_faces(backend, len(PLACES), seed=seed))
        if len(detector.detect(photo)) == len(PLACES):
            break
    else:
        raise SystemExit(f"dlib did not find all {len(PLACES)} sampled faces for seeds {args.seed}.."
                         f"{args.seed + args.tries - 1}")
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
             "--masker", "landmarks", "--detector", "cnn", "--key", tmp / "k.key", "--device", args.device)
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
    print(f"{args.out}: {len(info['faces'])} faces (seed {seed})")


if __name__ == "__main__":
    main()
