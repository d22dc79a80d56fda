"""Finding faces with dlib, torch-free: detection, 5-point landmarks, the crop template, the
landmark masker, and the 128-D identity descriptor used by the evaluation.

Models come from the PyPI packages `dlib-bin` and `face_recognition_models`. The 5-point shape
predictor, the detectors and the recognizer are CC0. The 68-point predictor was trained on
iBUG 300-W, whose license bars commercial use; it is offered only as an explicit option.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError, UsageError
from .masks import FACE_MAP_SIZE

INSTALL = "pip install dlib-bin face_recognition_models"
DETECTORS = ("hog", "cnn")
LICENSE_68 = ("the 68-point landmark model was trained on iBUG 300-W, whose license bars commercial use; "
              "use it for research only")

# Where dlib's 5 landmarks sit in an aligned crop, as fractions of the crop side, pixel centres
# at (i + 0.5) / side. Measured: the mean of dlib's landmarks over 591 of the LFW training crops
# (train-128.zip, centre 196 of 250 px: hair, ears and some background, FFHQ-like), made
# left-right symmetric. Order is dlib's: the outer and inner corners of the eye on the image's right,
# then of the eye on the image's left, then the nose base. "Right" and "left" here always mean the image's.
TEMPLATE_5 = np.array([[0.6451, 0.4424], [0.5634, 0.4444], [0.3549, 0.4424], [0.4366, 0.4444], [0.5000, 0.6049]])


def _models_dir() -> Path:
    # face_recognition_models' own __init__ needs pkg_resources, gone from modern setuptools
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"dlib's face models are missing: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_path(name: str) -> Path:
    path = _models_dir() / name
    if not path.is_file():
        raise UsageError(f"{path}: missing; reinstall with {INSTALL}")
    return path


def _dlib():
    try:
        import dlib
    except ImportError:
        raise UsageError(f"face detection and landmarks need dlib: {INSTALL}") from None
    return dlib


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in photo pixels
    score: float
    landmarks: np.ndarray  # 5 x 2 (x, y) in photo pixels, pixel centres at integers

    @property
    def size(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


class DlibFaces:
    """dlib's HOG detector (or its CNN detector) and 5-point shape predictor.

    The detector sees a copy of the photo scaled so that its long side is at most `max_side`
    (large photos) and at least `min_side` (small crops); landmarks are fitted on the full image."""

    def __init__(self, detector: str = "hog", max_side: int = 2048, min_side: int = 256, landmarks: int = 5):
        dlib = _dlib()
        self.dlib = dlib
        self.kind = detector
        self.max_side, self.min_side = max_side, min_side
        if detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(str(model_path("mmod_human_face_detector.dat")))
        elif detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
        else:
            raise UsageError(f"unknown detector {detector!r}; use {' or '.join(DETECTORS)}")
        predictors = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}
        if landmarks not in predictors:
            raise UsageError(f"--landmarks {landmarks}: dlib's landmark models have 5 or 68 points")
        name = predictors[landmarks]
        self._predictor = dlib.shape_predictor(str(model_path(name)))
        self.n_landmarks = landmarks

    def _scale(self, width: int, height: int) -> float:
        side = max(width, height)
        if side > self.max_side:
            return self.max_side / side
        if side < self.min_side:
            return self.min_side / side
        return 1.0

    def detect(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        scale = self._scale(width, height)
        small = rgb if scale == 1.0 else np.asarray(
            Image.fromarray(rgb).resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                        Image.Resampling.BILINEAR))
        found = []
        if self.kind == "cnn":
            for d in self._cnn(small, 0):
                found.append((d.rect, float(d.confidence)))
        else:
            rects, scores, _ = self._hog.run(small, 1, 0.0)
            found = [(r, float(s)) for r, s in zip(rects, scores)]
        faces = []
        for rect, score in found:
            box = tuple(float(v) / scale for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
            faces.append(Face(box, score, self.landmarks(rgb, box)))
        return sorted(faces, key=lambda f: (f.box[1], f.box[0]))

    def landmarks(self, rgb: np.ndarray, box) -> np.ndarray:
        return np.array([[p.x, p.y] for p in self.shape(rgb, box).parts()], dtype=np.float64)

    def shape(self, rgb: np.ndarray, box):
        """dlib's landmark object for the face in box (left, top, right, bottom), as its recognizer takes it."""
        return self._predictor(rgb, self.dlib.rectangle(*(int(round(v)) for v in box)))


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 5-point order from 5 or 68 landmarks (eye corners and nose base)."""
    if len(landmarks) == 5:
        return landmarks
    # 68-point indices: 36..41 the eye on the image's left, 42..47 the one on its right, 33 the nose base
    return landmarks[[45, 42, 36, 39, 33]]


def similarity_to_template(landmarks: np.ndarray, crop_size: int) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation) that maps photo pixel
    coordinates onto the crop, least-squares over the 5 landmarks."""
    src = five_points(landmarks).astype(np.float64)
    dst = TEMPLATE_5 * crop_size - 0.5
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    # closed form for x' = a x - b y + tx, y' = b x + a y + ty
    denom = (s**2).sum()
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / denom
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / denom
    rot = np.array([[a, -b], [b, a]])
    t = dst_mean - rot @ src_mean
    return np.hstack([rot, t[:, None]])


