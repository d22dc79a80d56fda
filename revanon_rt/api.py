"""revanon-rt as a library: a model or an engine loaded once, anonymizing and recovering images in memory.

    from revanon_rt.api import Anonymizer

    anonymizer = Anonymizer(engine="engine/", key_file="my.key")
    anonymized = anonymizer.anonymize(png_bytes)       # encoded bytes, a path, or an H x W x 3 uint8 array
    anonymized.png_bytes()                             # the PNG, metadata included
    original = anonymizer.deanonymize(anonymized.png_bytes())

A service keeps one Anonymizer, where each `revanon-rt run` loads the model (and an engine captures its
CUDA graphs) again. The work is the CLI's own (pipeline.py, photo.py), so the outputs of one recover with
the other. Errors are the RevanonError subclasses that the CLI reports: AuthError for a wrong key or an
edited image, InputError for an image it cannot take, and so on. Threads may share an Anonymizer: their
images are decoded side by side and go through the model one call at a time, since a compiled engine replays
its CUDA graphs on fixed buffers.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from . import container
from .errors import InputError, MetadataError, UsageError
from .images import LoadedImage, decode_image, load_image
from .keys import Secret, read_key_file
from .masks import BiSeNetMasker, face_map_from_file, face_map_from_image
from .pipeline import Crop, Options, Output, anonymize_crops, deanonymize_crops, single
from .schedule import DEFAULT_STEPS, MAX_STEPS

ImageInput = Union[bytes, str, os.PathLike, np.ndarray]
MaskInput = Union[bytes, str, os.PathLike, np.ndarray]


def resolve_device(name: str) -> str:
    """`auto` is CUDA when torch sees a GPU (an engine decides for itself)."""
    if name != "auto":
        return name
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def open_backend(model: Path | None, engine: Path | None, device: str = "auto", parser: Path | None = None):
    """The PyTorch reference on a diffusers folder, or a built engine (which needs no torch)."""
    if (model is None) == (engine is None):
        raise UsageError("give --model DIR (PyTorch reference) or --engine DIR (a built engine)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if engine is not None:
        from .engines import open_engine

        return open_engine(Path(engine), device=device)
    try:
        from .reference import TorchReference
    except ImportError as exc:
        raise UsageError(f"--model needs the PyTorch extra ({exc.name} is missing): "
                         "pip install 'revanon-rt[torch]', or run a built engine with --engine") from None
    return TorchReference(Path(model), device=resolve_device(device), parser=None if parser is None else Path(parser))


def masker_for(backend, name: str, landmarks: int = 5):
    """The bisenet masker (the backend's parser) or the landmarks masker (dlib)."""
    if name == "landmarks":
        from .faces import LandmarksMasker

        return LandmarksMasker(landmarks=landmarks)
    if name != "bisenet":
        raise UsageError(f"the masker is bisenet or landmarks, not {name!r}")
    if not backend.can_parse:
        raise UsageError("the bisenet masker needs --parser BISENET.pth (facexlib's parsing_bisenet.pth; parser= "
                         "in Python) with a model, or an engine built with one; without it use the landmarks "
                         "masker, or give masks")
    return BiSeNetMasker(backend)


class _GivenMasks:
    """The masks a caller passed with the images, by the images' names (recorded as masker "file", as
    --mask is)."""

    name = "file"

    def __init__(self, by_name: dict[str, np.ndarray]):
        self.by_name = by_name

    def face_maps(self, rgbs: np.ndarray, relatives: list) -> np.ndarray:
        return np.stack([self.by_name[str(relative)] for relative in relatives])


def _face_map(mask: MaskInput, name: str) -> np.ndarray:
    """White (>= 128) = face, as a --mask file."""
    from PIL import Image

    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise InputError(f"{name}: a mask array is H x W, not {mask.shape}")
        return face_map_from_image(Image.fromarray(np.asarray(mask, dtype=np.uint8)))
    if isinstance(mask, bytes):
        try:
            with Image.open(io.BytesIO(mask)) as im:
                im.load()
                return face_map_from_image(im)
        except (OSError, ValueError) as exc:
            raise InputError(f"{name}: cannot read the mask image ({exc})") from None
    return face_map_from_file(Path(mask))


class Anonymizer:
    """One model or engine, one key, and a masker; see the module's docstring.

    key_file, key (32 raw bytes) or password (scrypt, as --password-file) gives the secret. masker is
    "bisenet" (needs a parser: `parser=` with a model, or an engine built with one), "landmarks" (dlib),
    or None when every call passes its `mask`.
    """

    def __init__(self, *, model: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
                 key_file: str | os.PathLike | None = None, key: bytes | None = None, password: str | None = None,
                 masker: str | None = "bisenet", parser: str | os.PathLike | None = None, landmarks: int = 5,
                 device: str = "auto", steps: int = DEFAULT_STEPS):
        if sum(v is not None for v in (key_file, key, password)) != 1:
            raise UsageError("give exactly one of key_file, key or password")
        if not 1 <= steps <= MAX_STEPS:
            raise UsageError(f"steps must be 1 to {MAX_STEPS}, not {steps}")
        if key_file is not None:
            self.secret = Secret.from_key(read_key_file(Path(key_file)))
        elif key is not None:
            if not isinstance(key, bytes) or len(key) != 32:
                raise UsageError("key is 32 raw bytes (a key file holds them; see `revanon-rt keygen`)")
            self.secret = Secret.from_key(key)
        else:
            if not password:
                raise UsageError("the password is empty")
            self.secret = Secret.from_password(password)
        self.backend = open_backend(model, engine, device, parser)
        self.masker = None if masker is None else masker_for(self.backend, masker, landmarks)
        self.steps = steps
        self._detectors: dict = {}
        self._model_lock = threading.Lock()

    @property
    def image_size(self) -> int:
        """The side of the aligned face crops the model takes."""
        return self.backend.image_size

    def anonymize(self, image: ImageInput, *, mask: MaskInput | None = None) -> Output:
        """Anonymize one aligned face crop of image_size x image_size."""
        return single(self.anonymize_batch([image], masks=None if mask is None else [mask]))

    def anonymize_batch(self, images: Sequence[ImageInput], *,
                        masks: Sequence[MaskInput] | None = None) -> list[Output | Exception]:
        """Anonymize crops together (an engine built for a batch gets full batches). Each image gets its
        Output, or the error that stopped it alone; the others carry on."""
        names = _names(images)
        masker = self.masker
        if masks is not None:
            if len(masks) != len(images):
                raise UsageError(f"{len(images)} images and {len(masks)} masks")
            if len(set(names)) < len(names):
                raise UsageError("a file appears twice among images given with masks")
            masker = _GivenMasks({})
        elif masker is None:
            raise UsageError("this Anonymizer has no masker: pass masks with the images")
        results: list = [None] * len(images)
        crops = {}
        for i, (image, name) in enumerate(zip(images, names)):
            try:
                if masks is not None:
                    masker.by_name[name] = _face_map(masks[i], f"{name}: its mask")
                crops[i] = Crop(_load(image, name, self.image_size), _metadata_of(image, name, required=False),
                                name, name)
            except (InputError, MetadataError) as exc:
                results[i] = exc
        return self._fill(results, crops, lambda ready: anonymize_crops(ready, self.backend, masker, self.secret,
                                                                        Options(steps=self.steps)))

    def anonymize_photo(self, image: ImageInput, *, faces: str = "all", min_face: int = 0,
                        detector: str = "hog") -> Output:
        """Anonymize every face dlib finds in a photo of any size (--mode photo); pixels off the faces'
        masks stay byte-identical. The masker must be bisenet or landmarks."""
        from .faces import DlibFaces
        from .photo import Selection, anonymize_photo

        if self.masker is None:
            raise UsageError("photo mode masks faces with the bisenet or landmarks masker")
        if faces not in ("all", "largest"):
            raise UsageError(f"faces is all or largest, not {faces!r}")
        name = _names([image])[0]
        loaded, metadata = _load(image, name, None), _metadata_of(image, name, required=False)
        with self._model_lock:
            if detector not in self._detectors:
                self._detectors[detector] = DlibFaces(detector=detector)
            return anonymize_photo(loaded, metadata, self.backend, self.masker, self.secret, Options(steps=self.steps),
                                   name, detector=self._detectors[detector], selection=Selection(faces, min_face))

    def deanonymize(self, image: ImageInput, *, metadata: str | None = None) -> Output:
        """Recover an anonymized image, crop or photo, with its stored masks and step count. `metadata` is
        the sidecar's text, for an image whose PNG chunk was stripped or an array."""
        return single(self.deanonymize_batch([image], metadata=None if metadata is None else [metadata]))

    def deanonymize_batch(self, images: Sequence[ImageInput], *,
                          metadata: Sequence[str | None] | None = None) -> list[Output | Exception]:
        """Recover images together; each gets its Output or its own error."""
        if metadata is not None and len(metadata) != len(images):
            raise UsageError(f"{len(images)} images and {len(metadata)} metadata texts")
        given = list(metadata) if metadata is not None else [None] * len(images)
        results: list = [None] * len(images)
        crops = {}
        for i, (image, name, text) in enumerate(zip(images, _names(images), given)):
            try:
                text = text if text is not None else _metadata_of(image, name, required=True)
                crops[i] = Crop(_load(image, name, None), text, name, name)
            except (InputError, MetadataError) as exc:
                results[i] = exc
        return self._fill(results, crops, lambda ready: deanonymize_crops(ready, self.backend, self.secret, Options()))

    def _fill(self, results: list, crops: dict[int, Crop], run) -> list:
        """The results of the inputs that loaded, put in their places among those that failed to load."""
        ready = sorted(crops)
        if ready:
            with self._model_lock:
                done = run([crops[i] for i in ready])
            for i, result in zip(ready, done):
                results[i] = result
        return results


def _names(images: Sequence[ImageInput]) -> list[str]:
    """What errors call each input: its path, or `image N` for bytes and arrays."""
    return [f"image {i}" if isinstance(image, (bytes, bytearray, np.ndarray)) else str(image)
            for i, image in enumerate(images)]


def _load(image: ImageInput, name: str, crop_size: int | None) -> LoadedImage:
    if isinstance(image, (bytes, bytearray)):
        return decode_image(io.BytesIO(image), Path(name), crop_size)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"{name}: an image array is H x W x 3 uint8, not {image.shape} {image.dtype}")
        return LoadedImage(Path(name), np.ascontiguousarray(image), None, None)
    return load_image(Path(image), crop_size)


def _metadata_of(image: ImageInput, name: str, required: bool) -> str | None:
    """The revanon metadata an input carries: its PNG chunk, or a sidecar beside a file."""
    if isinstance(image, (bytes, bytearray)):
        text = container.png_chunk_text(io.BytesIO(image), name)
    elif isinstance(image, np.ndarray):
        text = None
    else:
        text = container.read_metadata(Path(image))
    if text is None and required:
        raise MetadataError(f"{name}: no revanon metadata (was the PNG chunk stripped? pass the sidecar's text "
                            "as metadata=)")
    return text
