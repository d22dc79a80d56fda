"""CPU benchmark (issue 3): the real CompVis/ldm-celebahq-256 architecture with random weights,
PyTorch eager vs ONNX Runtime per call, ONNX Runtime settings one at a time, and a tiny-model
CLI round trip. Writes bench/results/cpu-engines.{json,md}.

    .venv/bin/python bench/cpu_engines.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_CONFIGS, WORK, machine, timed, write_results  # noqa: E402

GFLOP = {"unet": 202.0, "encoder": 345.0, "decoder": 671.0}


def export_all(reference, onnx_dir: Path) -> dict:
    from revanon_rt.export.descriptors import descriptors_for
    from revanon_rt.export.onnx import export_onnx

    onnx_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in descriptors_for(reference, 1):
        path = onnx_dir / f"{d.name}.onnx"
        if not path.exists():
            export_onnx(d, path)
        out[d.name] = (d, path)
    return out


def export_torchscript(descriptor, path: Path) -> None:
    """The legacy TorchScript exporter with no clean-up: the 'out of the box' graph."""
    import warnings

    import torch

    if path.exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(descriptor.module, descriptor.torch_args(torch.device("cpu")), str(path), dynamo=False,
                          opset_version=17, input_names=[s.name for s in descriptor.inputs],
                          output_names=[s.name for s in descriptor.outputs])


def ort_session(path: Path, **options):
    import onnxruntime as ort

    from revanon_rt.engines.onnxruntime import session_options

    return ort.InferenceSession(str(path), session_options(**options), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    from revanon_rt.reference import TorchReference
    from revanon_rt.tiny import save_compvis_architecture

    model = WORK / "compvis-random"
    if not (model / "unet").is_dir():
        save_compvis_architecture(model, SHARED_CONFIGS)
    reference = TorchReference(model)
    graphs = export_all(reference, WORK / "onnx")
    results: dict = {"machine": machine(), "repeats": args.repeats, "models": {}, "ort_settings_unet": {},
                     "fp32_peak": measured_peak(args.repeats)}

    def log(message: str) -> None:
        print(message, flush=True)

    for name, (descriptor, path) in graphs.items():
        args_t = descriptor.torch_args(torch.device("cpu"))

        def torch_call(module=descriptor.module, a=args_t):
            with torch.inference_mode():
                module(*a)

        eager = timed(torch_call, args.repeats)
        if name == "unet":
            def autograd_call(module=descriptor.module, a=args_t):
                module(*a)  # what a script without no_grad() pays: activations kept for backward
            results["unet_torch_eager_autograd_s"] = timed(autograd_call, 2)["median_s"]
        session = ort_session(path)
        feeds = descriptor.sample
        onnx = timed(lambda: session.run(None, feeds), args.repeats)
        with torch.inference_mode():
            expected = descriptor.module(*args_t).numpy()
        got = session.run(None, feeds)[0]
        rel = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        results["models"][name] = {
            "torch_eager_s": eager["median_s"], "onnxruntime_s": onnx["median_s"],
            "speedup": eager["median_s"] / onnx["median_s"], "gflop": GFLOP[name],
            "onnxruntime_gflops": GFLOP[name] / onnx["median_s"], "torch_gflops": GFLOP[name] / eager["median_s"],
            "rel_l2_vs_torch": rel,
        }
        log(f"{name}: torch {eager['median_s']:.2f} s, ORT {onnx['median_s']:.2f} s, "
            f"x{eager['median_s'] / onnx['median_s']:.2f}, rel err {rel:.1e}")
        del session

    unet_descriptor, unet_path = graphs["unet"]
    feeds = unet_descriptor.sample
    legacy = WORK / "onnx" / "unet-torchscript.onnx"
    export_torchscript(unet_descriptor, legacy)
    variants = {
        "out of the box: TorchScript export, default SessionOptions": (legacy, None),
        "TorchScript export, project settings": (legacy, {}),
        "project (dynamo export + fold, opt all, 2 threads)": (unet_path, {}),
        "graph optimization: disabled": (unet_path, {"optimization": "disable"}),
        "graph optimization: basic": (unet_path, {"optimization": "basic"}),
        "graph optimization: extended (no NCHWc layout)": (unet_path, {"optimization": "extended"}),
        "1 intra-op thread": (unet_path, {"threads": 1}),
        "no spinning threads": (unet_path, {"spinning": False}),
        "no memory pattern, no CPU arena": (unet_path, {"mem_pattern": False, "cpu_arena": False}),
    }
    for label, (path, options) in variants.items():
        if options is None:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        else:
            session = ort_session(path, **options)
        t = timed(lambda: session.run(None, feeds), args.repeats)
        results["ort_settings_unet"][label] = {"median_s": t["median_s"], "min_s": t["min_s"],
                                               "vs_torch_eager": results["models"]["unet"]["torch_eager_s"] / t["median_s"]}
        log(f"unet {label}: {t['median_s']:.2f} s")
        del session

    results["tiny_cli_round_trip"] = tiny_round_trip()
    log(f"tiny round trip: {results['tiny_cli_round_trip']}")
    write_results("cpu-engines", results, markdown(results))


def measured_peak(repeats: int) -> dict:
    """What this CPU sustains in fp32: a large GEMM and the UNet's most common conv, in torch and ORT."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    gemm = timed(lambda: torch.mm(a, b), repeats)
    conv = torch.nn.Conv2d(224, 224, 3, padding=1).eval()
    x = torch.randn(1, 224, 64, 64)
    with torch.inference_mode():
        conv_t = timed(lambda: conv(x), repeats * 2)
    weight = numpy_helper.from_array(conv.weight.detach().numpy(), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 224, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 224, 64, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    from revanon_rt.engines.onnxruntime import session_options

    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy()}
    conv_o = timed(lambda: session.run(None, feeds), repeats * 2)
    conv_flop = 2 * 64 * 64 * 224 * 224 * 9
    return {"torch_sgemm_4096_gflops": 2 * 4096**3 / gemm["median_s"] / 1e9,
            "torch_conv3x3_224ch_64px_gflops": conv_flop / conv_t["median_s"] / 1e9,
            "onnxruntime_conv3x3_224ch_64px_gflops": conv_flop / conv_o["median_s"] / 1e9}


