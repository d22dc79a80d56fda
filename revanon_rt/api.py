"""revanon-rt as a library: a model or an engine loaded once, anonymizing and recovering images in memory.

    from revanon_rt.api import Anonymizer

    anonymizer = Anonymizer(engine="engine/", key_file="my.key")
    anonymized = anonymizer.anonymize(png_bytes)       # encoded bytes, a path, or an H x W x 3 uint8 array
    anonymized.png_bytes()                             # the PNG, metadata included
    original = anonymizer.deanonymize(anonymized.png_bytes())

A service keeps one Anonymizer, where each `revanon-rt run` loads the model (and an engine captures its
CUDA graphs) again. The work is the CLI's own (pipeline.py, photo.py), so the outputs of one recover with
the other. Errors are the RevanonError subclasses that the CLI reports, with its messages (which may name a
CLI flag): AuthError for a wrong key or an edited image, InputError for an image it cannot take, and so on.
Threads may share an Anonymizer: their images are decoded side by side and go through the model one engine
batch at a time, in the order asked, since a compiled engine replays its CUDA graphs on fixed buffers.
`with_key` gives the same loaded model under another key, for a service that keeps a key per user.
"""

from __future__ import annotations

import copy
import io
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from . import container
from .errors import (AuthError, InputError, MetadataError, ModelMismatchError, RevanonError, StateError,
                     UsageError, detached, torch_extra_error)
from .images import MAX_IMAGE_PIXELS, LoadedImage, decode_image, load_image
from .keys import Secret, exposure_warning, read_key_file
from .masks import BiSeNetMasker, face_map_from_file, face_map_from_image
from .pipeline import (Crop, Options, Output, anonymize_crops, authenticate_crops, in_parts, recover_authenticated,
                       recovery_crop_size, single)
from .schedule import DEFAULT_STEPS, MAX_STEPS

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, np.ndarray]
MaskInput = ImageInput


# what a caller catches comes from here too, with the Anonymizer
__all__ = ["Anonymizer", "KeyFileWarning", "Output", "RevanonError", "UsageError", "InputError", "MetadataError",
           "AuthError", "StateError", "ModelMismatchError"]


def resolve_device(name: str) -> str:
    """`auto` is CUDA when torch sees a GPU (an engine decides for itself)."""
    if name != "auto":
        return name
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def check_device_name(device: str) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")


def open_backend(model: Path | None, engine: Path | None, device: str = "auto", parser: Path | None = None):
    """The PyTorch reference on a diffusers folder, or a built engine (which needs no torch)."""
    if model is not None and engine is not None:
        raise UsageError("give --model DIR (PyTorch reference) or --engine DIR (a built engine), not both")
    if model is None and engine is None:
        raise UsageError("give --model DIR (PyTorch reference) or --engine DIR (a built engine)")
    check_device_name(device)
    if engine is not None:
        from .engines import open_engine

        backend = open_engine(Path(engine), device=device)
        if parser is not None:
            # an engine runs the parser it was built with; a .pth given here would be silently ignored
            raise UsageError(f"--parser goes with --model; --engine {engine} "
                             + ("runs the parser it was built with, so leave --parser out" if backend.can_parse else
                                "was built without one: rebuild it with `build --parser`, or use --masker "
                                "landmarks or --mask"))
        return backend
    try:
        from .reference import TorchReference
    except ImportError as exc:
        raise torch_extra_error("--model", exc, ", or run a built engine with --engine") from None
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
    """The masks a caller passed with the images, by the images' positions (recorded as masker "file", as
    --mask is)."""

    name = "file"

    def __init__(self):
        self.by_position: dict[int, np.ndarray] = {}

    def face_maps(self, rgbs: np.ndarray, positions: list) -> np.ndarray:
        return np.stack([self.by_position[position] for position in positions])


BYTES_LIKE = (bytes, bytearray, memoryview)


def _face_map(mask: MaskInput, name: str) -> np.ndarray:
    """F from an encoded mask image or a path (white = face, as a --mask file), or from an H x W array:
    bool (True = face) or uint8 (>= 128 = face, as the same array saved as a file)."""
    from PIL import Image

    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
            raise InputError(f"{name}: a mask array is H x W, bool or uint8 (white = face), not {mask.shape} "
                             f"{mask.dtype}")
        if mask.dtype == np.uint8 and mask.size and mask.max() == 1:  # would read as no face at all
            raise InputError(f"{name}: a uint8 mask array marks face with 255 (white), and this one holds only 0 "
                             "and 1; pass mask.astype(bool) or mask * 255")
        return face_map_from_image(Image.fromarray(mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else mask))
    if isinstance(mask, BYTES_LIKE):
        return face_map_from_file(io.BytesIO(bytes(mask)), name)
    if isinstance(mask, (str, os.PathLike)):
        return face_map_from_file(Path(mask))
    raise InputError(f"{name}: a mask is encoded image bytes, a path or an H x W array, not {type(mask).__name__}")


