"""Photo mode (spec §8, issue 6): group photos composed from LFW originals at test time."""

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, TORCH_STACK, blocking_env, box_mask, cli, random_image, read_rgb, save_png
from revanon_rt import container
from revanon_rt.photo import footprint, paste_back, sample_crop

ORIGINALS = SHARED / "data" / "lfw" / "dev-250-originals.zip"
BACKGROUND = (90, 110, 95)
# (x, y, scale, rotation in degrees): three people at different sizes, slightly tilted
LAYOUT = [(20, 60, 0.9, -6), (300, 20, 1.3, 4), (640, 120, 0.75, 8)]


def compose(layout, size=(900, 520), picks=(0, 7, 14)) -> np.ndarray:
    with zipfile.ZipFile(ORIGINALS) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        canvas = Image.new("RGB", size, BACKGROUND)
        for (x, y, scale, angle), pick in zip(layout, picks):
            im = Image.open(io.BytesIO(z.read(names[pick]))).convert("RGB")
            side = int(250 * scale)
            im = im.resize((side, side), Image.Resampling.BICUBIC).rotate(angle, Image.Resampling.BICUBIC,
                                                                           fillcolor=BACKGROUND)
            canvas.paste(im, (x, y))
    return np.asarray(canvas).copy()


def replaced_pixels(shape, header, size) -> np.ndarray:
    """Which photo pixels the records allow to change: paste-back of an all-255 crop onto zeros."""
    marker = np.zeros(shape, np.uint8)
    from revanon_rt.masks import unpack_mask

    for face in header["faces"]:
        affine = np.array(face["affine"])
        mask = unpack_mask(face["mask"], "x")
        marker = np.maximum(marker, paste_back(np.zeros(shape, np.uint8), np.full((size, size, 3), 255, np.uint8),
                                               affine, mask))
    return marker[..., 0] > 0


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group")
    path = folder / "in" / "group.png"
    path.parent.mkdir()
    Image.fromarray(compose(LAYOUT)).save(path)
    return path


def test_integer_translation_crop_and_paste_are_exact():
    photo = random_image(100, seed=70)
    affine = np.array([[1.0, 0.0, -17.0], [0.0, 1.0, -23.0]])
    crop = sample_crop(photo, affine, 40)
    assert np.array_equal(crop, photo[23:63, 17:57])
    mask = np.ones((10, 10), np.uint8)
    mask[:5] = 0
    replacement = random_image(40, seed=71)
    pasted = paste_back(photo, replacement, affine, mask)
    assert np.array_equal(pasted[43:63, 17:57], replacement[20:])
    untouched = np.ones((100, 100), bool)
    untouched[43:63, 17:57] = False
    assert np.array_equal(pasted[untouched], photo[untouched])
    assert footprint(affine, 40, (100, 100))[:2] == (16, 22)


