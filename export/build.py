"""`revanon-rt build`: export every model of a folder, compile for the chosen engine, measure
parity against PyTorch, and move the finished engine into place in one rename.

A failed or interrupted build leaves nothing at the destination.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..engines.backend import EngineBuilder
from ..engines.manifest import FORMAT, MANIFEST, file_sha256, read_manifest, write_manifest
from ..batch import is_within
from ..errors import UsageError
from ..verify import differences
from .descriptors import descriptors_for


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"revanon_rt": __version__, "python": platform.python_version()}
    for package in ("torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "tensorrt"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def parity(reference_out: np.ndarray, engine_out: np.ndarray) -> dict:
    if reference_out.dtype == np.uint8:
        return {"differing": int(np.count_nonzero(reference_out != engine_out)), "total": int(reference_out.size)}
    return differences(reference_out, engine_out)


def _reference_run(reference, descriptor) -> np.ndarray:
    import torch

    from ..reference import tf32_off

    with torch.inference_mode(), tf32_off():
        return descriptor.module(*descriptor.torch_args(reference.device)).cpu().numpy()


def build_engine(engine_cls: EngineBuilder, model_dir: Path, out_dir: Path, *, parser: Path | None = None, batch: int = 1,
                 overwrite: bool = False, device: str = "cpu", precision: str = "fp32", log=print) -> Path:
    from ..reference import TorchReference

    engine_cls.require_available()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir}: already exists; give --overwrite to replace it")
    _refuse_to_replace_anything_but_an_engine(out_dir, [Path(model_dir)] + ([Path(parser)] if parser else []))
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    if precision not in engine_cls.precisions:
        raise UsageError(f"the {engine_cls.kind} backend builds {', '.join(engine_cls.precisions)}, not {precision}")
    reference = TorchReference(model_dir, device=engine_cls.reference_device(device), parser=parser)
    descriptors = descriptors_for(reference, batch)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        graphs = {}
        for index, descriptor in enumerate(descriptors, 1):
            started = time.perf_counter()
            path, *extra_files = engine_cls.export_graph(descriptor, staging, precision)
            graphs[descriptor.name] = {
                "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                "inputs": [s.to_manifest() for s in descriptor.inputs],
                "outputs": [s.to_manifest() for s in descriptor.outputs],
                "extra_files": [{"file": p.name, "sha256": file_sha256(p)} for p in extra_files],
            }
            log(f"[{index}/{len(descriptors)}] exported {descriptor.name} "
                f"({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")
        extra = engine_cls.prepare(staging, graphs, log, device)
        noise = reference.noise
        manifest = {
            "format": FORMAT, "backend": engine_cls.kind, "precision": precision, "batch": batch,
            "model": {"fingerprint": reference.fingerprint, "image_size": reference.image_size,
                      "latent_shape": list(reference.latent_shape), "autoencoder": reference.layout.autoencoder,
                      "source": str(Path(model_dir).resolve()),
                      "parser": str(Path(parser).resolve()) if parser else None},
            "schedule": noise.to_manifest(),
            "graphs": graphs,
            "versions": _versions(), "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        write_manifest(staging, manifest)
        engine = engine_cls(read_manifest(staging), device=device)
        manifest["parity"] = {}
        for descriptor in descriptors:
            expected = _reference_run(reference, descriptor)
            got = engine.run(descriptor.name, descriptor.sample)
            manifest["parity"][descriptor.name] = parity(expected, got)
        manifest["parity"]["device"] = device
        write_manifest(staging, manifest)
        del engine
        log("parity against PyTorch on the sample inputs: " + ", ".join(
            f"{name} " + (f"rel {p['rel_l2']:.1e}" if "rel_l2" in p else f"{p['differing']} cells differ")
            for name, p in manifest["parity"].items() if name != "device"))
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _refuse_to_replace_anything_but_an_engine(out_dir: Path, sources: list[Path]) -> None:
    """--overwrite replaces an earlier engine, never a model, a parser or a folder of anything else."""
    if out_dir.is_symlink():  # the engine would replace the link and leave its target as it was
        raise UsageError(f"{out_dir}: a symbolic link; give the folder it points to ({out_dir.resolve()}) as --out")
    for source in sources:
        if is_within(source, out_dir):
            raise UsageError(f"{out_dir}: holds {source}, an input of this build; give another --out")
    if out_dir.is_file():
        raise UsageError(f"{out_dir}: is a file; --out names the engine folder to create")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UsageError(f"{out_dir}: not an engine folder (no {MANIFEST}); --overwrite replaces only an earlier "
                         "engine, so give another --out")
    if (out_dir / MANIFEST).is_file():
        owned = _engine_files(out_dir)
        if owned is None:
            raise UsageError(f"{out_dir}: its {MANIFEST} cannot be read, so nothing shows which files are the "
                             "engine's; give another --out")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in owned)
        if foreign:
            raise UsageError(f"{out_dir}: holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} "
                             "besides the engine, which --overwrite would delete; move them out or give another --out")


def _engine_files(engine_dir: Path) -> set[str] | None:
    """The names an engine folder's manifest accounts for (graphs, their extra files and plans, the TensorRT
    cache), or None where the manifest cannot be read."""
    try:
        manifest = json.loads((engine_dir / MANIFEST).read_text())
        names = {MANIFEST, "trt_cache"}
        for entry in manifest["graphs"].values():
            names.add(entry["file"])
            names.update(extra["file"] for extra in entry.get("extra_files", []))
            if "plan" in entry:
                names.add(entry["plan"])
        return {n for n in names if isinstance(n, str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
