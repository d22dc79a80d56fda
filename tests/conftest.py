"""Fixtures: real random-weight diffusers models, a facexlib BiSeNet .pth, keys, and a CLI runner."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker, and every CLI it starts, gets its share of the cores: torch's and
    ONNX Runtime's default of one thread per core in every worker leaves them spinning against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REVANON_ORT_THREADS"):
            os.environ.setdefault(variable, threads)


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def signal_handling_is_left_as_found():
    """Code run in-process must give back Ctrl-C as it found it: a handler or a blocked mask left behind
    would swallow a host program's Ctrl-C (and, here, break the tests after it in the same worker)."""
    def state():
        return signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = state()
    yield
    assert state() == before, f"SIGINT's handler or the blocked signals changed: {before} -> {state()}"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Built once per session: tiny latent model, zero-ε and random pixel models, a second latent model."""
    from revanon_rt import tiny

    root = tmp_path_factory.mktemp("models")
    return {
        "ldm": tiny.save_tiny_ldm(root / "ldm", seed=0),
        "ldm_other": tiny.save_tiny_ldm(root / "ldm_other", seed=1),
        "zero": tiny.save_tiny_pixel(root / "zero", zero_eps=True),
        "pixel": tiny.save_tiny_pixel(root / "pixel", seed=3),
        "zero64": tiny.save_tiny_pixel(root / "zero64", image_size=64, zero_eps=True),
    }


@pytest.fixture(scope="session")
def zero_engines(models, tmp_path_factory):
    """ONNX Runtime engines of the ε ≡ 0 models, for tests whose subject is not the backend: a CLI run
    on an engine starts in 1-2 s, against about 10 s for importing torch and diffusers."""
    from revanon_rt.engines.onnxruntime import OnnxRuntimeEngine
    from revanon_rt.export.build import build_engine

    root = tmp_path_factory.mktemp("zero_engines")
    return {name: build_engine(OnnxRuntimeEngine, models[name], root / name, batch=2, log=lambda message: None)
            for name in ("zero", "zero64")}


@pytest.fixture(scope="session")
def bisenet_pth(tmp_path_factory):
    from revanon_rt import tiny

    return tiny.save_random_bisenet(tmp_path_factory.mktemp("parser") / "parsing_bisenet.pth")


@pytest.fixture
def keyfile(tmp_path):
    from revanon_rt.keys import keygen

    path = tmp_path / "secret.key"
    keygen(path)
    return path


@pytest.fixture
def other_keyfile(tmp_path):
    from revanon_rt.keys import keygen

    path = tmp_path / "other.key"
    keygen(path)
    return path


def random_image(size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth random colours plus texture: varied pixel values, like a photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, channels))
    big = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR),
                     dtype=np.float64)
    return np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)


def crops_zip(path: Path, crops: dict[str, np.ndarray], fmt: str = "PNG") -> Path:
    """A zip of face crops named like LFW's (Person/Person_0001.jpg), as `train` and `eval` read them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in crops.items():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format=fmt)
            archive.writestr(name, buffer.getvalue())
    return path


def save_png(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def box_mask(size: int, lo: float = 0.25, hi: float = 0.75) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    a, b = int(size * lo), int(size * hi)
    m[a:b, a:b] = 255
    return m


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def cli(*args, env: dict | None = None, cwd: Path | None = None, input: str | None = None,
        python_flags: tuple = ()) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *python_flags, "-m", "revanon_rt", *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=cwd, input=input, timeout=900)


def edit_manifest(engine: Path, edit) -> None:
    """Change an engine's manifest with edit(manifest) and sign it again, as a build that wrote it so would."""
    from revanon_rt.engines.manifest import manifest_digest

    path = engine / "engine.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def anonymize_with_engine(engine: Path, folder: Path, key: Path) -> subprocess.CompletedProcess:
    """`run anonymize` of a 32 px crop with a box mask into folder/out, through the CLI."""
    src = save_png(folder / "face.png", random_image(32))
    mask = save_png(folder / "mask.png", box_mask(32))
    return cli("run", "anonymize", src, "--out", folder / "out", "--engine", engine, "--mask", mask, "--key", key)


TORCH_STACK = ("torch", "torchvision", "diffusers", "facexlib")


def blocking_env(folder: Path, modules: tuple[str, ...]) -> dict:
    """Environment for cli(env=...) in which importing any of `modules` fails, as on a box without them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(modules)!r}:\n"
        "            raise ImportError(f'{name} is blocked: this run must not import it')\n"
        "sys.meta_path.insert(0, _Blocked())\n")
    env = {"PYTHONPATH": str(folder)}
    probe = subprocess.run([sys.executable, "-c", f"import {modules[0]}"], env={**os.environ, **env}, capture_output=True)
    assert probe.returncode != 0 and b"blocked" in probe.stderr
    return env


@pytest.fixture(scope="session")
def no_torch_env(tmp_path_factory):
    """The edge box: numpy, onnxruntime, Pillow and dlib, and no torch stack."""
    return blocking_env(tmp_path_factory.mktemp("no_torch"), TORCH_STACK)


def tree_digest(folder: Path) -> dict:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
