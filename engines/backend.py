"""A backend (encode / decode / eps / parse) over any engine. Torch-free.

Engines have static shapes for a fixed batch; this pads or splits the faces of a call to fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import UsageError


class Engine(Protocol):
    """What every engine class gives a loaded engine. One with a `fused_transform(x, mask, pattern, schedule)`
    runs the whole transform itself, and `verify` proves it equal to sampler.transform."""

    manifest: Any  # engines.manifest.EngineManifest
    device: str

    def __init__(self, manifest, device: str): ...
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


class EngineBuilder(Protocol):
    """What export.build.build_engine needs of an engine class, called on the class before any engine exists."""

    kind: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    @classmethod
    def require_available(cls) -> None: ...
    @classmethod
    def reference_device(cls, device: str) -> str: ...
    @classmethod
    def export_graph(cls, descriptor, staging_dir: Path, precision: str) -> list[Path]: ...
    @classmethod
    def prepare(cls, staging_dir: Path, graphs: dict, log, device: str) -> dict: ...


def in_batches(call, batch: int, *arrays: np.ndarray) -> np.ndarray:
    """call(*chunks) on chunks of exactly `batch` rows; the last is padded by repeating its
    last row, which is harmless because every graph treats batch rows independently."""
    n = arrays[0].shape[0]
    outputs = []
    for start in range(0, n, batch):
        chunk = [a[start:start + batch] for a in arrays]
        short = batch - chunk[0].shape[0]
        if short:
            chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
        outputs.append(call(*chunk)[: batch - short])
    return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]


class EngineBackend:
    def __init__(self, engine: Engine):
        manifest = engine.manifest
        self.engine = engine
        self.name = manifest.backend
        self.fingerprint = manifest.fingerprint
        self.image_size = manifest.image_size
        self.latent_shape = manifest.latent_shape
        self.batch = manifest.batch
        self.noise = manifest.noise_schedule()
        self.can_parse = "parser" in manifest.graphs
        self._inputs = {name: [spec["name"] for spec in entry["inputs"]] for name, entry in manifest.graphs.items()}
        self.supports_fused = hasattr(engine, "fused_transform")
        self.precision = manifest.data.get("precision", "fp32")

    @property
    def identity(self) -> dict:
        """What decides this backend's numbers: the engine's files and the device it runs on."""
        return {"backend": self.name, "engine": self.engine.manifest.data.get("digest"), "device": str(self.engine.device)}

    def schedule(self, steps: int):
        return self.noise.for_steps(steps)

    def _batched(self, call, *arrays: np.ndarray) -> np.ndarray:
        return in_batches(call, self.batch, *arrays)

    def _run(self, graph: str, *arrays: np.ndarray) -> np.ndarray:
        return self._batched(lambda *chunk: self.engine.run(graph, dict(zip(self._inputs[graph], chunk))), *arrays)

    def fused_transform(self, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray, schedule) -> np.ndarray:
        """The whole transform inside the engine (compiled backends); equal to sampler.transform."""
        return self._batched(lambda *chunk: self.engine.fused_transform(*chunk, schedule),
                             x.astype(np.float32, copy=False), mask.astype(np.float32, copy=False),
                             pattern.astype(np.float32, copy=False))

    def encode(self, x: np.ndarray) -> np.ndarray:
        if "encoder" not in self._inputs:
            return x.astype(np.float32, copy=True)
        return self._run("encoder", x.astype(np.float32, copy=False))

    def decode(self, z: np.ndarray) -> np.ndarray:
        if "decoder" not in self._inputs:
            return z.astype(np.float32, copy=True)
        return self._run("decoder", z.astype(np.float32, copy=False))

    def eps(self, z: np.ndarray, t: int) -> np.ndarray:
        return self._run("unet", z.astype(np.float32, copy=False), np.full((z.shape[0],), t, dtype=np.int64))

    def parse(self, image01: np.ndarray) -> np.ndarray:
        if not self.can_parse:
            raise UsageError(f"{self.engine.manifest.engine_dir}: this engine was built without a face parser; "
                             "rebuild it with --parser BISENET.pth, or give masks with --mask or --masker landmarks")
        return self._run("parser", image01.astype(np.float32, copy=False))
