"""Run-to-run determinism (spec §9): fixed key, nonce and salt give identical bytes."""

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import box_mask, random_image, save_png
from revanon_rt.errors import UsageError

SCRIPT = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from revanon_rt.images import load_image
    from revanon_rt.keys import Secret
    from revanon_rt.masks import FileMasker
    from revanon_rt.pipeline import Options, anonymize_image
    from revanon_rt.reference import TorchReference

    model, image, mask, nonce, salt = sys.argv[1:6]
    backend = TorchReference(model)
    out = anonymize_image(load_image(Path(image)), None, backend, FileMasker(Path(mask)), Secret.from_password("pw"),
                          Options(steps=20), Path(image).name, nonce=bytes.fromhex(nonce), salt=bytes.fromhex(salt))
    print(hashlib.sha256(out.png_bytes()).hexdigest())
""")


def _digest_in_subprocess(*args) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_fixed_nonce_and_salt_give_identical_bytes(models, tmp_path):
    image = save_png(tmp_path / "face.png", random_image(64, seed=21))
    mask = save_png(tmp_path / "mask.png", box_mask(64))
    nonce, salt = "11" * 16, "22" * 16
    first = _digest_in_subprocess(models["ldm"], image, mask, nonce, salt)
    second = _digest_in_subprocess(models["ldm"], image, mask, nonce, salt)
    assert first == second

    from revanon_rt.images import load_image
    from revanon_rt.keys import Secret
    from revanon_rt.masks import FileMasker
    from revanon_rt.pipeline import Options, anonymize_image
    from revanon_rt.reference import TorchReference

    backend = TorchReference(models["ldm"])
    in_process = anonymize_image(load_image(image), None, backend, FileMasker(mask), Secret.from_password("pw"),
                                 Options(steps=20), "face.png", nonce=bytes.fromhex(nonce), salt=bytes.fromhex(salt))
    assert hashlib.sha256(in_process.png_bytes()).hexdigest() == first
    other_nonce = anonymize_image(load_image(image), None, backend, FileMasker(mask), Secret.from_password("pw"),
                                  Options(steps=20), "face.png", nonce=bytes([7]) * 16, salt=bytes.fromhex(salt))
    assert not np.array_equal(other_nonce.image.rgb, in_process.image.rgb)
    # the zero nonce is --insecure-key-reuse's, which records null: as a fixed nonce it would hide the reuse
    with pytest.raises(UsageError, match="must differ from each other and from the zero nonce"):
        anonymize_image(load_image(image), None, backend, FileMasker(mask), Secret.from_password("pw"),
                        Options(steps=20), "face.png", nonce=bytes(16), salt=bytes.fromhex(salt))