class KeyFileWarning(UserWarning):
    """The key file can be read by other users (the CLI prints the same warning)."""


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
        if type(steps) is not int or not 1 <= steps <= MAX_STEPS:  # the header would refuse anything else
            raise UsageError(f"steps is an integer from 1 to {MAX_STEPS}, not {steps!r}")
        self.secret = _secret(key_file, key, password)
        self.backend = open_backend(model, engine, device, parser)
        self.masker = None if masker is None else masker_for(self.backend, masker, landmarks)
        self.steps = steps
        self._detectors: dict = {}
        self._detectors_lock = threading.Lock()
        self._model_turns = _Turns()

    def with_key(self, *, key_file: str | os.PathLike | None = None, key: bytes | None = None,
                 password: str | None = None) -> Anonymizer:
        """This Anonymizer under another secret, sharing its loaded model, masker and lock: a service with a
        key per user keeps one model in memory, and their calls still take turns on it."""
        other = copy.copy(self)
        other.secret = _secret(key_file, key, password)
        return other

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
        images = list(images)
        names = _names(images)
        masker = self.masker
        if masks is not None:
            masks = list(masks)
            if len(masks) != len(images):
                raise UsageError(f"{len(images)} images and {len(masks)} masks")
            masker = _GivenMasks()
        elif masker is None:
            raise UsageError("this Anonymizer has no masker: pass masks with the images")
        results: list = [None] * len(images)
        crops = {}
        for i, (image, name) in enumerate(zip(images, names)):
            try:
                if masks is not None:
                    masker.by_position[i] = _face_map(masks[i], f"{name}: its mask")
                crops[i] = Crop(_load(image, name, self.image_size), _metadata_of(image, name, required=False),
                                i if masks is not None else name, name)
            except (InputError, MetadataError) as exc:
                results[i] = detached(exc)
        self.secret.for_anonymize()  # a password's scrypt, once per secret, before the model's turn
        return self._fill(results, crops, lambda chunk: anonymize_crops([crops[i] for i in chunk], self.backend,
                                                                        masker, self.secret, Options(steps=self.steps)))

    def anonymize_photo(self, image: ImageInput, *, faces: str = "all", min_face: int = 0,
                        detector: str = "hog", allow_no_faces: bool = False) -> Output:
        """Anonymize every face dlib finds in a photo of any size (--mode photo); pixels off the faces'
        masks stay byte-identical. The masker must be bisenet or landmarks."""
        from .photo import Selection, anonymize_photo, plan_faces, require_five_landmarks

        if self.masker is None:
            raise UsageError("photo mode masks faces with the bisenet or landmarks masker")
        require_five_landmarks(getattr(self.masker, "n_landmarks", 5))
        if faces not in ("all", "largest"):
            raise UsageError(f"faces is all or largest, not {faces!r}")
        name = _names([image])[0]
        loaded, metadata = _load(image, name, None), _metadata_of(image, name, required=False)
        self.secret.for_anonymize()  # a password's scrypt, once per secret, before the model's turn
        # dlib needs no model, and a large photo's detection takes seconds: other callers use the model meanwhile
        faces_detector, detector_lock = self._detector(detector)
        with detector_lock:
            found = faces_detector.detect(loaded.rgb)
        planned = plan_faces(found, self.image_size, Selection(faces, min_face), loaded.path)
        with self._model_turns:
            return anonymize_photo(loaded, metadata, self.backend, self.masker, self.secret, Options(steps=self.steps),
                                   name, planned=planned, found=found, allow_no_faces=allow_no_faces)

    def _detector(self, kind: str):
        """The dlib detector of this kind, loaded once for every Anonymizer sharing this model, and the lock
        that gives its callers turns (one dlib detector object is not documented as safe across threads)."""
        from .faces import DlibFaces

        with self._detectors_lock:
            if kind not in self._detectors:
                self._detectors[kind] = (DlibFaces(detector=kind), threading.Lock())
            return self._detectors[kind]

    def deanonymize(self, image: ImageInput, *, metadata: str | None = None) -> Output:
        """Recover an anonymized image, crop or photo, with its stored masks and step count. `metadata` is
        the sidecar's text, for an image whose PNG chunk was stripped or an array."""
        return single(self.deanonymize_batch([image], metadata=None if metadata is None else [metadata]))

    def deanonymize_batch(self, images: Sequence[ImageInput], *,
                          metadata: Sequence[str | None] | None = None) -> list[Output | Exception]:
        """Recover images together; each gets its Output or its own error."""
        images = list(images)
        if isinstance(metadata, (str, *BYTES_LIKE)):
            raise UsageError("metadata= is a list of texts, one per image")
        given = list(metadata) if metadata is not None else [None] * len(images)
        if len(given) != len(images):
            raise UsageError(f"{len(images)} images and {len(given)} metadata texts")
        results: list = [None] * len(images)
        crops = {}
        for i, (image, name, text) in enumerate(zip(images, _names(images), given)):
            try:
                if text is None:
                    text = _metadata_of(image, name, required=True)
                elif not isinstance(text, str):
                    raise MetadataError(f"{name}: metadata is the sidecar's JSON text, a str, not {type(text).__name__}")
                # as the CLI: what is not a photo's record must be a crop, refused from its header if not
                crop_size = recovery_crop_size(text, name, self.image_size)
                crops[i] = Crop(_load(image, name, crop_size, recovering=True), text, name, name)
            except (InputError, MetadataError, ModelMismatchError) as exc:
                results[i] = detached(exc)
        # before the turn on the model: a password's scrypt (0.5 s per unseen salt) and the tag's hash over
        # the pixels need no model, and a stranger's images with fresh salts must not hold up other callers
        ready = sorted(crops)
        checks = dict(zip(ready, authenticate_crops([crops[i] for i in ready], self.backend, self.secret, Options())))
        return self._fill(results, crops, lambda chunk: recover_authenticated(
            [crops[i] for i in chunk], [checks[i] for i in chunk], self.backend, Options()))

    def _fill(self, results: list, crops: dict[int, Crop], work) -> list:
        """The results of the inputs that loaded, put in their places among those that failed to load. `work`
        takes the positions of one engine batch of them, the group `run` makes of a folder: each is a turn of
        its own on the model, so that a caller with one image waits for a batch of a large request, not for
        all of it."""
        for chunk in in_parts(sorted(crops), self.backend.batch):
            with self._model_turns:
                done = work(chunk)
            for i, result in zip(chunk, done):
                results[i] = result
        return results