def face_region(points5: np.ndarray, side: int, out: int = FACE_MAP_SIZE, scale: float = 1.0) -> np.ndarray:
    """The face from the chin up to the hairline, as an ellipse in the face's own frame, drawn into
    an out x out map over a side x side crop. Units: the distance between the eye centres. `scale`
    grows or shrinks the ellipse about its centre (bench/mask_scale.py measures what that trades)."""
    p = five_points(points5)
    right_eye, left_eye, nose = (p[0] + p[1]) / 2, (p[2] + p[3]) / 2, p[4]
    mid = (right_eye + left_eye) / 2
    across = right_eye - left_eye
    d = float(np.linalg.norm(across))
    if d < 1e-6:
        raise InputError("degenerate landmarks")
    x_axis = across / d
    y_axis = np.array([-x_axis[1], x_axis[0]])
    if np.dot(nose - mid, y_axis) < 0:
        y_axis = -y_axis
    # hairline about 1.2 d above the eye line, chin about 1.9 d below; half-width 1.1 d
    centre = mid + 0.35 * d * y_axis
    half_h, half_w = 1.55 * d * scale, 1.10 * d * scale
    coords = (np.arange(out) + 0.5) * side / out - 0.5
    u, v = np.meshgrid(coords, coords)
    du, dv = u - centre[0], v - centre[1]
    a = (du * x_axis[0] + dv * x_axis[1]) / half_w
    b = (du * y_axis[0] + dv * y_axis[1]) / half_h
    return ((a * a + b * b) <= 1.0).astype(np.uint8)


def template_region(side: int, out: int = FACE_MAP_SIZE, scale: float = 1.0) -> np.ndarray:
    """The face region where the crop template puts the face: an aligned crop's face with no detection."""
    return face_region(TEMPLATE_5 * side - 0.5, side, out, scale)


def face_region_68(landmarks: np.ndarray, side: int, out: int = FACE_MAP_SIZE) -> np.ndarray:
    """Tighter outline from the 68-point jaw line and brows, brows raised to the hairline."""
    jaw, brows = landmarks[0:17], landmarks[17:27]
    nose = landmarks[33]
    lift = 0.9 * np.linalg.norm(brows.mean(0) - nose)
    up = brows.mean(0) - nose
    up = up / (np.linalg.norm(up) + 1e-9)
    top = brows[::-1] + lift * up
    polygon = np.vstack([jaw, top])
    scale = out / side
    canvas = Image.new("L", (out, out))
    ImageDraw.Draw(canvas).polygon([((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in polygon], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


class LandmarksMasker:
    """`--masker landmarks`: a fitted face region from dlib's landmarks, drawn into the face map F."""

    name = "landmarks"

    def __init__(self, landmarks: int = 5, detector: str = "hog"):
        self.faces = DlibFaces(detector=detector, landmarks=landmarks)
        self.n_landmarks = landmarks

    def face_map(self, rgb: np.ndarray, source) -> np.ndarray:
        found = self.faces.detect(rgb)
        if not found:
            raise InputError(f"{source}: no face found by the landmark masker; give a mask with --mask")
        return self.face_map_from_landmarks(max(found, key=lambda f: f.size).landmarks, rgb.shape[0])

    def face_map_from_landmarks(self, landmarks: np.ndarray, side: int) -> np.ndarray:
        """Photo mode knows the landmarks already, mapped into the crop: no second detection."""
        if self.n_landmarks == 68 and len(landmarks) == 68:
            return face_region_68(landmarks, side)
        return face_region(landmarks, side)

    def face_maps(self, rgbs: np.ndarray, relatives: list) -> np.ndarray:
        return np.stack([self.face_map(rgb, rel) for rgb, rel in zip(rgbs, relatives)])


class Recognizer:
    """dlib's 128-D face descriptor (ResNet, CC0), L2-normalized."""

    def __init__(self):
        dlib = _dlib()
        self.faces = DlibFaces(min_side=256)
        self._net = dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def describe(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """Descriptor of the largest face in the image upscaled to 256, or of the central box when
        no face is found. Returns (descriptor, found)."""
        side = rgb.shape[0]
        if side < 256:
            rgb = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.BILINEAR))
        found = self.faces.detect(rgb)
        if found:
            face = max(found, key=lambda f: f.size)
            box = face.box
        else:
            s = rgb.shape[0]
            box = (s * 0.2, s * 0.2, s * 0.8, s * 0.8)
        descriptor = np.asarray(self._net.compute_face_descriptor(rgb, self.faces.shape(rgb, box)), dtype=np.float64)
        return descriptor / (np.linalg.norm(descriptor) + 1e-12), bool(found)