def test_overlapping_faces_recover_in_reverse_order(models):
    """Two overlapping faces at integer offsets (exact geometry) with the real ε ≡ 0 backend: the
    round trip is bit-exact, and the crops reach the model in record order, then in reverse."""
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.photo import PlannedFace, anonymize_photo
    from revanon_rt.pipeline import Options, deanonymize_image
    from revanon_rt.pixels import to_model
    from revanon_rt.reference import TorchReference

    class Recording:
        """The real backend; it only notes which crop each encode call receives."""

        def __init__(self, backend, windows):
            self.backend, self.windows, self.seen = backend, windows, []

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def encode(self, x):
            for crop in x:
                self.seen.append([i for i, w in self.windows.items() if np.array_equal(to_model(w()), crop)])
            return self.backend.encode(x)

    photo = random_image(160, seed=72)
    offsets = [(10, 10), (40, 30)]  # 64 px crops: these overlap
    planned = [PlannedFace([x, y, x + 64, y + 64], np.array([[1.0, 0, -x], [0, 1.0, -y]])) for x, y in offsets]

    class FullMask:
        name = "file"

        def face_maps(self, rgbs, relatives):
            return np.ones((len(rgbs), 512, 512), np.uint8)

    state = {"photo": photo}
    windows = {i: (lambda x=x, y=y: state["photo"][y:y + 64, x:x + 64]) for i, (x, y) in enumerate(offsets)}
    backend = Recording(TorchReference(models["zero64"]), windows)
    secret = Secret.from_key(bytes(range(32)))
    anon = anonymize_photo(LoadedImage(None, photo, None, None), None, backend, FullMask(), secret, Options(), "p",
                           planned=planned, nonces=[bytes([1]) * 16, bytes([2]) * 16])
    assert backend.seen[0] == [0], "face 0 first, on the original photo"
    assert (anon.image.rgb[10:94, 10:104] != photo[10:94, 10:104]).mean() > 0.3
    backend.seen.clear()
    state["photo"] = anon.image.rgb
    back = deanonymize_image(anon.image, anon.header_text(), "p", backend, secret, Options(), "p")
    assert backend.seen[0] == [1], "recovery starts with the last face, on the anonymized photo"
    assert len(backend.seen) == 2
    assert np.array_equal(back.image.rgb, photo)


def test_a_photo_with_more_faces_than_a_reader_accepts_is_refused(models):
    """Readers refuse records of over 256 faces (spec §7), so writing one would lose the originals."""
    from revanon_rt.errors import InputError
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.photo import PlannedFace, anonymize_photo
    from revanon_rt.pipeline import Options
    from revanon_rt.reference import TorchReference

    photo = random_image(160, seed=73)
    planned = [PlannedFace([0, 0, 64, 64], np.array([[1.0, 0, 0], [0, 1.0, 0]]))] * (container.MAX_FACES + 1)
    with pytest.raises(InputError, match="257 faces selected.*at most 256"):
        anonymize_photo(LoadedImage(Path("crowd.png"), photo, None, None), None, TorchReference(models["zero64"]),
                        None, Secret.from_key(bytes(32)), Options(), "crowd.png", planned=planned)


def test_fixed_nonces_must_match_the_faces_even_when_there_are_none(models):
    """Fixed nonces are for bit-for-bit comparisons: a count that does not match the faces is a caller's
    mistake, refused on a photo with no faces too rather than ignored."""
    from types import SimpleNamespace

    from revanon_rt.errors import UsageError
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.photo import anonymize_photo
    from revanon_rt.pipeline import Options
    from revanon_rt.reference import TorchReference

    photo, backend = random_image(160, seed=74), TorchReference(models["zero64"])
    args = (LoadedImage(Path("empty.png"), photo, None, None), None, backend, SimpleNamespace(name="file"),
            Secret.from_key(bytes(32)), Options(), "empty.png")
    with pytest.raises(UsageError, match="0 fixed nonce"):
        anonymize_photo(*args, planned=[], nonces=[bytes(16)], allow_no_faces=True)
    unchanged = anonymize_photo(*args, planned=[], nonces=[], allow_no_faces=True)
    assert np.array_equal(unchanged.image.rgb, photo) and unchanged.header["faces"] == []


def test_a_face_whose_mask_marks_nothing_fails_the_photo(models):
    """A face the parser finds nothing in would pass through unchanged, labelled anonymized: refused,
    as in crop mode, naming the --skip number that leaves it out."""
    from revanon_rt.errors import InputError
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.photo import PlannedFace, anonymize_photo
    from revanon_rt.pipeline import Options
    from revanon_rt.reference import TorchReference

    class FirstFaceEmpty:
        name = "file"

        def face_maps(self, rgbs, relatives):
            maps = np.ones((len(rgbs), 512, 512), np.uint8)
            maps[0] = 0
            return maps

    photo = random_image(160, seed=74)
    planned = [PlannedFace([x, x, x + 64, x + 64], np.array([[1.0, 0, -x], [0, 1.0, -x]]), None, n)
               for n, x in [(1, 8), (2, 90)]]
    with pytest.raises(InputError, match=r"face at \[8, 8, 72, 72\].*marks no face.*--skip 1 leaves"):
        anonymize_photo(LoadedImage(Path("two.png"), photo, None, None), None, TorchReference(models["zero64"]),
                        FirstFaceEmpty(), Secret.from_key(bytes(32)), Options(steps=2), "two.png", planned=planned)


