"""The library API (revanon_rt.api): one loaded engine serving many calls, interchangeable with the CLI."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import box_mask, cli, random_image, read_rgb, save_png
from revanon_rt import container
from revanon_rt.api import AuthError, InputError, MetadataError, StateError, UsageError  # as a caller imports them


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def read_rgb_bytes(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


SERVICE = r"""
import io, json, sys
import numpy as np
from PIL import Image
from revanon_rt.api import Anonymizer

engine, key_file, made_by_cli, out = sys.argv[1:5]
crops = [np.asarray(Image.open(f"{out}/in-{i}.png")).copy() for i in range(3)]
mask = np.asarray(Image.open(f"{out}/mask.png")).copy()
anonymizer = Anonymizer(engine=engine, key_file=key_file, masker=None)
inputs = [open(f"{out}/in-0.png", "rb").read(), f"{out}/in-1.png", crops[2], b"not an image"]
anonymized = anonymizer.anonymize_batch(inputs, masks=[mask, f"{out}/mask.png", mask, mask])
report = {"error": f"{type(anonymized[3]).__name__}: {anonymized[3]}"}
open(f"{out}/by-api.png", "wb").write(anonymized[0].png_bytes())
recovered = anonymizer.deanonymize_batch([a.png_bytes() for a in anonymized[:3]] + [made_by_cli])
report["anonymized_differs"] = [float((a.image.rgb != c).any(axis=2).mean()) for a, c in zip(anonymized, crops)]
report["outside_kept"] = [bool(np.array_equal(a.image.rgb[mask < 128], c[mask < 128])) for a, c in zip(anonymized, crops)]
report["recovered_exact"] = [bool(np.array_equal(r.image.rgb, c)) for r, c in zip(recovered, crops)]
report["states"] = [r.header["state"] for r in recovered]
report["from_cli"] = recovered[3].image.rgb.tolist()
report["torch_imported"] = "torch" in sys.modules
print(json.dumps(report))
"""


def test_one_engine_serves_a_batch_of_bytes_paths_and_arrays_without_torch(zero_engines, keyfile, tmp_path,
                                                                             no_torch_env):
    """A service on an edge box: ε ≡ 0 recovers bit for bit, and the API and the CLI read each other's files."""
    crops = [random_image(32, seed=40 + i) for i in range(3)]
    for i, crop in enumerate(crops):
        save_png(tmp_path / f"in-{i}.png", crop)
    mask = box_mask(32)
    save_png(tmp_path / "mask.png", mask)
    made = cli("run", "anonymize", tmp_path / "in-2.png", "--out", tmp_path / "cli", "--engine", zero_engines["zero"],
               "--mask", tmp_path / "mask.png", "--key", keyfile)
    assert made.returncode == 0, made.stderr

    result = subprocess.run([sys.executable, "-c", SERVICE, str(zero_engines["zero"]), str(keyfile),
                             str(tmp_path / "cli" / "in-2.png"), str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, **no_torch_env}, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch_imported"] is False
    assert report["error"] == "InputError: image 3: not an image format this tool reads"
    assert all(share > 0.2 for share in report["anonymized_differs"]), report["anonymized_differs"]
    assert report["outside_kept"] == [True] * 3
    assert report["recovered_exact"] == [True] * 3
    assert report["states"] == ["recovered"] * 4
    assert np.array_equal(np.array(report["from_cli"], dtype=np.uint8), crops[2])

    header = json.loads(container.read_png_chunk(tmp_path / "by-api.png"))
    assert header["state"] == "anonymized" and header["masker"] == "file" and header["steps"] == 50
    back = cli("run", "deanonymize", tmp_path / "by-api.png", "--out", tmp_path / "rec", "--engine",
               zero_engines["zero"], "--key", keyfile, env=no_torch_env)
    assert back.returncode == 0, back.stderr
    assert np.array_equal(read_rgb(tmp_path / "rec" / "by-api.png"), crops[0])


def test_the_reference_with_bisenet_gives_what_the_cli_gives(models, bisenet_pth, keyfile, tmp_path):
    """A latent model and the BiSeNet masker: recovering one file through the API and through the CLI gives
    the same bytes, since both run the same pipeline."""
    from revanon_rt.api import Anonymizer

    save_png(tmp_path / "face.png", random_image(64, seed=50))
    anonymizer = Anonymizer(model=models["ldm"], parser=bisenet_pth, key_file=keyfile, device="cpu", steps=6)
    anonymized = anonymizer.anonymize(tmp_path / "face.png")
    assert anonymized.header["masker"] == "bisenet" and anonymized.header["steps"] == 6
    (tmp_path / "anon.png").write_bytes(anonymized.png_bytes())
    by_api = anonymizer.deanonymize(tmp_path / "anon.png")
    back = cli("run", "deanonymize", tmp_path / "anon.png", "--out", tmp_path / "rec", "--model", models["ldm"],
               "--key", keyfile, "--device", "cpu")
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "rec" / "anon.png").read_bytes() == by_api.png_bytes()


