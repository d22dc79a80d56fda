"""Key files, passwords and their refusal cases (spec §5)."""

import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from revanon_rt import keys
from revanon_rt.encoding import b64encode
from revanon_rt.errors import MetadataError, UsageError


def test_keygen_creates_0600_hex_key_and_never_overwrites(tmp_path):
    path = tmp_path / "k.key"
    keys.keygen(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_bytes()
    assert len(text) == 65 and text.endswith(b"\n")
    key = keys.read_key_file(path)
    assert len(key) == 32
    with pytest.raises(UsageError, match="never overwrites"):
        keys.keygen(path)
    assert path.read_bytes() == text
    other = tmp_path / "k2.key"
    keys.keygen(other)
    assert keys.read_key_file(other) != key


@pytest.mark.parametrize("content, ok", [
    (b"ab" * 32, True), (b"ab" * 32 + b"\n", True), (b"ab" * 32 + b"\r\n", True),
    (b"ab" * 32 + b"\n\n", False), (b"ab" * 31, False), (b"zz" * 32, False), (b"", False), (b"ab" * 33, False),
    (b"ab" * 31 + b"  ", False), (b"ab" * 31 + b" a", False), (b"ab" * 31 + b"\tab", False),
])
def test_key_file_format(tmp_path, content, ok):
    path = tmp_path / "k"
    path.write_bytes(content)
    if ok:
        assert keys.read_key_file(path) == bytes.fromhex("ab" * 32)
    else:
        with pytest.raises(UsageError, match=str(path)):
            keys.read_key_file(path)


def test_password_file_loses_exactly_one_newline(tmp_path):
    path = tmp_path / "pw"
    for raw, expected in [(b"hunter2\n", "hunter2"), (b"hunter2\r\n", "hunter2"), (b"hunter2\n\n", "hunter2\n"),
                          (b"hunter2", "hunter2"), (b" spaced \n", " spaced ")]:
        path.write_bytes(raw)
        assert keys.read_password_file(path) == expected
    path.write_bytes(b"\n")
    with pytest.raises(UsageError, match="empty"):
        keys.read_password_file(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="UTF-8"):
        keys.read_password_file(path)
    path.write_bytes(b"x" * keys.MAX_PASSWORD_FILE_BYTES)
    assert len(keys.read_password_file(path)) == keys.MAX_PASSWORD_FILE_BYTES
    # read no further than the limit, or --password-file /dev/zero fills the memory
    path.write_bytes(b"x" * (keys.MAX_PASSWORD_FILE_BYTES + 1))
    with pytest.raises(UsageError, match="pw: over 65536 bytes"):
        keys.read_password_file(path)


def test_a_password_can_come_through_a_pipe(tmp_path):
    """Process substitution (--password-file <(pass show x)) keeps the password off the disk."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"from a pipe\n",), daemon=True)
    writer.start()
    assert keys.read_password_file(fifo) == "from a pipe"
    writer.join(timeout=10)


def test_nfc_makes_composed_and_decomposed_passwords_equal():
    salt = bytes(16)
    assert keys.scrypt_key("Caf\u00e9", salt) == keys.scrypt_key("Cafe\u0301", salt)
    assert keys.scrypt_key("Caf\u00e9", salt) != keys.scrypt_key("Cafe", salt)


def test_password_secret_round_trips_salt_through_the_header():
    secret = keys.Secret.from_password("correct horse")
    key, kdf = secret.for_anonymize()
    assert kdf["name"] == "scrypt" and (kdf["n"], kdf["r"], kdf["p"]) == (2**17, 8, 1)
    assert secret.for_anonymize()[1]["salt"] == kdf["salt"], "one salt per run"
    fresh = keys.Secret.from_password("correct horse")
    assert fresh.for_header(keys.check_kdf(kdf, "x"), "x") == key
    assert keys.Secret.from_password("wrong").for_header(kdf, "x") != key


def test_threads_stretch_a_salt_once_and_at_most_a_few_salts_at_a_time(monkeypatch):
    """Eight threads recovering one user's images (one salt) run scrypt once; eight strangers' images with
    fresh salts run it SCRYPT_AT_ONCE at a time, since each run takes 128 MiB."""
    real_scrypt, running, runs, most = keys.scrypt_key, [0], [], [0]
    count_lock = threading.Lock()

    def counted_scrypt(password, salt):  # the real scrypt, counted
        with count_lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            runs.append(salt)
        try:
            return real_scrypt(password, salt)
        finally:
            with count_lock:
                running[0] -= 1

    monkeypatch.setattr(keys, "scrypt_key", counted_scrypt)
    monkeypatch.setattr(keys, "_scrypt_slots", threading.BoundedSemaphore(2))

    def derive_in_threads(secret, salts):
        got = {}
        threads = [threading.Thread(target=lambda i=i, salt=salt: got.__setitem__(
            i, secret.for_header({"name": "scrypt", "salt": keys.b64encode(salt)}, "x")))
            for i, salt in enumerate(salts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return [got[i] for i in range(len(salts))]

    one_user = derive_in_threads(keys.Secret.from_password("pw"), [bytes([7]) * 16] * 8)
    assert len(runs) == 1 and len(set(one_user)) == 1 and one_user[0] == real_scrypt("pw", bytes([7]) * 16)
    runs.clear()
    strangers = keys.Secret.from_password("pw")
    derive_in_threads(strangers, [bytes([i]) * 16 for i in range(8)])
    assert len(runs) == 8 and most[0] == 2
    assert strangers._stretching == {}


def test_a_long_lived_secret_keeps_a_bounded_number_of_derived_keys(monkeypatch):
    """A service recovering files with a salt each must not hold every derived key forever."""
    monkeypatch.setattr(keys, "DERIVED_KEYS_KEPT", 2)
    secret = keys.Secret.from_password("pw")
    salts = [bytes([i]) * 16 for i in range(3)]
    derived = [secret.for_header({"name": "scrypt", "salt": keys.b64encode(s)}, "x") for s in salts]
    assert list(secret._derived) == salts[1:]
    assert secret.for_header({"name": "scrypt", "salt": keys.b64encode(salts[0])}, "x") == derived[0]
    assert derived[0] == keys.scrypt_key("pw", salts[0]) and len(set(derived)) == 3


@pytest.mark.parametrize("kdf, message", [
    ({"name": "argon2"}, "unknown key derivation"),
    ({"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 2**10, "r": 8, "p": 1}, "foreign scrypt"),
    ({"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 2**17, "r": 8, "p": 4}, "foreign scrypt"),
    ({"name": "scrypt", "salt": "AAAA", "n": 2**17, "r": 8, "p": 1}, "16 bytes"),
    ({"name": "scrypt", "salt": "not base64!", "n": 2**17, "r": 8, "p": 1}, "base64"),
    ({"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 131072.0, "r": 8, "p": 1}, "foreign scrypt"),
    ({"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 2**17, "r": 8, "p": True}, "foreign scrypt"),
])
def test_foreign_kdf_parameters_are_refused(kdf, message):
    with pytest.raises(MetadataError, match=message):
        keys.check_kdf(kdf, "img.png")


def test_secret_kind_must_match_the_header():
    from revanon_rt.errors import InputError

    with pytest.raises(InputError, match="--password-file"):
        keys.Secret.from_key(bytes(32)).for_header({"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}, "a.png")
    with pytest.raises(InputError, match="--key"):
        keys.Secret.from_password("pw").for_header({"name": "raw"}, "a.png")


@pytest.mark.parametrize("shape", [[1.9, True], [8.0, 8], ["8", 8], [8], [8, 8, 1]])
def test_a_stored_mask_shape_must_be_two_integers(shape):
    from revanon_rt.masks import pack_mask, unpack_mask

    entry = {**pack_mask(np.ones((8, 8), np.uint8)), "shape": shape}
    with pytest.raises(MetadataError, match="mask"):
        unpack_mask(entry, "img.png")
    assert unpack_mask(pack_mask(np.ones((8, 8), np.uint8)), "img.png").shape == (8, 8)


def test_secrets_stay_out_of_reprs():
    key = bytes(range(32))
    shown = repr(keys.Secret.from_key(key)) + repr(keys.Secret.from_password("hunter2 horse battery"))
    assert key.hex() not in shown and repr(key) not in shown and "hunter2" not in shown


def test_a_keygen_whose_write_fails_leaves_no_key_file(tmp_path):
    # a file size limit of 0 makes the key's write fail after the file was created
    script = (
        "import resource, signal, sys\n"
        "from revanon_rt.keys import keygen\n"
        "from revanon_rt.errors import UsageError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    keygen(sys.argv[1])\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    target = tmp_path / "k.key"
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "cannot write the key file" in done.stdout and "nothing was kept" in done.stdout
    assert not target.exists()


def test_readable_by_others(tmp_path):
    path = tmp_path / "k.key"
    keys.keygen(path)
    assert not keys.readable_by_others(path)
    path.chmod(0o640)
    assert keys.readable_by_others(path)


def test_fixed_nonces_and_salts_of_another_length_are_refused_before_anything_is_written():
    """A reader refuses any nonce or salt but 16 bytes (spec §5, §7): a library caller fixing one of another
    length would otherwise get an image that can never be recovered."""
    from revanon_rt.pipeline import Options, face_nonces

    with pytest.raises(UsageError, match="a fixed salt is 16 bytes"):
        keys.Secret.from_password("pw").for_anonymize(salt=b"12345678")
    for given in ([b"12345678"], [bytes(16)] * 2, [bytes(16), None]):
        with pytest.raises(UsageError, match="fixed nonce"):
            face_nonces(Options(), 1 if len(given) == 1 else 3, given)
    # a repeated nonce, or the zero one, is a reused pattern that the record would not show (only null does)
    for given in ([bytes([1]) * 16] * 2, [bytes(16), bytes([1]) * 16]):
        with pytest.raises(UsageError, match="must differ from each other and from the zero nonce"):
            face_nonces(Options(), 2, given)
    assert face_nonces(Options(), 2, [bytes([2]) * 16, bytes([1]) * 16])[1] == [bytes([2]) * 16, bytes([1]) * 16]
    assert face_nonces(Options(insecure_key_reuse=True), 2) == ([bytes(16)] * 2, [None, None])


def test_a_password_secret_keeps_its_own_salts_key_however_many_others_it_meets(monkeypatch):
    """A service's cache of derived keys is bounded, and strangers' salts fill it: the run's own salt must stay,
    or anonymizing would run scrypt again, on the model's turn."""
    monkeypatch.setattr(keys, "DERIVED_KEYS_KEPT", 2)
    secret = keys.Secret.from_password("pw")
    run_key, kdf = secret.for_anonymize()
    kdfs = [{"name": "scrypt", "salt": b64encode(bytes([i]) * 16), "n": 2**17, "r": 8, "p": 1} for i in (1, 2, 3)]
    assert [secret.for_header(k, "x") for k in kdfs] == [keys.scrypt_key("pw", bytes([i]) * 16) for i in (1, 2, 3)]
    assert secret.run_salt in secret._derived and len(secret._derived) == 2

    def no_more_scrypt(*args):
        raise AssertionError("scrypt ran again")

    monkeypatch.setattr(keys, "scrypt_key", no_more_scrypt)
    assert secret.for_anonymize() == (run_key, kdf)
