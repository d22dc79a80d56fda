"""Exploration helper: export the real CompVis UNet once and profile ONNX Runtime by op type."""

import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_CONFIGS, WORK  # noqa: E402


def main():
    from revanon_rt.engines.onnxruntime import session_options
    from revanon_rt.export.descriptors import descriptors_for
    from revanon_rt.export.onnx import export_onnx
    from revanon_rt.reference import TorchReference
    from revanon_rt.tiny import save_compvis_architecture

    model = WORK / "compvis-random"
    if not (model / "unet").is_dir():
        save_compvis_architecture(model, SHARED_CONFIGS)
    onnx_dir = WORK / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ref = TorchReference(model)
    for d in descriptors_for(ref, 1):
        path = onnx_dir / f"{d.name}.onnx"
        if not path.exists():
            t = time.time()
            export_onnx(d, path)
            print(d.name, "exported", round(time.time() - t, 1), "s", flush=True)
    import onnxruntime as ort

    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(WORK / "prof_unet")
    sess = ort.InferenceSession(str(onnx_dir / "unet.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {"sample": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32),
             "timestep": np.array([500], np.int64)}
    for _ in range(2):
        t = time.time()
        sess.run(None, feeds)
        print("unet ort", round(time.time() - t, 2), flush=True)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    for op, dur in by_op.most_common(15):
        print(f"{op:24s} {dur / 2e6:7.2f} s/call {dur / total:6.1%}")


if __name__ == "__main__":
    main()