def test_mistakes_raise_the_errors_the_cli_reports(zero_engines, keyfile, other_keyfile, tmp_path):
    from revanon_rt.api import Anonymizer, KeyFileWarning
    from revanon_rt.keys import read_key_file

    with pytest.raises(UsageError, match="exactly one of key_file, key or password"):
        Anonymizer(engine=zero_engines["zero"], key_file=keyfile, password="x", masker=None)
    with pytest.raises(UsageError, match="bisenet masker needs --parser"):
        Anonymizer(engine=zero_engines["zero"], key_file=keyfile)
    for short in (b"", bytes(31)):
        with pytest.raises(UsageError, match="key is 32 raw bytes"):
            Anonymizer(engine=zero_engines["zero"], key=short, masker=None)
    anonymizer = Anonymizer(engine=zero_engines["zero"], key=read_key_file(keyfile), masker=None)
    with pytest.raises(UsageError, match="no masker"):
        anonymizer.anonymize(random_image(32))
    crop = random_image(32, seed=60)
    with pytest.raises(InputError, match="image 0: 48x48 is not an aligned face crop of the model's 32x32.*"
                                         r"anonymize_photo in Python"):
        anonymizer.anonymize(png_bytes(random_image(48)), mask=box_mask(48))

    anonymized = anonymizer.anonymize(crop, mask=box_mask(32)).png_bytes()
    with pytest.raises(StateError, match="is a revanon anonymized image"):
        anonymizer.anonymize(anonymized, mask=box_mask(32))
    with pytest.raises(AuthError, match="wrong key"):
        Anonymizer(engine=zero_engines["zero"], key_file=other_keyfile, masker=None).deanonymize(anonymized)
    pixels = read_rgb_bytes(anonymized)
    with pytest.raises(MetadataError, match="no revanon metadata"):
        anonymizer.deanonymize(pixels)
    metadata = container.png_chunk_text(io.BytesIO(anonymized), "x")
    assert np.array_equal(anonymizer.deanonymize(pixels, metadata=metadata).image.rgb, crop)
    with pytest.raises(MetadataError, match="image 0: the revanon metadata is not valid JSON"):
        anonymizer.deanonymize(random_image(40), metadata=metadata[:-1])
    with pytest.raises(InputError, match="image 0: 40x40, but its record is of a 32x32 crop"):
        anonymizer.deanonymize(png_bytes(random_image(40)), metadata=metadata)
    # a few KB of 1-bit PNG that would decode to 200 MB: refused from its header, before the auth check decodes it
    info = PngImagePlugin.PngInfo()
    info.add_itxt(container.KEYWORD, metadata)
    bomb = io.BytesIO()
    Image.new("1", (8192, 8192)).save(bomb, format="PNG", pnginfo=info)
    with pytest.raises(InputError, match="image 0: 8192x8192, but its record is of a 32x32 crop"):
        anonymizer.deanonymize(bomb.getvalue())
    # a path that is not a regular file fails without leaking its descriptor
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert isinstance(anonymizer.deanonymize_batch([tmp_path])[0], InputError)
    assert len(os.listdir("/proc/self/fd")) == fds

    keyfile.chmod(0o644)
    with pytest.warns(KeyFileWarning, match="can be read by other users; chmod 600") as shown:
        Anonymizer(engine=zero_engines["zero"], key_file=keyfile, masker=None)
    assert shown[0].filename == __file__  # the caller's line, as warnings.warn(stacklevel=...) would name
    # shown once per key file, as Python's default does, but not kept in this module's registry for good:
    # a service meets a key file per user
    other_keyfile.chmod(0o644)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for path in (keyfile, keyfile, other_keyfile):
            anonymizer.with_key(key_file=path)
    assert [str(w.message).split()[0] for w in shown] == [str(keyfile), str(other_keyfile)]
    assert not any(str(keyfile) in str(k) for k in globals().get("__warningregistry__", {}))
    keyfile.chmod(0o600)
    other_keyfile.chmod(0o600)
    with pytest.raises(UsageError, match="steps is an integer"):
        Anonymizer(engine=zero_engines["zero"], key_file=keyfile, masker=None, steps=True)
    # a mask that marks nothing would return the face untouched, labelled anonymized
    with pytest.raises(InputError, match="its mask marks no face"):
        anonymizer.anonymize(crop, mask=np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="marks face with 255 .* holds only 0 and 1; pass mask.astype"):
        anonymizer.anonymize(crop, mask=(box_mask(32) > 0).astype(np.uint8))  # 0/1, not white
    with pytest.raises(InputError, match="bool or uint8"):
        anonymizer.anonymize(crop, mask=box_mask(32).astype(np.float32))
    black = save_png(tmp_path / "black.png", np.zeros((32, 32), np.uint8))
    face = save_png(tmp_path / "face.png", crop)
    refused = cli("run", "anonymize", face, "--out", tmp_path / "out", "--engine", zero_engines["zero"],
                  "--mask", black, "--key", keyfile)
    assert refused.returncode == 1 and "its mask marks no face" in refused.stderr
    assert not (tmp_path / "out" / "face.png").exists()

    # every way of giving a mask gives the same record, and a bad item fails alone
    white = save_png(tmp_path / "white.png", box_mask(32))
    batch = anonymizer.anonymize_batch([memoryview(png_bytes(crop)), face, crop, Image.fromarray(crop),
                                        io.BytesIO(png_bytes(crop))],
                                       masks=[box_mask(32) > 0, white, white.read_bytes(), box_mask(32), white])
    assert isinstance(batch[3], InputError) and "np.asarray(image.convert('RGB'))" in str(batch[3])
    assert isinstance(batch[4], InputError) and str(batch[4]).endswith("not BytesIO (a file object: its .read())")
    assert len({json.dumps(output.header["faces"][0]["mask"]) for output in batch[:3]}) == 1