def test_a_crowd_goes_through_the_model_a_batch_at_a_time_and_nan_output_is_never_written(models):
    """Faces that do not overlap share model calls up to the backend's batch, with the same result; a model
    that gives NaN (an overflowing fp16 engine) fails the photo instead of storing black pixels as a result."""
    from revanon_rt.errors import InputError
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.photo import PlannedFace, anonymize_photo
    from revanon_rt.pipeline import Options, anonymize_image
    from revanon_rt.reference import TorchReference

    class Model:
        """The real ε ≡ 0 backend with a given batch; it notes the rows of each UNet call, and can give NaN."""

        def __init__(self, batch, nan=False):
            self.backend, self.batch, self.nan, self.rows = TorchReference(models["zero64"]), batch, nan, []

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def eps(self, z, t):
            self.rows.append(len(z))
            return np.full_like(z, np.nan) if self.nan else self.backend.eps(z, t)

    class FullMask:
        name = "file"

        def face_maps(self, rgbs, relatives):
            return np.ones((len(rgbs), 512, 512), np.uint8)

    photo = random_image(300, seed=75)
    planned = [PlannedFace([x, y, x + 64, y + 64], np.array([[1.0, 0, -x], [0, 1.0, -y]]))
               for x, y in [(0, 0), (100, 0), (200, 0), (0, 150), (100, 150)]]
    secret, opts = Secret.from_key(bytes(32)), Options(steps=2)

    def anonymized(model):
        return anonymize_photo(LoadedImage(Path("crowd.png"), photo, None, None), None, model, FullMask(), secret, opts,
                               "crowd.png", planned=planned, nonces=[bytes([i + 1]) * 16 for i in range(5)]).image.rgb

    one, two = Model(1), Model(2)
    assert np.array_equal(anonymized(one), anonymized(two))
    assert set(one.rows) == {1} and two.rows[:2] == [2, 2] and max(two.rows) == 2
    with pytest.raises(InputError, match=r"crowd.png \(face 0\): the model gave NaN or Inf values"):
        anonymized(Model(2, nan=True))
    face = LoadedImage(Path("face.png"), random_image(64, seed=76), None, None)
    with pytest.raises(InputError, match="face.png: the model gave NaN or Inf values"):
        anonymize_image(face, None, Model(1, nan=True), FullMask(), secret, opts, "face.png")


