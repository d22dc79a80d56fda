"""Keys, subkeys, nonces and the flip pattern of spec §5."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import struct
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoding import b64decode, b64encode
from .errors import InputError, MetadataError, UsageError, quoted

KEY_BYTES = 32
NONCE_BYTES = 16
SALT_BYTES = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_MAXMEM = 256 * 1024 * 1024
MAX_PASSWORD_FILE_BYTES = 64 * 1024
ZERO_NONCE = bytes(NONCE_BYTES)


def _without_final_newline(text: bytes) -> bytes:
    """Exactly one trailing \\n or \\r\\n removed, as editors and `echo` leave it: any other whitespace is content."""
    if text.endswith(b"\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(b"\n") else text


def parse_key_text(text: bytes, source: str) -> bytes:
    """64 hex characters, optionally followed by one newline."""
    body = _without_final_newline(text)
    if len(body) != 2 * KEY_BYTES:
        raise UsageError(
            f"{source}: a key file holds exactly {2 * KEY_BYTES} hexadecimal characters "
            f"(and at most one newline), this one has {len(text) if len(text) <= 4 * KEY_BYTES else 'more'} "
            "bytes; make one with `revanon-rt keygen`"
        )
    # bytes.fromhex alone would skip spaces and give a short key
    if re.fullmatch(rb"[0-9a-fA-F]+", body) is None:
        raise UsageError(f"{source}: a key file holds only the hexadecimal characters 0-9, a-f, then at most one newline")
    return bytes.fromhex(body.decode("ascii"))


def read_key_file(path: Path) -> bytes:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            text = fh.read(4 * KEY_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the key file ({exc.strerror or exc})") from None
    return parse_key_text(text, str(path))


def readable_by_others(path: Path) -> bool:
    """True when a key or password file grants any access to its group or to other users."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    # a folder or a device given by mistake gets the read error, not advice to chmod it
    return stat.S_ISREG(mode) and bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def exposure_warning(path: Path) -> str | None:
    """What to tell the user of a key or password file that other users can read; None when it is private."""
    return f"{path} can be read by other users; chmod 600 {path}" if readable_by_others(path) else None