def tiny_round_trip() -> dict:
    """Wall time of `run anonymize` + `run deanonymize` on the tiny LDM, reference and engine."""
    from revanon_rt.keys import keygen
    from revanon_rt.tiny import save_random_bisenet, save_tiny_ldm

    root = WORK / "tiny"
    if not (root / "ldm").is_dir():
        save_tiny_ldm(root / "ldm")
        save_random_bisenet(root / "bisenet.pth")
    key = root / "k.key"
    if not key.exists():
        keygen(key)
    from PIL import Image

    face = root / "in" / "face.png"
    face.parent.mkdir(exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(face)
    cli = [sys.executable, "-m", "revanon_rt"]
    if not (root / "engine").is_dir():
        subprocess.run(cli + ["build", "--model", str(root / "ldm"), "--parser", str(root / "bisenet.pth"),
                              "--out", str(root / "engine")], check=True, capture_output=True)
    out = {}
    for label, flags in {"pytorch reference": ["--model", str(root / "ldm")],
                         "onnxruntime engine": ["--engine", str(root / "engine")]}.items():
        start = time.perf_counter()
        subprocess.run(cli + ["run", "anonymize", str(face), "--out", str(root / "a"), "--key", str(key),
                              "--overwrite"] + flags + (["--parser", str(root / "bisenet.pth")] if "--model" in flags else []),
                       check=True, capture_output=True)
        middle = time.perf_counter()
        subprocess.run(cli + ["run", "deanonymize", str(root / "a"), "--out", str(root / "r"), "--key", str(key),
                              "--overwrite"] + flags, check=True, capture_output=True)
        end = time.perf_counter()
        out[label] = {"anonymize_s": round(middle - start, 2), "deanonymize_s": round(end - middle, 2),
                      "round_trip_s": round(end - start, 2)}
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# CPU engines: PyTorch eager vs ONNX Runtime", "",
             f"{m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}); torch {m.get('torch')}, "
             f"onnxruntime {m.get('onnxruntime')}, onnx {m.get('onnx')}. Median of {r['repeats']} runs after a warm-up.",
             "", "Real CompVis/ldm-celebahq-256 architecture, random weights, batch 1, fp32:", "",
             "| model | GFLOP | PyTorch eager | ONNX Runtime | speed-up | ORT GFLOP/s | rel. error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in r["models"].items():
        lines.append(f"| {name} | {v['gflop']:.0f} | {v['torch_eager_s']:.2f} s | {v['onnxruntime_s']:.2f} s | "
                     f"**{v['speedup']:.2f}×** | {v['onnxruntime_gflops']:.0f} | {v['rel_l2_vs_torch']:.1e} |")
    peak = r["fp32_peak"]
    lines += ["", f"What this CPU sustains in fp32 (same script): torch SGEMM 4096² {peak['torch_sgemm_4096_gflops']:.0f} GFLOP/s, "
              f"the UNet's commonest conv (3×3, 224 channels, 64×64) {peak['torch_conv3x3_224ch_64px_gflops']:.0f} GFLOP/s "
              f"in torch and {peak['onnxruntime_conv3x3_224ch_64px_gflops']:.0f} GFLOP/s in ONNX Runtime. "
              f"PyTorch eager with autograd left on (no `torch.no_grad()`) takes {r['unet_torch_eager_autograd_s']:.2f} s per UNet call."]
    lines += ["", "ONNX Runtime settings, UNet, one at a time from the project's settings:", "",
              "| setting | median | vs PyTorch eager |", "|---|---:|---:|"]
    for label, v in r["ort_settings_unet"].items():
        lines.append(f"| {label} | {v['median_s']:.2f} s | {v['vs_torch_eager']:.2f}× |")
    lines += ["", "Tiny-model CLI round trip (64 px latent model, 50 steps, process start included):", "",
              "| backend | anonymize | deanonymize | round trip |", "|---|---:|---:|---:|"]
    for label, v in r["tiny_cli_round_trip"].items():
        lines.append(f"| {label} | {v['anonymize_s']} s | {v['deanonymize_s']} s | {v['round_trip_s']} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
