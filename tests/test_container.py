"""The PNG container and image handling (spec §2, §7): limits, metadata hygiene, atomic writes."""

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import random_image
from revanon_rt import container
from revanon_rt.encoding import b64encode
from revanon_rt.errors import InputError, MetadataError
from revanon_rt.images import encode_png, load_image, write_atomic
from revanon_rt.masks import pack_mask, unpack_mask


def _header(**changes):
    mask = pack_mask(np.ones((4, 4), np.uint8))
    header = container.new_header(steps=50, mode="crop", masker="file", fingerprint="ab" * 32, image_size=32,
                                  kdf={"name": "raw"},
                                  faces=[container.crop_face_record(32, bytes(16), mask)])
    header.update(changes)
    return header


def _png_with_text(tmp_path, text, name="m.png", chunks=1, compressed=False):
    info = PngImagePlugin.PngInfo()
    for _ in range(chunks):
        info.add_itxt("revanon", text, zip=compressed)
    path = tmp_path / name
    Image.fromarray(random_image(8)).save(path, pnginfo=info)
    return path


def _chunk_types(data: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        out.append(ctype)
        pos += 12 + length
    return out


def test_written_png_has_one_uncompressed_itxt_before_idat(tmp_path):
    header = _header()
    data = encode_png(random_image(8), None, None, {"revanon": container.to_text(header)})
    types = _chunk_types(data)
    assert types.count(b"iTXt") == 1 and types.index(b"iTXt") < types.index(b"IDAT")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert json.loads(container.read_png_chunk(path)) == header


def test_chunk_limits_and_shapes_are_enforced(tmp_path):
    good = container.to_text(_header())
    assert container.read_png_chunk(_png_with_text(tmp_path, good)) == good
    with pytest.raises(MetadataError, match="2 revanon chunks"):
        container.read_png_chunk(_png_with_text(tmp_path, good, chunks=2))
    with pytest.raises(MetadataError, match="compressed"):
        container.read_png_chunk(_png_with_text(tmp_path, good, compressed=True))
    # a chunk that claims more than 16 MiB is refused from its length field alone
    path = tmp_path / "big.png"
    sig_ihdr = encode_png(random_image(8), None, None, {})[:33]
    body = b"revanon\0" + b"\0\0\0\0"
    path.write_bytes(sig_ihdr + struct.pack(">I", container.MAX_CHUNK_BYTES + 1) + b"iTXt" + body)
    with pytest.raises(MetadataError, match="over the limit"):
        container.read_png_chunk(path)
    # text handed to the parser directly (the API's metadata=) has the same limit, before any JSON is parsed
    padded = good[:-1] + " " * (container.MAX_CHUNK_BYTES - len(good)) + "}"
    assert container.parse_header(padded, "api")["format"] == "revanon/1"
    with pytest.raises(MetadataError, match="api: .* over the limit"):
        container.parse_header(padded[:-1] + " }", "api")
    assert container.read_png_chunk(_png_with_text(tmp_path, good, name="x.png").with_suffix(".png")) == good
    jpeg = tmp_path / "a.jpg"
    Image.fromarray(random_image(8)).save(jpeg)
    assert container.read_png_chunk(jpeg) is None


@pytest.mark.parametrize("change, message", [
    ({"format": "revanon/2"}, "format"),
    ({"state": "encrypted"}, "state"),
    ({"steps": 1001}, "steps"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"mode": "video"}, "mode"),
    ({"masker": "magic"}, "masker"),
    ({"model": {"fingerprint": "xyz", "image_size": 32}}, "model"),
    ({"kdf": {"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 1024, "r": 8, "p": 1}}, "foreign scrypt"),
    ({"faces": [None] * 257}, "257 faces"),
    ({"faces": "all"}, "faces must be a list"),
])
def test_header_validation(change, message):
    with pytest.raises(MetadataError, match=message):
        container.parse_header(container.to_text(_header(**change)), "img.png")


def test_face_record_validation():
    header = _header()
    header["faces"][0]["mask"] = {"shape": [513, 1], "bits": b64encode(bytes(65))}
    with pytest.raises(MetadataError, match="over the limit of 512"):
        container.parse_header(container.to_text(header), "img.png")
    header["faces"][0]["mask"] = {"shape": [4, 4], "bits": b64encode(bytes(3))}
    with pytest.raises(MetadataError, match="needs 2"):
        container.parse_header(container.to_text(header), "img.png")
    header = _header()
    header["faces"][0]["nonce"] = b64encode(bytes(8))
    with pytest.raises(MetadataError, match="16 bytes"):
        container.parse_header(container.to_text(header), "img.png")
    with pytest.raises(MetadataError, match="not valid JSON"):
        container.parse_header("[" * 100000, "img.png")
    assert container.parse_header(container.to_text(_header(extra_key_from_the_future=1)), "x")["steps"] == 50


def test_auth_covers_pixels_and_every_metadata_byte():
    k_mac = bytes(range(32))
    rgb = random_image(8)
    header = _header()
    header["auth"] = container.compute_auth(k_mac, header, rgb)
    assert container.auth_matches(k_mac, header, rgb)
    edited = rgb.copy()
    edited[3, 4, 1] ^= 1
    assert not container.auth_matches(k_mac, header, edited)
    assert not container.auth_matches(bytes(32), header, rgb)
    moved = json.loads(json.dumps(header))
    moved["faces"][0]["box"][0] = 1
    assert not container.auth_matches(k_mac, moved, rgb)


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def test_load_applies_exif_orientation_and_handles_modes(tmp_path):
    rgb = random_image(16, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=100)
    loaded = load_image(path)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(loaded.rgb, np.rot90(decoded, k=-1))

    gray = tmp_path / "g.png"
    Image.fromarray(rgb[..., 0]).save(gray)
    assert load_image(gray).rgb.shape == (16, 16, 3)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk)
    assert load_image(cmyk).rgb.shape == (16, 16, 3) and load_image(cmyk).icc_profile is None
    rgba = tmp_path / "a.png"
    alpha = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.dstack([rgb, alpha])).save(rgba)
    assert np.array_equal(load_image(rgba).alpha, alpha)
    deep = tmp_path / "d.png"
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(deep)
    assert np.array_equal(load_image(deep).rgb[..., 0], rgb[..., 0])
    dark = tmp_path / "dark16.png"  # 16-bit values below 256 are black, not 8-bit values
    Image.fromarray(np.full((16, 16), 200, np.uint16)).save(dark)
    assert np.array_equal(load_image(dark).rgb, np.zeros((16, 16, 3), np.uint8))
    levels = np.arange(0, 65536, 257, dtype=np.uint16)[None].repeat(4, 0) + np.uint16(200)  # 4 x 256, off-grid
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(levels).save(grey16)
    rows = b"".join(b"\0" + np.repeat(levels[y], 3).astype(">u2").tobytes() for y in range(4))
    rgb16 = tmp_path / "rgb16.png"  # the same image as 16-bit RGB, which Pillow reduces to its high byte
    rgb16.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 256, 4, 16, 2, 0, 0, 0))
                      + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    assert np.array_equal(load_image(grey16).rgb, load_image(rgb16).rgb)


