"""The model fingerprint of spec §7, computed from the files as stored.

Safetensors files are read directly (no torch), streaming tensor bytes into the hash,
so that a 1 GB model costs no more memory than a read buffer.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .encoding import canonical_json
from .errors import UsageError

COMPONENTS = ("unet", "vqvae", "vae", "scheduler")
CONFIG_NAMES = {"scheduler": "scheduler_config.json"}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


@dataclass
class StoredTensor:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    read_chunks: Callable[[], Iterator[bytes]]


def _field(h, data: bytes) -> None:
    h.update(struct.pack(">Q", len(data)))
    h.update(data)


def config_path(component_dir: Path, component: str) -> Path:
    return component_dir / CONFIG_NAMES.get(component, "config.json")


def read_config(component_dir: Path, component: str) -> dict:
    path = config_path(component_dir, component)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; a {component}/ folder needs its config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: the config is not a JSON object")
    return config


def public_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _safetensors_tensors(path: Path) -> list[StoredTensor]:
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > _MAX_HEADER:
                raise ValueError(f"header of {header_len} bytes")
            header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        file_size = path.stat().st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(v) for v in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if not 0 <= begin <= end or data_start + end > file_size:
            raise UsageError(f"{path}: tensor {name!r} lies outside the file (truncated?)")

        def read_chunks(start=data_start + begin, size=end - begin):
            with open(path, "rb") as fh:
                fh.seek(start)
                left = size
                while left:
                    block = fh.read(min(_CHUNK, left))
                    if not block:
                        raise UsageError(f"{path}: truncated")
                    left -= len(block)
                    yield block

        tensors.append(StoredTensor(name, dtype, shape, end - begin, read_chunks))
    return tensors


def _torch_bin_tensors(path: Path) -> list[StoredTensor]:
    try:
        import torch
    except ImportError:
        raise UsageError(f"{path}: .bin weights need torch to read; convert them to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles
        raise UsageError(f"{path}: cannot read the weights ({exc})") from None
    tensors = []
    for name, t in state.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = str(t.dtype).removeprefix("torch.")
        tensors.append(StoredTensor(name, dtype, list(t.shape), len(raw), lambda raw=raw: iter([raw])))
    return tensors


def weight_files(component_dir: Path) -> list[Path]:
    files = sorted(component_dir.glob("*.safetensors"))
    return files if files else sorted(component_dir.glob("*.bin"))


def stored_tensors(component_dir: Path) -> list[StoredTensor]:
    tensors: list[StoredTensor] = []
    for path in weight_files(component_dir):
        tensors += _safetensors_tensors(path) if path.suffix == ".safetensors" else _torch_bin_tensors(path)
    return sorted(tensors, key=lambda t: t.name)


def model_fingerprint(model_dir: Path) -> str:
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for component in COMPONENTS:
        component_dir = model_dir / component
        if not component_dir.is_dir():
            continue
        _field(h, component.encode("utf-8"))
        _field(h, canonical_json(public_config(read_config(component_dir, component))))
        for tensor in stored_tensors(component_dir):
            _field(h, tensor.name.encode("utf-8"))
            _field(h, tensor.dtype.encode("utf-8"))
            _field(h, canonical_json(tensor.shape))
            h.update(struct.pack(">Q", tensor.nbytes))
            for block in tensor.read_chunks():
                h.update(block)
    return h.hexdigest()