def test_group_photo_every_face_found_background_untouched(zero_engines, group, keyfile, tmp_path, no_torch_env):
    """On an edge box: anonymized without the torch stack, recovered without torch or dlib."""
    out, rec = tmp_path / "anon", tmp_path / "rec"
    result = cli("run", "anonymize", group, "--mode", "photo", "--out", out, "--engine", zero_engines["zero64"],
                 "--masker", "landmarks", "--key", keyfile, env=no_torch_env)
    assert result.returncode == 0, result.stderr
    header = json.loads(container.read_png_chunk(out / "group.png"))
    assert header["mode"] == "photo" and len(header["faces"]) == 3
    centres = sorted(((x + 125 * s) for x, y, s, _ in LAYOUT))
    found = sorted((f["box"][0] + f["box"][2]) / 2 for f in header["faces"])
    assert all(abs(a - b) < 60 for a, b in zip(centres, found)), (centres, found)
    original, anonymized = read_rgb(group), read_rgb(out / "group.png")
    allowed = replaced_pixels(original.shape, header, 64)
    assert np.array_equal(anonymized[~allowed], original[~allowed]), "background must stay byte-identical"
    for face in header["faces"]:
        x0, y0, x1, y1 = (int(v) for v in face["box"])
        assert (anonymized[y0:y1, x0:x1] != original[y0:y1, x0:x1]).any(axis=2).mean() > 0.2

    bare = blocking_env(tmp_path / "bare", ("dlib", "face_recognition_models") + TORCH_STACK)
    back = cli("run", "deanonymize", out, "--out", rec, "--engine", zero_engines["zero64"], "--key", keyfile, env=bare)
    assert back.returncode == 0, back.stderr
    recovered = read_rgb(rec / "group.png")
    assert np.array_equal(recovered[~allowed], original[~allowed])
    # ε ≡ 0 flips are per-pixel noise that resampling blurs (spec §8): recovery is close, not exact
    close = np.abs(recovered.astype(int) - original.astype(int))[allowed].mean()
    far = np.abs(anonymized.astype(int) - original.astype(int))[allowed].mean()
    assert close < far / 2, (close, far)


def test_no_faces_tampering_and_wrong_key(zero_engines, group, keyfile, other_keyfile, tmp_path):
    landscape = tmp_path / "in" / "landscape.png"
    landscape.parent.mkdir()
    Image.fromarray(random_image(300, seed=73)).save(landscape)
    photo_args = ("--mode", "photo", "--engine", zero_engines["zero64"], "--masker", "landmarks", "--key", keyfile)
    refused = cli("run", "anonymize", landscape, "--out", tmp_path / "a", *photo_args)
    assert refused.returncode == 1 and "no faces found, so nothing was anonymized" in refused.stderr
    assert not (tmp_path / "a" / "landscape.png").exists(), "an unchanged photo is never written as anonymized"
    result = cli("run", "anonymize", landscape, "--out", tmp_path / "a", *photo_args, "--allow-no-faces")
    assert result.returncode == 0 and "no faces found" in result.stderr
    assert np.array_equal(read_rgb(tmp_path / "a" / "landscape.png"), read_rgb(landscape))
    assert json.loads(container.read_png_chunk(tmp_path / "a" / "landscape.png"))["faces"] == []

    anon = cli("run", "anonymize", group, "--mode", "photo", "--out", tmp_path / "g", "--engine", zero_engines["zero64"],
               "--masker", "landmarks", "--key", keyfile)
    assert anon.returncode == 0, anon.stderr
    twice = cli("run", "anonymize", tmp_path / "g" / "group.png", "--mode", "photo", "--out", tmp_path / "g2",
                "--engine", zero_engines["zero64"], "--masker", "landmarks", "--key", keyfile)
    assert twice.returncode == 1 and "is a revanon anonymized image" in twice.stderr and "again needs --force" in twice.stderr
    header = json.loads(container.read_png_chunk(tmp_path / "g" / "group.png"))
    header["faces"][1]["affine"][0][2] += 3.0
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("revanon", json.dumps(header), zip=False)
    edited = tmp_path / "edited" / "group.png"
    edited.parent.mkdir()
    Image.open(tmp_path / "g" / "group.png").save(edited, pnginfo=info)
    for target, key in ((edited, keyfile), (tmp_path / "g" / "group.png", other_keyfile)):
        refused = cli("run", "deanonymize", target, "--out", tmp_path / "r", "--engine", zero_engines["zero64"], "--key", key)
        assert refused.returncode == 1 and "wrong key, or the image or its metadata was changed" in refused.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.png"))


