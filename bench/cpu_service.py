"""Per-request latency of a service: one `revanon-rt run` per image, against one loaded Anonymizer (CPU).

A service that forks the CLI per request pays for starting Python, loading the engine, the key and dlib each
time; `revanon_rt.api.Anonymizer` pays for them once. This measures both on this machine with the demo model's
ONNX Runtime engine (batch 1), the landmark masker and LFW dev crops, one image per request:

    .venv/bin/python bench/cpu_service.py [--model models/demo-lfw64] [--requests 6] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import DEMO_MODEL, cli_workspace, machine, run_cli, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    from revanon_rt.api import Anonymizer
    from revanon_rt.model_dir import inspect_model_dir

    size = inspect_model_dir(args.model).image_size
    root, paths, key = cli_workspace("cpu-service", size, args.requests)
    engine = root / "engine-b1"
    if not engine.is_dir():
        run_cli("build", "--model", args.model, "--out", engine, "--batch", 1)

    per_run = []
    for path in paths:
        started = time.perf_counter()
        run_cli("run", "anonymize", path, "--out", root / "anon-cli", "--engine", engine, "--masker", "landmarks",
                "--key", key, "--steps", args.steps, "--overwrite")
        per_run.append(time.perf_counter() - started)

    started = time.perf_counter()
    anonymizer = Anonymizer(engine=engine, key_file=key, masker="landmarks", steps=args.steps)
    load_s = time.perf_counter() - started
    per_call = []
    for path in paths:
        data = path.read_bytes()
        started = time.perf_counter()
        anonymizer.anonymize(data).png_bytes()
        per_call.append(time.perf_counter() - started)

    cli_s, api_s = statistics.median(per_run), statistics.median(per_call)
    data = {"model": args.model.name, "image_size": size, "steps": args.steps, "requests": len(paths),
            "engine": "onnxruntime, batch 1", "masker": "landmarks",
            "cli_run_per_request_s": per_run, "api_call_per_request_s": per_call, "api_load_s": load_s,
            "cli_median_s": cli_s, "api_median_s": api_s, "machine": machine()}
    markdown = (f"# A service's latency per request (CPU)\n\n"
                f"`bench/cpu_service.py`: {args.model.name} ({size} px), ONNX Runtime engine (batch 1), landmark "
                f"masker, {args.steps} steps each way, {len(paths)} LFW dev crops, one image per request. "
                f"{data['machine']['cpu']}, {data['machine']['cores']} cores.\n\n"
                "| per request | median | all |\n|---|---:|---|\n"
                f"| `revanon-rt run anonymize` (a process per image) | {cli_s:.2f} s | "
                + ", ".join(f"{t:.2f}" for t in per_run) + " |\n"
                f"| `Anonymizer.anonymize(bytes)` (loaded once, in {load_s:.2f} s) | {api_s:.2f} s | "
                + ", ".join(f"{t:.2f}" for t in per_call) + " |\n\n"
                f"The difference, {cli_s - api_s:.2f} s per request, is what a process per request costs: starting "
                "Python, loading the engine's sessions, the key and dlib's models again, and writing the output "
                "file.\n")
    write_results("cpu-service", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
