"""Safe photo reading/writing (lowkey_jax.imageio): every file is generated in tmp_path."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from lowkey_jax import imageio
from lowkey_jax.imageio import (
    ImageError,
    is_cloaked_output,
    output_path,
    read_image,
    resolve_format,
    write_image,
)

# --------------------------------------------------------------------------------------------
# helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth test picture with a distinct block in the top-left corner (uint8 [h, w, 3])."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (h + w - 2)], -1)
    rgb = rgb.astype(np.uint8)
    rgb[: h // 4, : w // 4] = (255, 0, 0)
    return rgb


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw_rows))
        + png_chunk(b"IEND", b"")
    )


def exif_with_gps(orientation: int = 1) -> Image.Exif:
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = orientation
    ex[ExifTags.Base.Make] = "TestCam"
    gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 21.0, 3.0)
    ex.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2021:05:01 12:00:00"
    return ex


def add_thumbnail_ifd1(exif_bytes: bytes, thumb_jpeg: bytes) -> bytes:
    """Append an IFD1 (JPEG thumbnail) to an EXIF block made by Pillow (either byte order)."""
    assert exif_bytes[:6] == b"Exif\x00\x00"
    tiff = bytearray(exif_bytes[6:])
    e = "<" if tiff[:2] == b"II" else ">"
    (ifd0,) = struct.unpack_from(e + "I", tiff, 4)
    (n,) = struct.unpack_from(e + "H", tiff, ifd0)
    next_ptr = ifd0 + 2 + 12 * n
    assert struct.unpack_from(e + "I", tiff, next_ptr) == (0,)
    if len(tiff) % 2:
        tiff += b"\x00"
    ifd1 = len(tiff)
    thumb_at = ifd1 + 2 + 2 * 12 + 4
    struct.pack_into(e + "I", tiff, next_ptr, ifd1)
    tiff += struct.pack(e + "H", 2)
    tiff += struct.pack(e + "HHII", 0x0201, 4, 1, thumb_at)  # JPEGInterchangeFormat
    tiff += struct.pack(e + "HHII", 0x0202, 4, 1, len(thumb_jpeg))  # ...Length
    tiff += struct.pack(e + "I", 0)
    tiff += thumb_jpeg
    return b"Exif\x00\x00" + bytes(tiff)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# reading: modes


def test_rgb_png_exact(tmp_path):
    rgb = photo()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.rgb.dtype == np.uint8 and img.rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(img.rgb, rgb)
    assert img.alpha is None and img.format == "PNG" and img.size == (64, 48)
    assert img.source == tmp_path / "a.png" and img.exif is None and img.icc_profile is None


def test_content_not_extension(tmp_path):
    rgb = photo()
    Image.fromarray(rgb).save(tmp_path / "really_png.jpg", format="PNG")
    img = read_image(tmp_path / "really_png.jpg")
    assert img.format == "PNG"
    np.testing.assert_array_equal(img.rgb, rgb)
    assert output_path(tmp_path / "really_png.jpg").name == "really_png_cloaked.png"


def test_shared_webp_named_jpg(shared):
    img = read_image(shared / "faces" / "celebs" / "img47.jpg")
    assert img.format == "WEBP"
    assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[-1] == 3


def test_grayscale_L_and_1(tmp_path):
    g = photo()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.mode == "L" and img.rgb.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(img.rgb[..., c], g)
    Image.fromarray(g > 127).save(tmp_path / "b.png")
    b = read_image(tmp_path / "b.png")
    assert b.mode == "1"
    np.testing.assert_array_equal(b.rgb[..., 1], np.where(g > 127, 255, 0).astype(np.uint8))


def test_grayscale_16bit(tmp_path):
    g16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    g16[0, :4] = (0, 257, 65535, 128)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.mode.startswith("I"), img.mode
    expected = np.round(g16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(img.rgb[..., 0], expected)
    np.testing.assert_array_equal(img.rgb[0, :3, 2], [0, 1, 255])
    assert int(img.rgb.max()) == 255  # scaled, not clipped at 255 for every value above 255
    assert len(np.unique(img.rgb)) > 100


def test_rgb_16bit_png(tmp_path):
    h, w = 40, 36
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(h, w, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(w, h, 16, 2, rows))
    img = read_image(tmp_path / "rgb16.png")
    assert img.rgb.shape == (h, w, 3) and img.rgb.dtype == np.uint8
    np.testing.assert_array_equal(img.rgb, (rgb16 >> 8).astype(np.uint8))


def test_rgba_and_la_keep_alpha(tmp_path):
    rgb = photo()
    a = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(np.dstack([rgb, a]), "RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(img.rgb, rgb)
    np.testing.assert_array_equal(img.alpha, a)
    Image.fromarray(np.dstack([rgb[..., 1], a]), "LA").save(tmp_path / "la.png")
    la = read_image(tmp_path / "la.png")
    assert la.mode == "LA"
    np.testing.assert_array_equal(la.rgb[..., 2], rgb[..., 1])
    np.testing.assert_array_equal(la.alpha, a)


def test_palette_with_and_without_transparency(tmp_path):
    idx = (np.arange(48 * 64).reshape(48, 64) % 4).astype(np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    p = Image.fromarray(idx, "P")
    p.putpalette(pal + [0] * (768 - len(pal)))
    p.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    assert img.mode == "P" and img.alpha is None
    np.testing.assert_array_equal(img.rgb[0, :4], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]])
    p.save(tmp_path / "pt.png", transparency=2)
    t = read_image(tmp_path / "pt.png")
    assert t.alpha is not None
    np.testing.assert_array_equal(t.alpha, np.where(idx == 2, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(t.rgb[0, 0], [255, 0, 0])
    p.save(tmp_path / "pt.gif", transparency=1)
    gif = read_image(tmp_path / "pt.gif")
    assert gif.format == "GIF"
    np.testing.assert_array_equal(gif.alpha, np.where(idx == 1, 0, 255).astype(np.uint8))


def test_cmyk_jpeg_plain_conversion(tmp_path):
    cmyk = np.zeros((40, 40, 4), np.uint8)
    cmyk[:20, :20] = (255, 0, 0, 0)  # cyan
    cmyk[:20, 20:] = (0, 255, 0, 0)  # magenta
    cmyk[20:, :20] = (0, 0, 0, 128)  # mid grey
    cmyk[20:, 20:] = (0, 0, 255, 0)  # yellow
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.mode == "CMYK" and img.format == "JPEG" and img.icc_profile is None
    want = {(5, 5): (0, 255, 255), (5, 35): (255, 0, 255), (35, 5): (127, 127, 127), (35, 35): (255, 255, 0)}
    for (y, x), rgb in want.items():
        got = img.rgb[y, x].astype(np.int32)
        assert np.abs(got - np.array(rgb)).max() <= 6, (y, x, got, rgb)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (30, 200, 120)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    img = read_image(tmp_path / "anim.gif")
    assert img.frames == 3 and any("first" in n for n in img.notes)
    assert abs(int(img.rgb[20, 20, 0]) - 30) <= 2


# --------------------------------------------------------------------------------------------
# reading: orientation, ICC


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6_rotates(tmp_path, fmt):
    rgb = photo(40, 64)
    name = tmp_path / f"o6.{fmt.lower()}"
    kw = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(rgb).save(name, format=fmt, exif=exif_with_gps(orientation=6), **kw)
    img = read_image(name)
    want = np.rot90(rgb, k=-1)  # orientation 6: rotate 90 degrees clockwise to display
    assert img.rgb.shape == want.shape == (64, 40, 3)
    err = np.abs(img.rgb.astype(np.int32) - want.astype(np.int32))
    if fmt == "PNG":
        assert err.max() == 0
    else:
        assert err.mean() < 3.0, err.mean()
    assert img.rgb[5, -5, 0] > 200 and img.rgb[5, -5, 1] < 60  # red block is top-right now
    ex = Image.Exif()
    ex.load(img.exif)
    assert ex.get(ExifTags.Base.Orientation, 1) == 1


def test_icc_rgb_kept_gray_dropped(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photo()).save(tmp_path / "icc.jpg", icc_profile=srgb)
    img = read_image(tmp_path / "icc.jpg")
    assert img.icc_profile == srgb
    fake_gray = bytes(16) + b"GRAY" + bytes(108)
    Image.fromarray(photo()[..., 0], "L").save(tmp_path / "gicc.png", icc_profile=fake_gray)
    g = read_image(tmp_path / "gicc.png")
    assert g.icc_profile is None and any("ICC" in n for n in g.notes)


# --------------------------------------------------------------------------------------------
# reading: bad files


def assert_one_line_naming(err: ImageError, path: Path, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg.lower(), msg


def test_zero_byte(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "empty.jpg")
    assert_one_line_naming(e.value, tmp_path / "empty.jpg", "empty", "0 bytes")


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "nope.png")
    assert_one_line_naming(e.value, tmp_path / "nope.png", "no such file")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "dir.jpg")
    assert_one_line_naming(e.value, tmp_path / "dir.jpg", "folder")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a photo\n" * 20)
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "notes.jpg")
    assert_one_line_naming(e.value, tmp_path / "notes.jpg", "not an image")


def test_postscript_refused_and_heic_named(tmp_path):
    # Pillow would hand EPS to Ghostscript: read_image must refuse it without running anything.
    eps = tmp_path / "doc.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n")
    with pytest.raises(ImageError) as e:
        read_image(eps)
    assert_one_line_naming(e.value, eps, "not an image")
    # A HEIC header with garbage after it: refused with a one-line error naming the file.
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 64)
    with pytest.raises(ImageError) as e:
        read_image(heic)
    assert_one_line_naming(e.value, heic)
    # Without pillow-heif, a HEIC photo gets a message with the fix.
    err = imageio._not_an_image(heic)
    assert_one_line_naming(err, heic, "heic", "pip install pillow-heif")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        read_image(p)
    assert_one_line_naming(e.value, p)
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def test_permission_denied(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: file permissions are not enforced")
    p = tmp_path / "locked.png"
    Image.fromarray(photo()).save(p)
    p.chmod(0)
    try:
        with pytest.raises(ImageError) as e:
            read_image(p)
        assert_one_line_naming(e.value, p, "permission")
    finally:
        p.chmod(0o644)


@pytest.mark.parametrize("w, h", [(20000, 20000), (15000, 10000)])  # > 2x limit, > 1x limit
def test_decompression_bomb_header(tmp_path, w, h):
    # A PNG header claiming w x h pixels with almost no data: refused before decoding.
    p = tmp_path / "bomb.png"
    p.write_bytes(png_bytes(w, h, 8, 2, b"\x00" * 16))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as e:
        read_image(p)  # default limit: 100 megapixels
    assert_one_line_naming(e.value, p, "decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_configurable_and_restored(tmp_path):
    p = tmp_path / "small.png"
    Image.fromarray(photo(64, 64)).save(p)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as e:
        read_image(p, max_pixels=3000)  # 4096 px: over the limit, under twice the limit
    assert_one_line_naming(e.value, p, "decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == before
    assert read_image(p, max_pixels=4096).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == before


def test_too_small(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(photo(20, 200)).save(p)
    with pytest.raises(ImageError) as e:
        read_image(p)
    assert_one_line_naming(e.value, p, "too small", "200x20")
    assert read_image(p, min_side=16).size == (200, 20)


# --------------------------------------------------------------------------------------------
# writing


def test_write_png_exact_and_sizes(tmp_path):
    rgb = photo(37, 53)
    res = write_image(tmp_path / "o.png", rgb)
    assert res.path == tmp_path / "o.png" and res.format == "PNG" and res.notes == ()
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (53, 37) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    write_image(tmp_path / "o.jpg", rgb, format="jpg")
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.format == "JPEG" and im.size == (53, 37)
    write_image(tmp_path / "o.webp", rgb, format="same", source_format="WEBP")
    with Image.open(tmp_path / "o.webp") as im:
        assert im.format == "WEBP" and im.size == (53, 37)
    assert listing(tmp_path) == ["o.jpg", "o.png", "o.webp"]


def test_gps_exif_xmp_stripped_by_default(tmp_path):
    src = tmp_path / "gps.jpg"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    Image.fromarray(photo()).save(src, exif=exif_with_gps(), xmp=xmp, quality=95)
    with Image.open(src) as im:  # the input really carries GPS and XMP
        assert im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        assert "xmp" in im.info
    img = read_image(src)
    assert img.exif is not None
    for fmt in ("jpg", "png", "webp"):
        out = write_image(tmp_path / f"out.{fmt}", img.rgb, format=fmt, exif=img.exif, icc_profile=img.icc_profile)
        with Image.open(out.path) as im:
            assert len(im.getexif()) == 0, fmt
            assert not im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
            assert "exif" not in im.info and "xmp" not in im.info and "XML:com.adobe.xmp" not in im.info
        assert b"TestCam" not in out.path.read_bytes()


def test_keep_metadata(tmp_path):
    src = tmp_path / "meta.jpg"
    thumb = io.BytesIO()
    Image.fromarray(photo(16, 16)).save(thumb, format="JPEG")
    raw = add_thumbnail_ifd1(exif_with_gps(orientation=6).tobytes(), thumb.getvalue())
    Image.fromarray(photo(40, 64)).save(src, exif=raw, quality=95)
    with Image.open(src) as im:
        assert im.getexif().get_ifd(ExifTags.IFD.IFD1)  # the input has a thumbnail
    img = read_image(src)
    out = write_image(tmp_path / "keep.jpg", img.rgb, format="jpg", exif=img.exif, keep_metadata=True)
    with Image.open(out.path) as im:
        ex = im.getexif()
        assert ex[ExifTags.Base.Orientation] == 1
        assert ex[ExifTags.Base.Make] == "TestCam"
        assert ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
        assert not ex.get_ifd(ExifTags.IFD.IFD1)  # no thumbnail of the unprotected photo
        assert im.size == (40, 64)  # rotated pixels: width 40, height 64
    assert thumb.getvalue()[2:200] not in out.path.read_bytes()


def test_icc_kept_on_write(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for fmt in ("png", "jpg"):
        out = write_image(tmp_path / f"icc.{fmt}", photo(), format=fmt, icc_profile=srgb)
        with Image.open(out.path) as im:
            assert im.info.get("icc_profile") == srgb


def test_alpha_kept_in_png_composited_in_jpeg(tmp_path):
    rgb = photo()
    a = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    out = write_image(tmp_path / "a.png", rgb, alpha=a)
    with Image.open(out.path) as im:
        assert im.mode == "RGBA"
        arr = np.asarray(im)
        np.testing.assert_array_equal(arr[..., 3], a)
        np.testing.assert_array_equal(arr[..., :3], rgb)
    res = write_image(tmp_path / "a.jpg", rgb, alpha=a, format="jpg", quality=100)
    assert any("white" in n for n in res.notes)
    with Image.open(res.path) as im:
        arr = np.asarray(im).astype(np.int32)
        assert im.mode == "RGB" and im.size == (64, 48)
    assert np.abs(arr[:, 0] - 255).max() <= 4  # fully transparent column -> white
    assert np.abs(arr[:, -1] - rgb[:, -1].astype(np.int32)).mean() < 4  # opaque column kept


def test_no_overwrite_without_flag(tmp_path):
    p = tmp_path / "x.png"
    write_image(p, photo())
    h = sha256(p)
    with pytest.raises(FileExistsError) as e:
        write_image(p, np.zeros((48, 64, 3), np.uint8))
    assert str(p) in str(e.value) and "overwrite" in str(e.value)
    assert sha256(p) == h and listing(tmp_path) == ["x.png"]
    write_image(p, np.zeros((48, 64, 3), np.uint8), overwrite=True)
    assert sha256(p) != h and listing(tmp_path) == ["x.png"]
    with Image.open(p) as im:
        assert int(np.asarray(im).max()) == 0


def test_failure_during_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG partial data")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        write_image(tmp_path / "y.png", photo())
    assert listing(tmp_path) == []


def test_failure_during_fsync_and_move_leaves_nothing(tmp_path, monkeypatch):
    keep = tmp_path / "old.png"
    write_image(keep, photo())
    h = sha256(keep)

    def no_fsync(fd):
        raise OSError("I/O error")

    with monkeypatch.context() as m:
        m.setattr(imageio.os, "fsync", no_fsync)
        with pytest.raises(OSError, match="I/O error"):
            write_image(tmp_path / "z.png", photo())
        with pytest.raises(OSError, match="I/O error"):
            write_image(keep, photo(seed=1)[::-1].copy(), overwrite=True)
    assert listing(tmp_path) == ["old.png"] and sha256(keep) == h

    def no_move(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(imageio.os, "link", no_move)
    monkeypatch.setattr(imageio.os, "replace", no_move)
    with pytest.raises(OSError, match="cross-device"):
        write_image(tmp_path / "w.png", photo())
    assert listing(tmp_path) == ["old.png"]


def test_originals_untouched(tmp_path):
    src = tmp_path / "orig.jpg"
    Image.fromarray(photo()).save(src, exif=exif_with_gps(orientation=6))
    h = sha256(src)
    mtime = src.stat().st_mtime_ns
    img = read_image(src)
    write_image(output_path(src, format="same", source_format=img.format), img.rgb, format="same", source_format=img.format)
    assert sha256(src) == h and src.stat().st_mtime_ns == mtime
    assert listing(tmp_path) == ["orig.jpg", "orig_cloaked.jpg"]


def test_write_validates_input(tmp_path):
    with pytest.raises(ValueError):
        write_image(tmp_path / "f.png", photo().astype(np.float32))
    with pytest.raises(ValueError):
        write_image(tmp_path / "f.png", photo(), alpha=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError):
        write_image(tmp_path / "f.png", photo(), format="bmp")
    with pytest.raises(ValueError):
        write_image(tmp_path / "f.png", photo(), format="same")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# naming


def test_output_path_and_cloaked_detection(tmp_path):
    assert output_path("/a/b/photo.jpg", format="same", source_format="JPEG") == Path("/a/b/photo_cloaked.jpg")
    assert output_path("/a/b/IMG_1.JPEG", format="same", source_format="JPEG") == Path("/a/b/IMG_1_cloaked.JPEG")
    assert output_path("/a/b/photo.jpg", format="png", source_format="JPEG") == Path("/a/b/photo_cloaked.png")
    assert output_path("/a/b/scan.tiff", "/out", format="same", source_format="TIFF") == Path("/out/scan_cloaked.png")
    assert output_path("/a/b/pic.webp", "/out", format="jpg") == Path("/out/pic_cloaked.jpg")
    assert output_path("/a/x.jpg", format="same", source_format="WEBP").name == "x_cloaked.webp"
    assert resolve_format("jpeg") == "jpg" and resolve_format("same", "MPO") == "jpg"
    assert resolve_format("same", "GIF") == "png"
    assert is_cloaked_output("/a/photo_cloaked.jpg") and is_cloaked_output("p_cloaked.png")
    assert not is_cloaked_output("/a/photo.jpg") and not is_cloaked_output("/a/cloaked.jpg")
    assert not is_cloaked_output("/a/photo_cloaked_v2.jpg")


# --------------------------------------------------------------------------------------------
# iPhone photos: HEIC/HEIF (pillow-heif) and AVIF (Pillow >= 11.3), made here with those encoders

LOSSY = {"HEIF": "heic", "AVIF": "avif"}


def _save_lossy(path: Path, rgb: np.ndarray, fmt: str, exif: Image.Exif | None = None, xmp: bytes | None = None) -> None:
    imageio._decoders()  # registers pillow-heif's opener and saver
    kw = {"quality": 100, "exif": exif.tobytes()} if exif is not None else {"quality": 100}
    if xmp is not None:
        kw["xmp"] = xmp
    if fmt == "HEIF":
        kw["chroma"] = 444
    else:
        kw["subsampling"] = "4:4:4"
    Image.fromarray(rgb).save(path, format=fmt, **kw)


@pytest.mark.parametrize("fmt", list(LOSSY))
def test_heic_avif_read_by_content_with_orientation(tmp_path, fmt):
    rgb = photo(40, 64)
    src = tmp_path / "IMG_0001.jpg"  # misnamed on purpose: the content decides
    _save_lossy(src, rgb, fmt, exif_with_gps(orientation=6))
    with open(src, "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # really an ISO-BMFF (HEIF/AVIF) container
    img = read_image(src)
    assert img.format == fmt
    want = np.rot90(rgb, k=-1)  # orientation 6: rotate 90 degrees clockwise to display
    assert img.rgb.shape == want.shape == (64, 40, 3)
    err = np.abs(img.rgb.astype(np.int32) - want.astype(np.int32))
    assert err.mean() < 4.0, err.mean()
    assert img.rgb[5, -5, 0] > 200 and img.rgb[5, -5, 1] < 60  # red block is top-right now
    if img.exif is not None:
        ex = Image.Exif()
        ex.load(img.exif)
        assert ex.get(ExifTags.Base.Orientation, 1) == 1


@pytest.mark.parametrize("fmt", list(LOSSY))
def test_heic_avif_written_in_the_same_format_without_gps(tmp_path, fmt):
    src = tmp_path / f"IMG_0002.{LOSSY[fmt]}"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    _save_lossy(src, photo(48, 64), fmt, exif_with_gps(), xmp=xmp)
    with Image.open(src) as im:  # the input really carries GPS
        assert im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    img = read_image(src)
    assert resolve_format("same", img.format) == LOSSY[fmt]
    dest = output_path(src, tmp_path / "out")
    assert dest.name == f"IMG_0002_cloaked.{LOSSY[fmt]}"
    dest.parent.mkdir()
    out = write_image(dest, img.rgb, format="same", source_format=img.format, exif=img.exif,
                      icc_profile=img.icc_profile)
    assert out.format == fmt
    with Image.open(out.path) as im:
        assert im.format == fmt and im.size == (64, 48)
        assert len(im.getexif()) == 0 and not im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        assert not im.info.get("xmp")
        back = np.asarray(im.convert("RGB"))
    assert np.abs(back.astype(np.int32) - img.rgb.astype(np.int32)).mean() < 4.0
    assert b"TestCam" not in out.path.read_bytes()
    # --keep-metadata keeps EXIF (GPS included) with orientation 1.
    kept = write_image(tmp_path / f"keep.{LOSSY[fmt]}", img.rgb, format=LOSSY[fmt], exif=img.exif, keep_metadata=True)
    with Image.open(kept.path) as im:
        ex = im.getexif()
        assert ex.get(ExifTags.Base.Orientation, 1) == 1 and ex[ExifTags.Base.Make] == "TestCam"
        assert ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    # --format still wins over "same".
    png = write_image(tmp_path / "as.png", img.rgb, format="png")
    assert png.format == "PNG"
