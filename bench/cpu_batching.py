"""Faces per second of `run anonymize` on a folder of crops, by engine batch size (CPU).

`run` sends the crops of a folder through an engine N at a time, where N is the batch the engine was built
for. This measures what that buys on this machine, through the real command line, with the demo model:

    .venv/bin/python bench/cpu_batching.py [--model models/demo-lfw64] [--faces 16] [--steps 10] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DEMO_MODEL, RESULTS, cli_workspace, machine, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--faces", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()

    from revanon_rt.model_dir import inspect_model_dir

    size = inspect_model_dir(args.model).image_size
    root, _, key = cli_workspace("cpu-batching", size, args.faces)
    faces = root / "faces"
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        engine = root / f"engine-b{batch}"
        if not engine.is_dir():
            run_cli("build", "--model", args.model, "--out", engine, "--batch", batch)
        out = root / f"anon-b{batch}"
        started = time.perf_counter()
        run_cli("run", "anonymize", faces, "--out", out, "--engine", engine, "--masker", "landmarks", "--key", key,
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
