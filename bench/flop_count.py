"""FLOPs of each graph an engine runs, counted by torch's FlopCounterMode on the exported modules
themselves (convolutions, matmuls and attention), for the floor of the GPU benchmark.

    python bench/flop_count.py                  # CompVis/ldm-celebahq-256 architecture, random weights
    python bench/flop_count.py --tiny           # the tiny test model: a smoke test of this script

One anonymization at batch 1 runs the parser and the encoder once, the UNet 2 x steps times and the
decoder once; the floor is that sum over the card's measured fp32 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the issue's figures for the CompVis model, which the count checks
ISSUE_GFLOP = {"unet": 202.0, "encoder": 345.0, "decoder": 671.0}


def count_gflop(reference, batch: int = 1) -> dict[str, float]:
    """GFLOP of one call of each graph `build` exports, at `batch` (a multiply-add counts 2)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from revanon_rt.export.descriptors import descriptors_for

    counts = {}
    for descriptor in descriptors_for(reference, batch):
        args = descriptor.torch_args(reference.device)
        # the fused attention kernels of some devices have no FLOP formula; the math path's matmuls do
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            descriptor.module(*args)
        counts[descriptor.name] = counter.get_total_flops() / 1e9
    return counts


def per_anonymization(gflop: dict[str, float], steps: int) -> float:
    """GFLOP of one anonymization: parse, encode, steps of inversion and of denoising, decode."""
    return 2 * steps * gflop["unet"] + sum(gflop.get(name, 0.0) for name in ("encoder", "decoder", "parser"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=HERE.parent.parent / "shared" / "spec" / "compvis-ldm-celebahq-256")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from revanon_rt import tiny
    from revanon_rt.reference import TorchReference

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = tiny.save_tiny_ldm(work / "model") if args.tiny else tiny.save_compvis_architecture(work / "model", args.configs)
        bisenet = tiny.save_random_bisenet(work / "parsing_bisenet.pth")
        gflop = count_gflop(TorchReference(model, device="cpu", parser=bisenet))
    total = per_anonymization(gflop, args.steps)
    name = "flop-count-tiny" if args.tiny else "flop-count-compvis"
    record = {"model": "tiny test model" if args.tiny else "CompVis/ldm-celebahq-256 architecture",
              "gflop_per_call": gflop, "steps": args.steps, "gflop_per_anonymization": total,
              "issue_gflop": None if args.tiny else ISSUE_GFLOP, "seconds": time.perf_counter() - started}
    lines = [f"# FLOPs per call, {record['model']} (torch FlopCounterMode on the exported modules)", "",
             "| graph | GFLOP per call, batch 1 | the issue's figure |", "|---|---:|---:|"]
    for graph, value in gflop.items():
        issue = ISSUE_GFLOP.get(graph) if not args.tiny else None
        lines.append(f"| {graph} | {value:.1f} | {issue if issue is not None else ''} |")
    lines += ["", f"One anonymization ({args.steps} inversion + {args.steps} denoising steps, parse, encode, decode): "
                  f"{total:.0f} GFLOP. `bench/gpu.py` counts the same way on the GPU and divides by the measured "
                  "fp32 peak for the FLOP floor."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.append(str(HERE.parent))  # after an installed revanon_rt, which has engines/ and export/ inside
    main()