def test_colour_key_transparency_becomes_alpha_and_sixteen_bit_alpha_is_refused(tmp_path):
    rgb = random_image(16, seed=4)
    keyed = tmp_path / "keyed.png"
    Image.fromarray(rgb).save(keyed, transparency=tuple(int(v) for v in rgb[0, 0]))
    loaded = load_image(keyed)
    assert loaded.alpha is not None and loaded.alpha[0, 0] == 0 and np.array_equal(loaded.rgb, rgb)
    assert (loaded.alpha == 0).sum() == (rgb == rgb[0, 0]).all(axis=2).sum()
    grey_keyed = tmp_path / "grey_keyed.png"
    Image.fromarray(rgb[..., 1]).save(grey_keyed, transparency=int(rgb[3, 3, 1]))
    assert load_image(grey_keyed).alpha[3, 3] == 0

    rows = b"".join(b"\0" + np.full((4, 4), 40000, ">u2").tobytes() for _ in range(4))  # 4x4 RGBA, 16 bits
    deep_alpha = tmp_path / "deep_alpha.png"
    deep_alpha.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 6, 0, 0, 0))
                           + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    assert Image.open(deep_alpha).mode == "RGBA", "a valid 16-bit RGBA PNG, which Pillow reads as 8 bits"
    with pytest.raises(InputError, match="deep_alpha.png: its alpha channel has 16 bits"):
        load_image(deep_alpha)
    # a 16-bit colour key: Pillow compares it with the 8-bit pixels it makes, so it would mark the wrong ones
    rows = b"".join(b"\0" + np.full((4, 3), 0x1234, ">u2").tobytes() for _ in range(4))
    deep_key = tmp_path / "deep_key.png"
    deep_key.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
                         + _png_chunk(b"tRNS", struct.pack(">HHH", 0x1234, 0x1234, 0x1234))
                         + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    assert "transparency" in Image.open(deep_key).info
    with pytest.raises(InputError, match="deep_key.png: its transparency is a 16-bit colour key"):
        load_image(deep_key)