def test_photo_options(zero_engines, group, keyfile, tmp_path, no_torch_env):
    dry = cli("run", "anonymize", group, "--mode", "photo", "--dry-run", "--skip", "1", "--out", tmp_path / "dry",
              env=no_torch_env)
    assert dry.returncode == 0 and (tmp_path / "dry" / "group.faces.png").exists()
    assert "group.png: 3 face(s); 0: " in dry.stderr and dry.stderr.count("(left out)") == 1, dry.stderr
    assert stat.S_IMODE((tmp_path / "dry" / "group.faces.png").stat().st_mode) == 0o600, "it shows the real faces"
    assert sorted(p.name for p in (tmp_path / "dry").iterdir()) == ["group.faces.png"]
    common = ("--mode", "photo", "--engine", zero_engines["zero64"], "--masker", "landmarks", "--key", keyfile)
    largest = cli("run", "anonymize", group, "--out", tmp_path / "l", "--faces", "largest", *common)
    assert largest.returncode == 0
    faces = json.loads(container.read_png_chunk(tmp_path / "l" / "group.png"))["faces"]
    assert len(faces) == 1 and faces[0]["box"][2] - faces[0]["box"][0] > 120
    skipped = cli("run", "anonymize", group, "--out", tmp_path / "s", "--skip", "0", "--min-face", "60", *common)
    assert skipped.returncode == 0
    assert len(json.loads(container.read_png_chunk(tmp_path / "s" / "group.png"))["faces"]) == 2
    for flags, message in ((("--skip", "9"), "--skip 9: it has 3 face(s) to number, 0 to 2"),
                           (("--min-face", "100000"), "3 face(s) found and none selected")):
        unselected = cli("run", "anonymize", group, "--out", tmp_path / "u", *flags, *common)
        assert unselected.returncode == 1 and message in unselected.stderr, unselected.stderr
    for flags, message in ((("--skip", "-1"), "faces are numbered from 0"),
                           (("--detector", "bogus"), "--detector bogus: choose hog or cnn")):
        refused = cli("run", "anonymize", group, "--out", tmp_path / "u", *flags, *common)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert not (tmp_path / "u" / "group.png").exists()
    # the dry run writes the inputs' names and no mapping, so it refuses the flags that promise otherwise
    for flags in (("--rename",), ("--rename", "--mapping", tmp_path / "dry-map.json")):
        refused = cli("run", "anonymize", group, "--mode", "photo", "--dry-run", "--out", tmp_path / "dn", *flags)
        assert refused.returncode == 2 and "--rename and --mapping go with the run" in refused.stderr, refused.stderr
    assert not (tmp_path / "dn").exists() and not (tmp_path / "dry-map.json").exists()
    renamed = cli("run", "anonymize", group, "--out", tmp_path / "n", "--rename", "--mapping",
                  tmp_path / "map.json", *common)
    assert renamed.returncode == 0 and (tmp_path / "n" / "000001.png").exists()
    assert json.loads((tmp_path / "map.json").read_text()) == {str(group): str(tmp_path / "n" / "000001.png")}
    for landmarks, message in (("68", "photo mode finds, aligns and masks faces with dlib's 5-point"),
                               ("7", "have 5 or 68 points")):
        refused = cli("run", "anonymize", group, "--out", tmp_path / "m", *common, "--landmarks", landmarks)
        assert refused.returncode == 2 and message in " ".join(refused.stderr.split()), refused.stderr
    assert not (tmp_path / "m").exists()
    jpeg = cli("run", "anonymize", group, "--out", tmp_path / "j", "--output-format", "jpeg", *common)
    assert jpeg.returncode == 2 and "recovery needs every pixel" in jpeg.stderr
    for photo_flag in (("--faces", "largest"), ("--detector", "cnn"), ("--allow-no-faces",)):
        crop_flag = cli("run", "anonymize", group, "--out", tmp_path / "c", *photo_flag, "--engine",
                        zero_engines["zero64"], "--masker", "landmarks", "--key", keyfile)
        assert crop_flag.returncode == 2 and "--mode photo" in crop_flag.stderr, crop_flag.stderr
    not_landmarks = cli("run", "anonymize", group, "--out", tmp_path / "c", "--landmarks", "68", "--engine",
                        zero_engines["zero64"], "--mask", group, "--key", keyfile)
    assert not_landmarks.returncode == 2 and "goes with --masker landmarks, not file" in not_landmarks.stderr
    assert not (tmp_path / "c").exists()