class _Turns:
    """The model's turns, given in the order callers asked for them (a threading.Lock favours no one, and the
    thread that has just released it often takes it again). A caller interrupted while waiting gives up its
    place without stalling those behind it."""

    def __init__(self):
        self._changed = threading.Condition(threading.Lock())
        self._issued = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def __enter__(self):
        with self._changed:
            ticket = self._issued
            self._issued += 1
            try:
                while ticket != self._serving:
                    self._changed.wait()
            except BaseException:
                if ticket == self._serving:
                    self._next()
                else:
                    self._abandoned.add(ticket)
                raise
        return self

    def __exit__(self, *exc_info):
        with self._changed:
            self._next()

    def _next(self):
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._changed.notify_all()


def _secret(key_file, key, password) -> Secret:
    if sum(v is not None for v in (key_file, key, password)) != 1:
        raise UsageError("give exactly one of key_file, key or password")
    if key_file is not None:
        if warning := exposure_warning(Path(key_file)):
            _warn_of_key_file(warning)
        return Secret.from_key(read_key_file(Path(key_file)))
    if key is not None:
        if not isinstance(key, BYTES_LIKE) or len(bytes(key)) != 32:
            raise UsageError("key is 32 raw bytes (a key file holds them; see `revanon-rt keygen`)")
        return Secret.from_key(bytes(key))
    if not isinstance(password, str) or not password:
        raise UsageError("the password is a non-empty str")
    return Secret.from_password(password)


_key_file_warnings_shown: dict = {}  # warn_explicit's registry for KeyFileWarning, bounded


def _warn_of_key_file(text: str) -> None:
    """warnings.warn(text, KeyFileWarning) at the Anonymizer's caller, with a registry of its own: the text
    names the key file, and the registry Python keeps in the caller's module would hold every text shown,
    one per user's key file in a service, for the life of the process."""
    if len(_key_file_warnings_shown) >= 1024:
        _key_file_warnings_shown.clear()
    caller = sys._getframe(3)  # past this function, _secret, and Anonymizer() or with_key()
    warnings.warn_explicit(text, KeyFileWarning, caller.f_code.co_filename, caller.f_lineno,
                           module=caller.f_globals.get("__name__"), registry=_key_file_warnings_shown,
                           module_globals=caller.f_globals)


def _names(images: list) -> list[str]:
    """What errors call each input: its path, or `image N` for bytes and arrays."""
    return [str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}" for i, image in enumerate(images)]


def _load(image: ImageInput, name: str, crop_size: int | None, recovering: bool = False) -> LoadedImage:
    if isinstance(image, BYTES_LIKE):
        return decode_image(io.BytesIO(bytes(image)), Path(name), crop_size, recovering)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"{name}: an image array is H x W x 3 uint8, not {image.shape} {image.dtype}")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: {image.shape[1]}x{image.shape[0]} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        return LoadedImage(Path(name), np.ascontiguousarray(image), None, None)
    if isinstance(image, (str, os.PathLike)):
        return load_image(Path(image), crop_size, recovering)
    hint = (" (a file object: its .read())" if hasattr(image, "read") else
            " (a PIL image: np.asarray(image.convert('RGB')))" if hasattr(image, "convert") else "")
    raise InputError(f"{name}: an image is encoded bytes, a path or an H x W x 3 uint8 array, not "
                     f"{type(image).__name__}{hint}")


def _metadata_of(image: ImageInput, name: str, required: bool) -> str | None:
    """The revanon metadata an input carries: its PNG chunk, or a sidecar beside a file."""
    text = None
    if isinstance(image, BYTES_LIKE):
        text = container.png_chunk_text(io.BytesIO(bytes(image)), name)
    elif isinstance(image, (str, os.PathLike)):
        text = container.read_metadata(Path(image))
    if text is None and required:
        raise MetadataError(f"{name}: no revanon metadata (was the PNG chunk stripped? pass the sidecar's text "
                            "as metadata=)")
    return text