def test_photo_mode_through_the_api_recovers_as_the_cli_does(zero_engines, keyfile, tmp_path):
    from test_photo import LAYOUT, compose

    from revanon_rt.api import Anonymizer

    photo = compose(LAYOUT)
    anonymizer = Anonymizer(engine=zero_engines["zero64"], key_file=keyfile, masker="landmarks")
    anonymized = anonymizer.anonymize_photo(png_bytes(photo))
    assert anonymized.header["mode"] == "photo" and len(anonymized.header["faces"]) == 3
    (tmp_path / "group.png").write_bytes(anonymized.png_bytes())
    by_api = anonymizer.deanonymize(anonymized.png_bytes())
    back = cli("run", "deanonymize", tmp_path / "group.png", "--out", tmp_path / "rec", "--engine",
               zero_engines["zero64"], "--key", keyfile)
    assert back.returncode == 0, back.stderr
    assert np.array_equal(read_rgb(tmp_path / "rec" / "group.png"), by_api.image.rgb)
    assert np.abs(by_api.image.rgb.astype(int) - photo).mean() < np.abs(anonymized.image.rgb.astype(int) - photo).mean() / 2
    with pytest.raises(InputError, match="no faces found, so nothing was anonymized"):
        anonymizer.anonymize_photo(random_image(200, seed=90))
    with pytest.raises(InputError, match="3 face.s. found and none selected"):
        anonymizer.anonymize_photo(photo, min_face=10_000)

    # dlib needs no model: a photo's detection runs while another caller holds the model, and only then waits
    detector, detector_lock = anonymizer._detector("hog")
    detected = []

    class Watched:  # the real detector, with a record of the photos it has seen
        def detect(self, rgb):
            faces = detector.detect(rgb)
            detected.append(len(faces))
            return faces

    anonymizer._detectors["hog"] = (Watched(), detector_lock)
    seen, again = _done_while_the_model_is_busy(anonymizer._model_turns, lambda: anonymizer.anonymize_photo(photo),
                                                lambda: detected == [3])
    assert seen
    assert not np.array_equal(again[0].image.rgb, anonymized.image.rgb)  # a fresh per-face nonce
    assert again[0].header["faces"][0]["box"] == anonymized.header["faces"][0]["box"]