def test_large_photo_is_detected_on_a_downscaled_copy(zero_engines, keyfile, tmp_path):
    big = compose([(200, 300, 4.0, 0), (1500, 500, 3.0, 5)], size=(3000, 2000), picks=(3, 10))
    path = tmp_path / "in" / "big.jpg"
    path.parent.mkdir()
    Image.fromarray(big).save(path, quality=92)
    result = cli("run", "anonymize", path, "--mode", "photo", "--out", tmp_path / "a", "--engine", zero_engines["zero64"],
                 "--masker", "landmarks", "--key", keyfile)
    assert result.returncode == 0, result.stderr
    faces = json.loads(container.read_png_chunk(tmp_path / "a" / "big.png"))["faces"]
    # the boxes are in the full-size photo's pixels: each centre near its 250-px LFW image's centre
    centres = sorted(((x + 125 * s, y + 125 * s) for x, y, s, _ in ((200, 300, 4.0, 0), (1500, 500, 3.0, 5))))
    found = sorted(((f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2) for f in faces)
    assert len(found) == 2 and all(np.hypot(a[0] - b[0], a[1] - b[1]) < 150 for a, b in zip(centres, found)), found


def test_photo_mode_warns_about_clamped_faces_and_only_them(models, tmp_path):
    """Two faces pasted into one photo, one through the ε ≡ 0 model and one through a real model with ε ≡ 0.05,
    whose flipped half is denoised far beyond the pixel range: only the second run warns."""
    from revanon_rt import tiny
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret
    from revanon_rt.masks import FileMasker
    from revanon_rt.photo import PlannedFace, anonymize_photo
    from revanon_rt.pipeline import Options
    from revanon_rt.reference import TorchReference

    photo = random_image(160, seed=73)
    planned = [PlannedFace([x, y, x + 64, y + 64], np.array([[1.0, 0, -x], [0, 1.0, -y]])) for x, y in [(8, 8), (90, 90)]]
    masker = FileMasker(save_png(tmp_path / "mask.png", box_mask(64)))
    secret = Secret.from_key(bytes(range(32)))
    constant = TorchReference(tiny.save_tiny_pixel(tmp_path / "constant", image_size=64, constant_eps=0.05))
    notes = {}
    for name, backend in (("zero", TorchReference(models["zero64"])), ("constant", constant)):
        out = anonymize_photo(LoadedImage(Path(f"{name}.png"), photo, None, None), None, backend, masker, secret,
                              Options(steps=5), "p", planned=planned)
        notes[name] = [n for n in out.warnings if "beyond the pixel range" in n]
    assert notes["zero"] == []
    assert len(notes["constant"]) == 1 and notes["constant"][0].startswith("constant.png: the model generated")


def test_dry_run_drawing_and_the_transform_select_the_same_faces_even_for_twin_detections():
    from revanon_rt.faces import Face
    from revanon_rt.errors import InputError
    from revanon_rt.photo import Selection, draw_faces, plan_faces

    lm = np.array([[70.0, 50], [60, 50], [30, 50], [40, 50], [50, 70]])
    twin = Face((20.0, 20.0, 80.0, 80.0), 1.0, lm)
    found = [twin, Face(twin.box, twin.score, lm.copy()), Face((100.0, 20.0, 120.0, 40.0), 1.0, lm + [80, 0])]
    selection = Selection(min_face=30, skip=(1,))
    eligible, kept = selection.apply(found)
    assert (eligible, kept) == ([0, 1], [0])
    assert [p.number for p in plan_faces(found, 32, selection)] == [0]
    assert [p.number for p in plan_faces(found, 32, Selection(skip=(0,)))] == [1, 2], "numbers as --dry-run draws"
    drawn = draw_faces(np.zeros((140, 140, 3), np.uint8), found, selection)
    assert tuple(drawn[20, 50]) == (255, 40, 40), "face 0 is kept: red"
    assert tuple(drawn[20, 110]) == (150, 150, 150), "the small face is not numbered: grey"
    assert Selection(faces="largest").apply(found)[1] == [0]
    with pytest.raises(InputError, match=r"--skip 3: it has 3 face\(s\) to number, 0 to 2"):
        Selection(skip=(3,)).apply(found)


def _bilinear_by_padding(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """An independent bilinear sampler for the tests: edges replicated by padding, float64 weights."""
    pad = 64
    padded = np.pad(image.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    x, y = x.astype(np.float64) + pad, y.astype(np.float64) + pad
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    return ((padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx) * (1 - fy)
            + (padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx) * fy)


def _agree(a: np.ndarray, b: np.ndarray) -> None:
    """float32 (the tool) against float64 (the test): equal but for a rare rounding tie, one level apart."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())


def test_rotated_scaled_crop_and_paste_follow_spec_8_beyond_the_photo_edge():
    """A rotation, a scale and a fractional shift, with the crop reaching past the photo's top-left
    corner: sampling replicates the edge, and paste-back replaces exactly the pixels §8 names."""
    photo = random_image(80, seed=74)
    size, angle, scale = 32, np.deg2rad(17.0), 1.37
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    affine = np.array([[c, -s, 9.3], [s, c, 4.6]])  # photo (x, y) -> crop (u, v)
    inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    assert (x < 0).any() and (y < 0).any(), "the crop must reach past the photo for this to test edge replication"
    expected_crop = np.rint(_bilinear_by_padding(photo, x, y)).astype(np.uint8)
    _agree(sample_crop(photo, affine, size), expected_crop)

    mask = (random_image(8, seed=75)[..., 0] > 127).astype(np.uint8)
    crop = random_image(size, seed=76)
    py, px = np.mgrid[0:80, 0:80].astype(np.float64)
    cu = (affine[0, 0] * px + affine[0, 1] * py + affine[0, 2]).astype(np.float32)
    cv = (affine[1, 0] * px + affine[1, 1] * py + affine[1, 2]).astype(np.float32)
    inside = (cu >= 0) & (cu <= size - 1) & (cv >= 0) & (cv <= size - 1)
    ci, cj = np.clip(np.rint(cu), 0, size - 1).astype(int), np.clip(np.rint(cv), 0, size - 1).astype(int)
    cell = size // mask.shape[0]
    replaced = inside & (mask[cj // cell, ci // cell] == 1)
    assert 50 < replaced.sum() < inside.sum() - 50, "some of the footprint is face and some is not"
    pasted = paste_back(photo, crop, affine, mask)
    changed = (pasted != photo).any(axis=2)
    assert not changed[~replaced].any(), "only the pixels §8 names may change"
    _agree(pasted[replaced], np.rint(_bilinear_by_padding(crop, cu[replaced], cv[replaced])).astype(np.uint8))


def test_a_forged_affine_samples_nothing_without_numpy_warnings():
    """Under --skip-auth a record's affine is only known to be finite; overflowing geometry must not print
    numpy's multi-line warnings around the one-line report."""
    import warnings

    photo = random_image(40)
    for affine in (np.array([[1e300, 0, 0], [0, 1e300, 0]]), np.array([[1e-300, 0, 1e300], [0, 1e-300, 0]])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sample_crop(photo, affine, 16).shape == (16, 16, 3)
            pasted = paste_back(photo, random_image(16, seed=1), affine, np.ones((4, 4), np.uint8))
        changed = np.argwhere((pasted != photo).any(axis=2))
        assert len(changed) <= 1 and all(tuple(p) == (0, 0) for p in changed), "at most the origin maps inside"
