"""fp32 ONNX export of one descriptor, then constant folding and clean-up."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

OPSET = 18
# Weights past protobuf's 2 GB limit must live beside the graph as external data.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def export_onnx(descriptor, path: Path) -> list[Path]:
    """Returns the files written, the graph first."""
    args = descriptor.torch_args(torch.device("cpu"))
    module = descriptor.module.to("cpu").eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False), \
            torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=[s.name for s in descriptor.inputs], output_names=[s.name for s in descriptor.outputs],
            external_data=False, report=False,
        )
    return save(fold_and_clean(program.model_proto), path)


def fold_and_clean(model):
    """Fold constant subgraphs and drop dead nodes with polygraphy / onnx-graphsurgeon, then check."""
    import onnx
    from polygraphy.backend.onnx import fold_constants

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = fold_constants(model, num_passes=2, error_ok=True)
    model = onnx.shape_inference.infer_shapes(model)
    # The exporter stamps its onnx's newest IR version, which older runtimes refuse (onnxruntime 1.17, still
    # common on edge boxes, loads IR 9 at most). The graph needs only what its opsets need.
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def save(model, path: Path) -> list[Path]:
    """Write the graph; large weights go to `<name>.onnx.data`. Returns the files written."""
    import onnx

    path = Path(path)
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path, path.with_name(data)]
    onnx.save_model(model, str(path))
    return [path]


def graph_info(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {"ir_version": int(model.ir_version),
            "opset": int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))}
