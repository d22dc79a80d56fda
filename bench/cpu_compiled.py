"""CPU benchmark of the three backends a CPU box can run, on the real CompVis/ldm-celebahq-256 architecture
with random weights at batch 1: PyTorch eager (the reference), the ONNX Runtime engine and the compiled
engine, on eager kernels (strict fp32's default) and as AOTInductor packages, each built by `build_engine`
as `revanon-rt build` builds it. Per graph: the median time of one call and the relative error against eager.
Writes bench/results/cpu-compiled.{json,md}.

    .venv/bin/python bench/cpu_compiled.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_CONFIGS, WORK, machine, timed, write_results  # noqa: E402

# name in the results: (backend, engine_class's options), in column order
ENGINES = {"onnxruntime": ("onnxruntime", {}), "compiled_eager": ("compiled", {"compiler": "eager"}),
           "compiled": ("compiled", {"compiler": "aot"})}
LABELS = {"onnxruntime": "ONNX Runtime", "compiled_eager": "compiled, eager kernels", "compiled": "AOTInductor"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    from flop_count import count_gflop

    from revanon_rt.engines import engine_class, open_engine
    from revanon_rt.engines.manifest import GRAPHS
    from revanon_rt.export.build import build_engine
    from revanon_rt.export.descriptors import descriptors_for
    from revanon_rt.reference import TorchReference
    from revanon_rt.tiny import save_compvis_architecture, save_random_bisenet

    model, bisenet = WORK / "compvis-random", WORK / "bisenet-random.pth"
    if not (model / "unet").is_dir():
        save_compvis_architecture(model, SHARED_CONFIGS)
    if not bisenet.exists():
        save_random_bisenet(bisenet)
    reference = TorchReference(model, parser=bisenet)
    gflop = count_gflop(reference)
    descriptors = {d.name: d for d in descriptors_for(reference, 1)}
    results: dict = {"machine": machine(), "repeats": args.repeats, "gflop_per_call": gflop, "graphs": {},
                     "build_seconds": {}}

    expected = {}
    for name in GRAPHS:
        d = descriptors[name]
        torch_args = d.torch_args(torch.device("cpu"))

        def eager(module=d.module, a=torch_args):
            with torch.inference_mode():
                return module(*a)

        expected[name] = eager().numpy()
        results["graphs"][name] = {"eager_s": timed(eager, args.repeats)["median_s"]}
        print(f"{name}: eager {results['graphs'][name]['eager_s']:.2f} s", flush=True)

    for backend, (kind, options) in ENGINES.items():
        engine_dir = WORK / f"cpu-{backend}-engine"
        if not (engine_dir / "engine.json").exists():
            start = time.perf_counter()
            build_engine(engine_class(kind, **options), model, engine_dir, parser=bisenet, batch=1, overwrite=True,
                         device="cpu", log=lambda m: print(m, flush=True))
            results["build_seconds"][backend] = time.perf_counter() - start
        engine = open_engine(engine_dir, device="cpu").engine
        for name in GRAPHS:
            feeds = descriptors[name].sample
            got = engine.run(name, feeds)
            row = results["graphs"][name]
            row[f"{backend}_s"] = timed(lambda: engine.run(name, feeds), args.repeats)["median_s"]
            if name == "parser":
                row[f"{backend}_differing_cells"] = int(np.count_nonzero(got != expected[name]))
            else:
                row[f"{backend}_rel_l2"] = float(np.linalg.norm(got - expected[name]) / np.linalg.norm(expected[name]))
            print(f"{name}: {backend} {row[f'{backend}_s']:.2f} s", flush=True)
        del engine
    write_results("cpu-compiled", results, markdown(results))


def markdown(r: dict) -> str:
    m = r["machine"]
    engines = [b for b in ENGINES if f"{b}_s" in r["graphs"]["unet"]]
    lines = ["# CPU: PyTorch eager, ONNX Runtime and the compiled engine", "",
             f"{m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}); torch {m.get('torch')}, onnxruntime "
             f"{m.get('onnxruntime')}. Real CompVis/ldm-celebahq-256 architecture with random weights, batch 1, "
             f"fp32, median of {r['repeats']} calls after a warm-up; engines built as `revanon-rt build` builds "
             "them (`--backend onnxruntime`; `--backend compiled` with `--compiler eager`, the default, and with "
             "`--compiler aot`; `--device cpu`). Times, each engine's "
             "speed-up over eager, and its error against eager.", "",
             "| graph | GFLOP | eager | " + " | ".join(LABELS[b] for b in engines) + " | "
             + " | ".join(f"{LABELS[b]} error" for b in engines) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(engines))]
    for name, g in r["graphs"].items():
        times = [f"{g[f'{b}_s']:.2f} s ({g['eager_s'] / g[f'{b}_s']:.2f}×)" for b in engines]
        errors = [f"{g[f'{b}_differing_cells']} cells differ" if name == "parser" else f"{g[f'{b}_rel_l2']:.1e}"
                  for b in engines]
        lines.append(f"| {name} | {r['gflop_per_call'][name]:.1f} | {g['eager_s']:.2f} s | " + " | ".join(times)
                     + " | " + " | ".join(errors) + " |")
    unet = r["graphs"]["unet"]
    per_face = {b: 100 * unet[f"{b}_s"] + sum(r["graphs"][n][f"{b}_s"] for n in ("encoder", "decoder", "parser"))
                for b in ("eager", *engines)}
    lines += ["", "One anonymization at 50 steps (100 UNet calls, encode, decode, parse), from these per-call times: "
              + ", ".join(f"{LABELS.get(b, b)} {s / 60:.1f} min" for b, s in per_face.items()) + "."]
    if r["build_seconds"]:
        lines += ["", "Build time (export, compile, parity check): "
                  + ", ".join(f"{LABELS[b]} {s / 60:.1f} min" for b, s in r["build_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