def _done_while_the_model_is_busy(lock, call, done) -> tuple[bool, list]:
    """Runs call in a thread while another caller has its turn on the model: whether done() came true meanwhile."""
    results = []
    with lock:
        worker = threading.Thread(target=lambda: results.append(call()))
        worker.start()
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        happened = done()
        assert not results, "the model work waits for its turn"
    worker.join(60)
    return happened, results


def test_a_password_is_stretched_before_the_models_turn(zero_engines, tmp_path):
    """A service recovering a password-made image whose salt it has not seen runs scrypt (0.5 s, before any tag
    can be checked) while another caller holds the model: a stranger's fresh salts must not stall that caller.
    The same holds for a new password's first anonymization."""
    from revanon_rt.api import Anonymizer

    crop = random_image(32, seed=62)
    owner = Anonymizer(engine=zero_engines["zero"], password="correct horse", masker=None)
    made = owner.anonymize(crop, mask=box_mask(32)).png_bytes()
    salt = base64.b64decode(json.loads(container.png_chunk_text(io.BytesIO(made), "x"))["kdf"]["salt"])
    service = owner.with_key(password="correct horse")  # the same model and lock, a secret with no salt seen yet
    stretched, recovered = _done_while_the_model_is_busy(service._model_turns, lambda: service.deanonymize(made),
                                                         lambda: salt in service.secret._derived)
    assert stretched
    assert np.array_equal(recovered[0].image.rgb, crop)

    newcomer = owner.with_key(password="battery staple")
    secret = newcomer.secret
    stretched, anonymized = _done_while_the_model_is_busy(
        newcomer._model_turns, lambda: newcomer.anonymize(crop, mask=box_mask(32)),
        lambda: secret.run_salt is not None and secret.run_salt in secret._derived)
    assert stretched
    assert base64.b64decode(anonymized[0].header["kdf"]["salt"]) == secret.run_salt


def test_a_large_batch_takes_turns_with_a_caller_who_came_later(zero_engines, keyfile):
    """A batch goes through the model one engine batch per turn, and turns go in the order they were asked
    for: a caller with one image waits for the first engine batch of a larger request made before it, not for
    all of it."""
    from revanon_rt.api import Anonymizer

    anonymizer = Anonymizer(engine=zero_engines["zero"], key_file=keyfile, masker=None)
    large_size = 3 * anonymizer.backend.batch
    crops = [random_image(32, seed=70 + i) for i in range(large_size + 1)]
    finished = {}

    def request(name, images):
        outputs = anonymizer.anonymize_batch(images, masks=[box_mask(32)] * len(images))
        finished[name] = (time.monotonic(), outputs)

    turns = anonymizer._model_turns
    with turns:
        large = threading.Thread(target=request, args=("large", crops[:large_size]))
        large.start()
        deadline = time.monotonic() + 60
        while turns._issued < 2 and time.monotonic() < deadline:  # the large request waits first in line
            time.sleep(0.01)
        small = threading.Thread(target=request, args=("small", crops[large_size:]))
        small.start()
        while turns._issued < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    large.join(120)
    small.join(120)
    assert finished["small"][0] < finished["large"][0]
    outputs = finished["large"][1] + finished["small"][1]
    recovered = anonymizer.deanonymize_batch([o.png_bytes() for o in outputs])
    assert [np.array_equal(r.image.rgb, c) for r, c in zip(recovered, crops)] == [True] * len(crops)
    assert turns._serving == turns._issued  # every turn given back, recovery's included


