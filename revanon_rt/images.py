"""Reading images the way users have them, and writing PNGs that keep nothing but pixels.

Outputs keep the alpha channel and an RGB ICC profile; EXIF, GPS, XMP and text chunks
are dropped so that an anonymized image does not leak where or when it was taken.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import InputError, RevanonError, UsageError

# A decoded 16k x 16k RGBA image is 1 GiB; anything larger is treated as a decompression bomb. Pillow's own
# guard (a warning over PIL.Image.MAX_IMAGE_PIXELS, an error over twice that) is process-wide: the command
# line raises it to this limit (use_pixel_limit), while a program importing the library keeps its own.
MAX_IMAGE_PIXELS = 16384 * 16384


def use_pixel_limit() -> None:
    """Let Pillow open what MAX_IMAGE_PIXELS allows, in a process that is this tool's alone."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def pixel_limit() -> int:
    """The most pixels an image may have here: this tool's limit, or Pillow's if a host set it lower."""
    pillow = Image.MAX_IMAGE_PIXELS
    return MAX_IMAGE_PIXELS if pillow is None else min(MAX_IMAGE_PIXELS, 2 * pillow)


# The file names searched for as images and masks, in the order a mask is looked for, and the Pillow
# formats they are opened as. Pillow otherwise picks a format by content whatever the name, and some (ICO's
# embedded PNG) decode while opening, before the size checks below have seen the real size.
EXTENSION_FORMATS = {".png": "PNG", ".apng": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
                     ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
                     ".mpo": "JPEG",  # JPEG opens MPO (multi-picture) files too
                     ".gif": "GIF", ".avif": "AVIF"}
READ_FORMATS = tuple(dict.fromkeys(EXTENSION_FORMATS.values()))


def read_formats() -> tuple[str, ...]:
    """READ_FORMATS less those this Pillow lacks (AVIF came in Pillow 11.2)."""
    Image.init()
    return tuple(f for f in READ_FORMATS if f in Image.OPEN)


@dataclass
class LoadedImage:
    path: Path
    rgb: np.ndarray  # H x W x 3 uint8
    alpha: np.ndarray | None  # H x W uint8
    icc_profile: bytes | None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def _icc_is_rgb(icc: bytes | None) -> bool:
    # Bytes 16..20 of an ICC header name the data colour space; a PNG with RGB pixels
    # may only carry an RGB profile.
    return bool(icc) and len(icc) >= 20 and icc[16:20] == b"RGB "


SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def sixteen_bit_to_u8(a: np.ndarray) -> np.ndarray:
    # the high byte, as Pillow reads 16-bit RGB: one image stored as 16-bit grey or RGB reads the same
    return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES_WITH_ALPHA = (4, 6)  # grey + alpha, RGB + alpha


def _image_count(im: Image.Image) -> int:
    """The images a file holds beyond previews: frames, or TIFF pages that are not reduced-resolution
    copies (NewSubfileType bit 0). Damage after the first image counts as none, since that image reads."""
    try:
        count = getattr(im, "n_frames", 1)
        if im.format == "TIFF" and count > 1:
            full = 0
            for page in range(count):
                im.seek(page)
                full += not im.tag_v2.get(254, 0) & 1
            count = full
    except Exception:
        count = 1
    try:
        im.seek(0)
    except EOFError:
        pass
    return count


def _sixteen_bit_png(head: bytes) -> bool:
    return len(head) == 26 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16


def _refuse_sixteen_bit_alpha(head: bytes, name) -> None:
    """Pillow reads a 16-bit alpha channel as 8 bits, and outputs are 8-bit PNGs: carrying it through
    untouched (spec §2) is impossible, so such an input is refused rather than silently changed.
    `head` is the file's first 26 bytes."""
    if _sixteen_bit_png(head) and head[25] in PNG_COLOUR_TYPES_WITH_ALPHA:
        raise InputError(f"{name}: its alpha channel has 16 bits, and revanon writes 8-bit PNGs, so the alpha "
                         "could not be kept as it is; convert the image to 8 bits per channel first")


# a zip of face crops (training data, LFW splits): a crop is a few hundred pixels a side
MAX_ZIP_MEMBER_BYTES = 32 * 2**20
MAX_ZIP_IMAGE_PIXELS = 4096 * 4096


def image_members(archive) -> list[str]:
    """The zip's .jpg, .jpeg and .png members, sorted; not the __MACOSX/._name resource forks a Mac adds."""
    return sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png"))
                  and not n.startswith("__MACOSX/") and not n.rsplit("/", 1)[-1].startswith("._"))