def test_bad_images_name_the_file(tmp_path):
    truncated = tmp_path / "t.png"
    full = encode_png(random_image(64), None, None, {})
    truncated.write_bytes(full[: len(full) // 2])
    garbage = tmp_path / "g.png"
    garbage.write_bytes(b"not an image at all")
    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    # a valid 100000 x 100000 PNG header with a tiny compressed body: 30 GB once decoded
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(bytes(1000))) + _png_chunk(b"IEND", b""))
    for path, message in [(truncated, "cannot read"), (garbage, "not an image format"), (bomb, "over the limit"),
                          (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(InputError, match=str(path.name)) as info:
            load_image(path)
        assert message in str(info.value)


def test_files_that_crash_pillow_or_hide_their_size_are_refused_by_name(tmp_path):
    """An ICO whose embedded PNG is larger than the 32 x 32 its header declares, named .png (Pillow decodes
    it while opening, before any size check), and two files whose malformed tags Pillow's plugins meet with
    struct.error and TypeError, which escaped as internal errors."""
    from revanon_rt.masks import face_map_from_file

    embedded = encode_png(np.zeros((96, 96, 3), np.uint8), None, None, {})
    ico = tmp_path / "icon.png"
    ico.write_bytes(struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 32, 32, 0, 0, 1, 32, len(embedded), 22)
                    + embedded)
    with pytest.warns(UserWarning, match="not the expected size"):
        assert Image.open(ico).format == "ICO", "Pillow reads it by content, decoding the 96 x 96 PNG inside"
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"
    bad_exif = tmp_path / "bad_exif.jpg"  # Make's tag number changed to T6Options, which must be a LONG
    Image.fromarray(random_image(32)).save(bad_exif, exif=exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x25\x00\x02"))
    buffer = io.BytesIO()
    Image.fromarray(random_image(32)).save(buffer, "TIFF")
    tiff = bytearray(buffer.getvalue())
    strip_offsets = tiff.find(struct.pack("<HHI", 273, 4, 1))
    tiff[strip_offsets + 2:strip_offsets + 4] = struct.pack("<H", 7)  # of type UNDEFINED
    bad_strip = tmp_path / "bad_strip.tif"
    bad_strip.write_bytes(bytes(tiff))
    for path, message in [(ico, "not an image format this tool reads"), (bad_exif, "cannot read the image"),
                          (bad_strip, "cannot read the image")]:
        with pytest.raises(InputError, match=path.name) as info:
            load_image(path, crop_size=32)
        assert message in str(info.value)
        with pytest.raises(InputError, match=path.name):
            face_map_from_file(path)


def test_outputs_keep_alpha_and_rgb_icc_and_drop_everything_else(tmp_path):
    rgb = random_image(8)
    alpha = np.full((8, 8), 77, np.uint8)
    icc = bytes(16) + b"RGB " + bytes(108)
    data = encode_png(rgb, alpha, icc, {"revanon": "{}"})
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGBA" and im.info.get("icc_profile") == icc
    assert set(im.text) == {"revanon"} and "exif" not in im.info
    types = _chunk_types(data)
    assert not {b"eXIf", b"tEXt", b"zTXt", b"tIME"} & set(types)


def test_write_atomic_never_clobbers(tmp_path):
    path = tmp_path / "out" / "a.png"
    assert write_atomic(path, b"one", overwrite=False)
    assert not write_atomic(path, b"two", overwrite=False)
    assert path.read_bytes() == b"one"
    assert write_atomic(path, b"three", overwrite=True)
    assert path.read_bytes() == b"three"
    assert [p.name for p in path.parent.iterdir()] == ["a.png"], "no temporary files left behind"


def test_file_masker_resizes_nearest_thresholds_at_128_and_follows_exif_orientation(tmp_path):
    from revanon_rt.masks import face_map_from_file

    values = np.random.default_rng(5).integers(0, 256, (7, 5)).astype(np.uint8)
    values[0, :3] = (127, 128, 129)
    path = tmp_path / "m.png"
    Image.fromarray(values).save(path)
    nearest = np.asarray(Image.fromarray(values).resize((512, 512), Image.Resampling.NEAREST))
    assert np.array_equal(face_map_from_file(path), (nearest >= 128).astype(np.uint8))

    stored = np.zeros((8, 4), np.uint8)
    stored[:, :2] = 255  # left half white as stored; rotated 90° clockwise on display, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.png"
    Image.fromarray(stored).save(rotated, exif=exif)
    face_map = face_map_from_file(rotated)
    assert face_map[:256].all() and not face_map[256:].any()


def test_metadata_that_python_parses_loosely_is_refused_cleanly():
    text = container.to_text(_header())
    repeated = '{"state":"recovered",' + text[1:]
    with pytest.raises(MetadataError, match="'state' appears more than once"):
        container.parse_header(repeated, "img.png")
    with pytest.raises(MetadataError, match="not valid JSON"):
        container.parse_header(text[:-1] + ',"n":1' + "0" * 5000 + "}", "img.png")
    with pytest.raises(MetadataError, match="not valid Unicode"):
        container.parse_header(text[:-1] + ',"n":"\\ud800"}', "img.png")
    header = _header()
    header["auth"] = "é" * 44
    assert not container.auth_matches(bytes(32), header, random_image(8))
    # JSON holds integers of any length; a coordinate that no float64 can hold is malformed, not a crash later
    header = _header()
    header["faces"][0]["affine"][0][0] = 10 ** 400
    with pytest.raises(MetadataError, match="malformed affine"):
        container.parse_header(container.to_text(header), "img.png")
    # a value from the file is quoted in the message, but never a 15 MB one whole
    for field in ("format", "state", "steps", "mode", "masker", "kdf"):
        with pytest.raises(MetadataError) as refused:
            container.parse_header(container.to_text(_header(**{field: "x" * 1_000_000})), "img.png")
        assert len(str(refused.value)) < 300 and "1000002 characters" in str(refused.value), field
    huge_scrypt = {"name": "scrypt", "salt": b64encode(bytes(16)), "n": "x" * 1_000_000, "r": 8, "p": 1}
    with pytest.raises(MetadataError, match="foreign scrypt parameters") as refused:
        container.parse_header(container.to_text(_header(kdf=huge_scrypt)), "img.png")
    assert len(str(refused.value)) < 300 and "1000025 characters" in str(refused.value)
    with pytest.raises(MetadataError) as refused:
        unpack_mask({"shape": ["A" * 100_000, 1], "bits": "AA=="}, "img.png")
    assert len(str(refused.value)) < 300
    # JSON's true is no image size, though Python counts a bool as an int
    with pytest.raises(MetadataError, match="malformed model record"):
        container.parse_header(container.to_text(_header(model={**_header()["model"], "image_size": True})),
                               "img.png")
    # planning a run reads one field; metadata that is JSON but no object has none
    for text in ("[]", '"photo"', "null", "{not json"):
        assert container.recorded(text, "mode") is None, text


def test_a_sidecar_must_be_a_regular_file_within_the_limit(tmp_path):
    fifo = tmp_path / "img.png.revanon.json"
    os.mkfifo(fifo)  # opening a FIFO for reading would block until a writer came
    with pytest.raises(MetadataError, match="not a regular file"):
        container.read_sidecar(fifo)
    with pytest.raises(MetadataError, match="not a regular file"):
        container.read_sidecar(Path("/dev/zero"))
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (container.MAX_CHUNK_BYTES + 1))
    with pytest.raises(MetadataError, match="over the metadata limit"):
        container.read_sidecar(big)


def test_a_crop_of_the_wrong_size_is_refused_from_its_header(tmp_path):
    full = tmp_path / "full.png"
    Image.new("RGB", (4096, 4096)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:200])  # pixel data that cannot be decoded
    with pytest.raises(InputError, match="4096x4096 is not an aligned face crop"):
        load_image(cut, crop_size=32)
    with pytest.raises(InputError, match="cannot read the image"):
        load_image(cut)