def keygen(path: Path) -> None:
    """Create a new key file with O_EXCL and mode 0600; never overwrite."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        raise UsageError(f"{path}: already exists; keygen never overwrites a key") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the key file ({exc.strerror or exc})") from None
    text = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode("ascii")
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        if os.write(fd, text) != len(text):
            raise OSError("short write")
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)  # an empty or short key file would only fail later, or be backed up by mistake
        raise UsageError(f"{path}: cannot write the key file ({exc.strerror or exc}); nothing was kept") from None
    os.close(fd)
    _sync_folder(path.parent)  # else a power loss can take the new file's name, after images were made with it


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(fd)


def normalize_password(password: str) -> bytes:
    return unicodedata.normalize("NFC", password).encode("utf-8")


def read_password_file(path: Path) -> str:
    """The file's UTF-8 text, less exactly one trailing newline (\\n or \\r\\n)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:  # not only regular files: --password-file <(pass show x) is a pipe
            raw = fh.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the password file ({exc.strerror or exc})") from None
    if len(raw) > MAX_PASSWORD_FILE_BYTES:
        raise UsageError(f"{path}: over {MAX_PASSWORD_FILE_BYTES} bytes, which is no password file")
    try:
        password = _without_final_newline(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the password file is not UTF-8 text") from None
    if not password:
        raise UsageError(f"{path}: the password is empty")
    return password


def scrypt_key(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        normalize_password(password), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM, dklen=KEY_BYTES,
    )


def _shake(*parts: bytes, length: int) -> bytes:
    h = hashlib.shake_256()
    for part in parts:
        h.update(part)
    return h.digest(length)


def flip_subkey(key: bytes) -> bytes:
    return _shake(b"revanon-rt/v1/key/flip", key, length=32)


def mac_subkey(key: bytes) -> bytes:
    return _shake(b"revanon-rt/v1/key/mac", key, length=32)


def flip_stream(k_flip: bytes, nonce: bytes, shape: tuple[int, int, int], nbytes: int) -> bytes:
    c, h, w = shape
    return _shake(b"revanon-rt/v1/flip", k_flip, nonce, struct.pack(">III", c, h, w), length=nbytes)


def flip_pattern(k_flip: bytes, nonce: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """r in {+1, -1}^(C x h x w), float32: bit i of the stream (LSB first) set means +1."""
    d = int(np.prod(shape))
    stream = np.frombuffer(flip_stream(k_flip, nonce, shape, (d + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(stream, bitorder="little")[:d]
    return np.where(bits == 1, np.float32(1.0), np.float32(-1.0)).astype(np.float32).reshape(shape)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


# Derived keys kept per salt: a run's own salt and the salts of the files it recovers.
DERIVED_KEYS_KEPT = 256
# scrypt runs at once in a process, each with 128 MiB: a service's threads recovering strangers' images with
# fresh salts would otherwise take 128 MiB apiece
SCRYPT_AT_ONCE = max(1, min(4, os.cpu_count() or 1))
_scrypt_slots = threading.BoundedSemaphore(SCRYPT_AT_ONCE)


@dataclass
class Secret:
    """What the user gave: a raw key, or a password (stretched with scrypt per salt)."""

    raw_key: bytes | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    run_salt: bytes | None = None
    _derived: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    _derived_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _stretching: dict[bytes, threading.Lock] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_key(cls, key: bytes) -> "Secret":
        return cls(raw_key=key)

    @classmethod
    def from_password(cls, password: str) -> "Secret":
        return cls(password=password)

    def for_anonymize(self, salt: bytes | None = None) -> tuple[bytes, dict]:
        """The key K and the header's `kdf` field. Without an explicit salt, one random salt
        is drawn on first use and serves the whole run, so scrypt runs once."""
        if self.raw_key is not None:
            return self.raw_key, {"name": "raw"}
        if salt is None:
            with self._derived_lock:  # threads sharing this secret share its one salt
                if self.run_salt is None:
                    self.run_salt = secrets.token_bytes(SALT_BYTES)
            salt = self.run_salt
        elif not isinstance(salt, bytes) or len(salt) != SALT_BYTES:  # a reader refuses any other: unrecoverable
            raise UsageError(f"a fixed salt is {SALT_BYTES} bytes, not {quoted(salt)}")
        kdf = {"name": "scrypt", "salt": b64encode(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        return self._scrypt(salt), kdf

    def for_header(self, kdf: dict, source: str) -> bytes:
        """The key K for an image whose (already validated) header names this kdf."""
        if kdf["name"] == "raw":
            if self.raw_key is None:
                raise InputError(f"{source}: this image was made with a key file; give --key")
            return self.raw_key
        if self.password is None:
            raise InputError(f"{source}: this image was made with a password; give --password-file")
        return self._scrypt(b64decode(kdf["salt"]))

    def _scrypt(self, salt: bytes) -> bytes:
        with self._derived_lock:
            key = self._derived.get(salt)
            if key is not None:
                return key
            stretching = self._stretching.setdefault(salt, threading.Lock())
        # one thread stretches a salt; the others with that salt (a user's images recovered side by side)
        # wait for its key, while threads with other salts stretch theirs
        with stretching:
            with self._derived_lock:
                key = self._derived.get(salt)
            if key is None:
                with _scrypt_slots:
                    key = scrypt_key(self.password, salt)
                with self._derived_lock:
                    if salt not in self._derived and len(self._derived) >= DERIVED_KEYS_KEPT:
                        # a long-lived service meets a new salt per file; its own salt's key stays
                        del self._derived[next(s for s in self._derived if s != self.run_salt)]
                    self._derived[salt] = key
        with self._derived_lock:
            if self._stretching.get(salt) is stretching:
                del self._stretching[salt]
        return key


def check_kdf(kdf: object, source: str) -> dict:
    """Only the exact v1 parameters are accepted: the metadata is attacker-controlled."""
    if not isinstance(kdf, dict) or kdf.get("name") not in ("raw", "scrypt"):
        raise MetadataError(f"{source}: unknown key derivation {quoted(kdf)}; v1 knows raw and scrypt")
    if kdf["name"] == "scrypt":
        params = {k: kdf.get(k) for k in ("n", "r", "p")}
        # type() and not ==: 131072.0 or true must not pass for 131072 or 1
        if any(type(v) is not int for v in params.values()) or params != {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}:
            raise MetadataError(
                f"{source}: foreign scrypt parameters {quoted(params, 120)}; v1 accepts only n=2^17, r=8, p=1"
            )
        try:
            salt = b64decode(kdf.get("salt"))
        except ValueError:
            raise MetadataError(f"{source}: the scrypt salt is not base64") from None
        if len(salt) != SALT_BYTES:
            raise MetadataError(f"{source}: the scrypt salt must be {SALT_BYTES} bytes, not {len(salt)}")
    return kdf