def zip_image_rgb(archive, name: str, zip_path) -> Image.Image:
    """One image of a zip of face crops (a command's data, so its errors are usage errors), as RGB. The
    member's declared size and the image's pixel count are checked before either is expanded, so a small
    crafted zip cannot cost GBs."""
    import zipfile

    try:
        declared = archive.getinfo(name).file_size
        if declared > MAX_ZIP_MEMBER_BYTES:
            raise UsageError(f"{zip_path}: {name} would expand to {declared} bytes, over the {MAX_ZIP_MEMBER_BYTES} "
                             "a face crop needs")
        im = Image.open(io.BytesIO(archive.read(name)))
        if im.size[0] * im.size[1] > MAX_ZIP_IMAGE_PIXELS:
            raise UsageError(f"{zip_path}: {name} is {im.size[0]}x{im.size[1]} pixels, over the "
                             f"{MAX_ZIP_IMAGE_PIXELS} a face crop needs")
        return im.convert("RGB")
    except (OSError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as exc:
        # PIL's UnidentifiedImageError is an OSError
        raise UsageError(f"{zip_path}: {name} is not a readable image ({exc}); remove it from the zip") from None


def not_a_crop(path: Path, width: int, height: int, image_size: int, recovering: bool = False) -> InputError:
    if recovering:  # its record is a crop's of the model's size, so the pixels were resized or cropped since
        return InputError(f"{path}: {width}x{height}, but its record is of a {image_size}x{image_size} crop: the "
                          "image was resized or cropped after anonymization, which cannot be recovered; use the "
                          "file the tool wrote")
    return InputError(f"{path}: {width}x{height} is not an aligned face crop of the model's {image_size}x{image_size}; "
                      "resize or crop it, or use --mode photo (anonymize_photo in Python) for photos")


def open_regular(path: Path):
    """A binary file object for reading, or OSError when the path is not a regular file. It is opened
    without blocking and checked on the open handle, so a FIFO or a device named like an image is refused
    instead of hanging the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def load_image(path: Path, crop_size: int | None = None, recovering: bool = False) -> LoadedImage:
    """Decode an image file to RGB uint8 (+ alpha), applying EXIF orientation. Errors name the file.
    With crop_size, an image of another size is refused from its header, before it is decoded."""
    path = Path(path)
    try:
        with open_regular(path) as fh:
            return decode_image(fh, path, crop_size, recovering)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from None


def decode_image(fh: BinaryIO, name: Path, crop_size: int | None = None, recovering: bool = False) -> LoadedImage:
    """load_image on an open binary file (or io.BytesIO); `name` is what errors and the result call it."""
    try:
        head = fh.read(26)
        if not head:
            raise InputError(f"{name}: the file is empty (0 bytes); an interrupted copy or download?")
        _refuse_sixteen_bit_alpha(head, name)
        fh.seek(0)
        with Image.open(fh, formats=read_formats()) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{name}: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                    "(a decompression bomb, or a photo far larger than needed)"
                )
            if crop_size is not None and (width, height) != (crop_size, crop_size):
                raise not_a_crop(name, width, height, crop_size, recovering)
            frames = _image_count(im)
            if frames > 1 and im.format != "MPO":  # a phone's MPO: the photo, then a depth map or preview
                unit = "pages" if im.format == "TIFF" else "frames"
                raise InputError(f"{name}: has {frames} {unit}, and the output would keep only the first; "
                                 f"save each of the {unit} as an image of its own first")
            if _sixteen_bit_png(head) and "transparency" in im.info:
                raise InputError(f"{name}: its transparency is a 16-bit colour key, which 8-bit pixels cannot "
                                 "match exactly, so the alpha would come out wrong; convert the image to 8 bits "
                                 "per channel first")
            icc = im.info.get("icc_profile")
            # read now, for exif_transpose: Pillow before 10.1 closes a multi-page TIFF's file at load()
            im.getexif()
            im.load()
            if im.size != (width, height):
                raise InputError(f"{name}: its header says {width}x{height} pixels and it decodes to "
                                 f"{im.size[0]}x{im.size[1]}; not a well-formed image")
            im = ImageOps.exif_transpose(im)
            rgb, alpha = _split_channels(im)
    except (RevanonError, MemoryError):  # MemoryError: the machine's, not the file's
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image format this tool reads") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: its pixel count is over the limit of {pixel_limit()} "
                         "(a decompression bomb, or a photo far larger than needed)") from None
    except (OSError, ValueError, SyntaxError, zlib.error) as exc:
        raise InputError(f"{name}: cannot read the image ({exc})") from None
    except Exception as exc:  # Pillow's plugins pass on what their parsers meet in a malformed file
        raise InputError(f"{name}: cannot read the image ({type(exc).__name__}: {exc})") from None
    return LoadedImage(Path(name), rgb, alpha, icc if _icc_is_rgb(icc) else None)


def _split_channels(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode in SIXTEEN_BIT_GREY_MODES:
        gray = sixteen_bit_to_u8(np.asarray(im))
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)), None
    if mode in ("P", "RGB", "L") and "transparency" in im.info:
        # a colour key (tRNS) would not survive new pixel values: carry it as an explicit alpha channel
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = np.asarray(im.getchannel("A"), dtype=np.uint8).copy()
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        return rgb, alpha
    # an RGB image as it is: a converted copy would add 4 bytes a pixel to a large photo's peak
    return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8), None


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None, icc: bytes | None, itxt: dict[str, str]) -> bytes:
    """PNG bytes holding only the pixels, the ICC profile and the given uncompressed iTXt chunks."""
    if alpha is not None:
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    else:
        im = Image.fromarray(rgb, "RGB")
    info = PngImagePlugin.PngInfo()
    for keyword, text in itxt.items():
        info.add_itxt(keyword, text, zip=False)
    buf = io.BytesIO()
    kwargs = {"pnginfo": info}
    if icc:
        kwargs["icc_profile"] = icc
    im.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes, overwrite: bool, mode: int = 0o644) -> bool:
    """Write via a temporary file and a rename. Returns False (and writes nothing) when the
    file exists and overwrite is off, including when another process wins the race.
    mode is narrowed by the process's umask, as open() would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        return False
    # a short name of its own: the output's name plus a prefix could pass the file system's limit
    fd, tmp = tempfile.mkstemp(prefix=".revanon-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile: never clobber
            except FileExistsError:
                return False
            except OSError:
                if path.exists():
                    return False
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any thread writes files
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