def test_values_exactly_at_the_spec_limits_are_accepted():
    """§7's limits are inclusive: 1000 steps, 256 faces, a 512-cell mask side."""
    face = container.crop_face_record(32, bytes(16), pack_mask(np.ones((512, 3), np.uint8)))
    header = container.parse_header(container.to_text(_header(steps=1000, faces=[face] * 256)), "img.png")
    assert header["steps"] == 1000 and len(header["faces"]) == 256
    assert unpack_mask(header["faces"][0]["mask"], "img.png").shape == (512, 3)


def test_a_file_mask_in_sixteen_bits_or_with_transparency_means_what_it_shows():
    """White = face (spec §4): a 16-bit mask by its high byte, as 16-bit inputs are read, and what is
    transparent is never face, whatever colour it hides."""
    from revanon_rt.masks import face_map_from_file

    levels = np.repeat(np.array([[0, 200, 30000, 33000, 65535]], np.uint16), 5, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    face_map = face_map_from_file(io.BytesIO(buffer.getvalue()), "mask16.png")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode in ("I;16", "I")  # "I" before Pillow 10.1
    assert face_map[256, [0, 110, 210, 320, 500]].tolist() == [0, 0, 0, 1, 1]
    drawn_in_alpha = np.full((4, 4, 4), 255, np.uint8)
    drawn_in_alpha[2:, :, 3] = 0  # white everywhere; the face is where it is opaque
    buffer = io.BytesIO()
    Image.fromarray(drawn_in_alpha).save(buffer, format="PNG")
    face_map = face_map_from_file(io.BytesIO(buffer.getvalue()), "alpha.png")
    assert face_map[:256].all() and not face_map[256:].any()
