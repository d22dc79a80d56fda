"""Faces per second of `run anonymize` on a folder of crops, by engine batch size (CPU).

`run` sends the crops of a folder through an engine N at a time, where N is the batch the engine was built
for. This measures what that buys on this machine, through the real command line, with the demo model:

    .venv/bin/python bench/cpu_batching.py [--model models/demo-lfw64] [--faces 16] [--steps 10] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from common import LFW_DEV_CROPS, RESULTS, WORK, machine


def cli(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "revanon_rt", *map(str, args)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "demo-lfw64")
    parser.add_argument("--faces", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()

    from PIL import Image

    from revanon_rt.keys import keygen
    from revanon_rt.model_dir import inspect_model_dir

    size = inspect_model_dir(args.model).image_size
    root = WORK / "cpu-batching"
    faces = root / "faces"
    faces.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(LFW_DEV_CROPS) as z:  # LFW crops stay in the ignored work folder
        for name in sorted(n for n in z.namelist() if n.endswith((".png", ".jpg")))[: args.faces]:
            im = Image.open(io.BytesIO(z.read(name))).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
            im.save(faces / (Path(name).stem + ".png"))
    key = root / "k.key"
    if not key.exists():
        keygen(key)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        engine = root / f"engine-b{batch}"
        if not engine.is_dir():
            cli("build", "--model", args.model, "--out", engine, "--batch", batch)
        out = root / f"anon-b{batch}"
        started = time.perf_counter()
        cli("run", "anonymize", faces, "--out", out, "--engine", engine, "--masker", "landmarks", "--key", key,
            "--steps", args.steps, "--overwrite")
        seconds = time.perf_counter() - started
        rows.append({"batch": batch, "faces": args.faces, "seconds": round(seconds, 2),
                     "faces_per_second": round(args.faces / seconds, 3)})
        print(rows[-1], flush=True)
    result = {"model": args.model.name, "image_size": size, "steps": args.steps, "machine": machine(), "rows": rows}
    (RESULTS / "cpu-batching.json").write_text(json.dumps(result, indent=1) + "\n")
    base = rows[0]["faces_per_second"]
    lines = [f"# `run anonymize` on {args.faces} crops by engine batch: {args.model.name}, CPU", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores; ONNX Runtime engines built by "
             f"`revanon-rt build --batch N`; {args.steps} DDIM steps each way, landmark masker; wall time of the "
             "whole command (start-up, masks and writes included).", "",
             "| engine batch | wall time | faces / s | vs batch 1 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['seconds']:.1f} s | {r['faces_per_second']:.2f} | "
              f"{r['faces_per_second'] / base:.2f}x |" for r in rows]
    (RESULTS / "cpu-batching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