def test_a_caller_interrupted_while_waiting_for_its_turn_stalls_no_one():
    """Ctrl-C in a host program waiting for the model gives up that caller's place in line: the caller behind
    it still gets the model when the one ahead is done."""
    import signal

    from revanon_rt.api import _Turns

    turns, holder_may_go, order = _Turns(), threading.Event(), []

    def hold():
        with turns:
            order.append("holder")
            holder_may_go.wait(60)

    def wait_in_line():
        with turns:
            order.append("behind")

    holder = threading.Thread(target=hold, daemon=True)  # a regression fails the test, not the whole run
    holder.start()
    while turns._issued < 1:
        time.sleep(0.01)
    main, interrupted = threading.main_thread().ident, threading.Event()

    def ctrl_c_once(signum, frame):  # Ctrl-C as Python's own handler raises it, and later presses ignored
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    def press_ctrl_c():  # until it lands: once, on a loaded CI machine, a single SIGINT never interrupted the wait
        while turns._issued < 2:
            time.sleep(0.01)
        while not interrupted.wait(0.3):
            signal.pthread_kill(main, signal.SIGINT)

    behind = threading.Thread(target=wait_in_line, daemon=True)
    previous = signal.signal(signal.SIGINT, ctrl_c_once)
    try:
        threading.Thread(target=press_ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            with turns:  # ticket 1, interrupted while the holder has ticket 0
                order.append("interrupted")
    finally:
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
    behind.start()  # ticket 2
    while turns._issued < 3:
        time.sleep(0.01)
    holder_may_go.set()
    holder.join(60)
    behind.join(60)
    assert order == ["holder", "behind"]
    assert turns._serving == turns._issued == 3


def test_an_image_that_fails_keeps_nothing_of_its_request_alive(zero_engines, keyfile, other_keyfile):
    """A service's failed inputs (a wrong size, a wrong key) come back as errors; those must not hold the
    request's images and keys until Python's occasional full collection, which a busy service would see as
    memory growing by the request (64 MB per 1000 small batches before)."""
    import gc
    import weakref

    from revanon_rt.api import Anonymizer

    anonymizer = Anonymizer(engine=zero_engines["zero"], key_file=keyfile, masker=None)
    stranger = anonymizer.with_key(key_file=other_keyfile)
    made = anonymizer.anonymize(random_image(32, seed=80), mask=box_mask(32)).png_bytes()
    gc.collect()
    gc.disable()
    try:
        crop, wrong_size = random_image(32, seed=81), random_image(40, seed=82)
        mask, made_copy = box_mask(32), bytearray(made)
        probes = [weakref.ref(crop), weakref.ref(mask)]
        results = anonymizer.anonymize_batch([crop, wrong_size], masks=[mask, mask])
        assert isinstance(results[1], InputError) and results[1].__traceback__ is None
        recovered = stranger.deanonymize_batch([made_copy])
        assert isinstance(recovered[0], AuthError)
        probes.append(weakref.ref(recovered[0]))
        del crop, wrong_size, mask, made_copy, results, recovered
        assert [probe() is None for probe in probes] == [True] * 3
    finally:
        gc.enable()


def test_an_unexpected_error_kept_as_a_result_keeps_its_traceback_as_text():
    from revanon_rt.errors import detached
    from revanon_rt.pipeline import _attempt

    def deep_inside_the_model():
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("a bug") from exc

    failed = _attempt(deep_inside_the_model)
    assert isinstance(failed, RuntimeError) and failed.__traceback__ is None
    assert failed.__cause__.__traceback__ is None
    assert "deep_inside_the_model" in failed.traceback_text and "KeyError" in failed.traceback_text
    assert not hasattr(detached(InputError("x.png: not an image")), "traceback_text")


def test_importing_the_library_leaves_pillows_bomb_limit_to_the_host(tmp_path):
    """The command line raises Pillow's process-wide limit to its own; a host program keeps the one it set,
    and the tool refuses what that limit refuses, by its number."""
    bomb = tmp_path / "wide.png"
    Image.new("1", (20000, 100)).save(bomb)  # 2 M pixels in a few hundred bytes
    check = ("import sys, PIL.Image as I; I.MAX_IMAGE_PIXELS = 500_000; from revanon_rt.api import Anonymizer; "
             "from revanon_rt.images import load_image; assert I.MAX_IMAGE_PIXELS == 500_000\n"
             "try: load_image(sys.argv[1])\nexcept Exception as e: print(e)")
    result = subprocess.run([sys.executable, "-c", check, str(bomb)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wide.png: its pixel count is over the limit of 1000000" in result.stdout, result.stdout
