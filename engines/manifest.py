"""engine.json: what an engine was built from, how, and the proof that its files are intact.

Read without torch: a runtime needs the schedule, the fingerprint and the graph list from here.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..encoding import canonical_json
from ..errors import UsageError
from ..schedule import NoiseSchedule

FORMAT = "revanon-engine/1"
MANIFEST = "engine.json"
GRAPHS = ("unet", "encoder", "decoder", "parser")  # what every engine holds, in build order


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "digest"})).hexdigest()


def rebuild_hint(engine_dir: Path, manifest: dict | None = None) -> str:
    """The build command that makes this engine again, with every setting the manifest recorded."""
    manifest = manifest or {}
    model = manifest.get("model", {})
    words = ["revanon-rt build", "--model", model.get("source", "MODEL_DIR"),
             "--backend", manifest.get("backend", "onnxruntime")]
    if model.get("parser"):
        words += ["--parser", model["parser"]]
    if manifest.get("batch", 1) != 1:
        words += ["--batch", str(manifest["batch"])]
    if manifest.get("precision", "fp32") != "fp32":
        words += ["--precision", manifest["precision"]]
    if manifest.get("backend") == "compiled":  # explicit: the default compiler depends on the precision
        words += ["--compiler", manifest.get("compiled", {}).get("compiler", "aot")]
    device = manifest.get("parity", {}).get("device")
    if device and device != "cpu":
        words += ["--device", device]
    return "rebuild it: " + " ".join(shlex.quote(w) if w != "revanon-rt build" else w
                                     for w in words + ["--out", str(engine_dir), "--overwrite"])


@dataclass
class EngineManifest:
    engine_dir: Path
    data: dict

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    @property
    def image_size(self) -> int:
        return int(self.data["model"]["image_size"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["model"]["latent_shape"])

    @property
    def batch(self) -> int:
        return int(self.data["batch"])

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_manifest(self.data["schedule"])

    def graph_path(self, name: str) -> Path:
        return self.engine_dir / self.graphs[name]["file"]


def write_manifest(engine_dir: Path, data: dict) -> None:
    data = dict(data)
    data["digest"] = manifest_digest(data)
    (engine_dir / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_manifest(engine_dir: Path) -> EngineManifest:
    """Refuse anything that is not exactly what `build` wrote, saying how to rebuild."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise UsageError(f"{engine_dir}: no such engine folder; make one with `revanon-rt build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{engine_dir}: no {MANIFEST}, so not an engine folder; make one with "
                         "`revanon-rt build --model MODEL_DIR --out NEW_FOLDER`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); {rebuild_hint(engine_dir)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not an engine manifest; {rebuild_hint(engine_dir)}")
    if data.get("format") != FORMAT:
        raise UsageError(f"{path}: engine format {data.get('format')!r}, this revanon-rt reads {FORMAT}; "
                         f"{rebuild_hint(engine_dir, data)}")
    if data.get("digest") != manifest_digest(data):
        raise UsageError(f"{path}: the manifest was edited or is corrupt; {rebuild_hint(engine_dir, data)}")
    manifest = EngineManifest(engine_dir, data)
    for entry in manifest.graphs.values():
        for file_entry in [entry] + entry.get("extra_files", []):
            file_path = engine_dir / file_entry["file"]
            if not file_path.is_file():
                raise UsageError(f"{file_path}: missing from the engine; {rebuild_hint(engine_dir, data)}")
            if file_sha256(file_path) != file_entry["sha256"]:
                raise UsageError(f"{file_path}: altered since the build (sha256 differs); "
                                 f"{rebuild_hint(engine_dir, data)}")
    return manifest
