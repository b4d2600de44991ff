"""Safe reading and writing of user photos.

Reading (:func:`read_image`)
  * Opens by *content*, never by extension (a WebP named ``.jpg`` is read as WebP), with
    an allow-list of photo decoders: JPEG (and MPO), PNG, WebP, GIF, BMP, TIFF, PPM/PGM/PBM,
    TGA, QOI, JPEG 2000, AVIF (Pillow's own plugin, Pillow >= 11.3) and HEIC/HEIF (the
    iPhone default, through ``pillow-heif``). EPS/PS/PDF (which Pillow would hand to
    Ghostscript) and other formats are refused; a HEIC file without ``pillow-heif``
    installed gets its own message.
  * Applies the EXIF orientation (``ImageOps.exif_transpose``): the returned pixels are the
    photo as a viewer shows it, so a cloaked output never needs an orientation tag. (For
    HEIC, libheif applies the container's rotation/mirror on decoding and pillow-heif resets
    the EXIF orientation to 1, so the result is the same.)
  * Every pixel mode becomes 8-bit sRGB-ish ``uint8 [H, W, 3]`` plus an optional separate
    ``uint8 [H, W]`` alpha plane:

    =================  ======================================================================
    ``1``, ``L``        grey replicated to RGB
    ``LA``, ``La``      grey to RGB, alpha kept separately
    ``I;16*``, ``I``    16-bit grey, scaled to 8 bit with rounding (``v * 255 / 65535``)
    ``RGB``             as is (16-bit RGB PNGs are decoded by Pillow to their high bytes)
    ``RGBA``, ``RGBa``  RGB plus alpha (premultiplied alpha is un-premultiplied first)
    ``P``, ``PA``       palette expanded; palette transparency becomes an alpha plane
    ``CMYK``            converted through its embedded ICC profile to sRGB when there is one
                        (LittleCMS, perceptual intent), else the plain conversion
                        ``R = 255 (1 - C) (1 - K)``
    others              ``Image.convert("RGB")`` when Pillow can, else an :class:`ImageError`
    =================  ======================================================================

  * Animated files (GIF, APNG, WebP, MPO, multi-page TIFF): only the first frame is used;
    :attr:`LoadedImage.notes` says so.
  * Bad input raises :class:`ImageError`, whose ``str`` is one line naming the file and the
    reason: missing, a directory, unreadable, zero bytes, not an image, truncated/corrupt,
    decompression bomb (more than ``max_pixels`` pixels, default 100 megapixels), too small
    (under ``min_side`` pixels on a side, default 32), unsupported pixel mode.
    The pixel limit is applied per call: Pillow's global ``Image.MAX_IMAGE_PIXELS`` is set
    only for the duration of the read (under a lock) and restored afterwards.

Writing (:func:`write_image`)
  * Atomic: the image is encoded in memory, written to a hidden temporary file in the
    destination folder (``.<name>.<random>.tmp``), flushed and fsync'ed, then moved into place (``os.link`` so that an existing file is never
    replaced unless ``overwrite=True``, ``os.replace`` with ``overwrite=True``). On any error
    the temporary file is removed; a partially written output never appears.
  * Privacy: EXIF (including GPS), XMP, IPTC, comments and thumbnails are never copied unless
    ``keep_metadata=True``; then only EXIF is kept (GPS included: the user asked for it) with
    the orientation tag reset to 1 (pixels are already upright), the pixel dimensions updated
    and the MakerNote and the embedded thumbnail (IFD1) dropped, since both can hold an
    unprotected preview of the face. XMP is always dropped.
  * The ICC colour profile is kept (only RGB profiles: a grey profile does not describe the
    RGB output, and CMYK input has already been converted to sRGB).
  * Alpha is kept in PNG and WebP output. JPEG has no alpha: a photo with transparency
    written as JPEG is composited over white, and the returned :class:`WriteResult` carries a
    note saying so.
  * JPEG, HEIC and AVIF output use 4:4:4 chroma (no subsampling) so that the colour detail
    of the cloak survives; ``quality`` (default 95) applies to JPEG, WebP, HEIC and AVIF.
    ``format="same"`` writes HEIC as HEIC and AVIF as AVIF (iPhone photos stay iPhone photos).

Naming (:func:`output_path`, :func:`is_cloaked_output`)
  ``photo.jpg -> photo_cloaked.jpg`` beside the input or in ``output_dir``; the extension
  follows the *written* format (``img47.jpg`` holding WebP -> ``img47_cloaked.webp`` with
  ``format="same"``). Files whose stem ends in ``_cloaked`` are outputs and are never cloaked
  again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "CLOAKED_SUFFIX",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "OUTPUT_FORMATS",
    "ImageError",
    "LoadedImage",
    "WriteResult",
    "atomic_write_bytes",
    "is_cloaked_output",
    "output_path",
    "read_image",
    "resolve_format",
    "sniff_format",
    "write_image",
]

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MIN_SIDE = 32
CLOAKED_SUFFIX = "_cloaked"

# format key -> (Pillow format name, canonical suffix, suffixes accepted as "the same")
OUTPUT_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "png": ("PNG", ".png", (".png",)),
    "jpg": ("JPEG", ".jpg", (".jpg", ".jpeg", ".jpe", ".jfif")),
    "webp": ("WEBP", ".webp", (".webp",)),
    "heic": ("HEIF", ".heic", (".heic", ".heif", ".hif")),
    "avif": ("AVIF", ".avif", (".avif",)),
}
# Pillow format name of an input -> output format key for format="same" (anything else: PNG,
# which is lossless and therefore keeps the cloak intact).
_SAME = {"JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "PNG": "png", "HEIF": "heic", "AVIF": "avif"}

_ORIENTATION = ExifTags.Base.Orientation
_MAKERNOTE = ExifTags.Base.MakerNote
_PIXEL_X = ExifTags.Base.ExifImageWidth  # 0xA002 PixelXDimension
_PIXEL_Y = ExifTags.Base.ExifImageHeight  # 0xA003 PixelYDimension

_PIL_GLOBALS = threading.Lock()

# Decoders read_image may use (Pillow plugin ids). Everything else is refused as "not an
# image", in particular EPS/PS/PDF (Pillow would run Ghostscript on them) and exotic formats.
_ALLOWED_DECODERS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "QOI", "JPEG2000", "AVIF", "HEIF")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


@functools.cache
def _register_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener and saver with Pillow (once); False without it."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def _decoders() -> tuple[str, ...]:
    _register_heif()
    Image.init()
    return tuple(f for f in _ALLOWED_DECODERS if f in Image.OPEN)


def _can_write(key: str) -> bool:
    """Whether this Pillow (plus pillow-heif) can encode output format ``key``."""
    _decoders()
    return OUTPUT_FORMATS[key][0] in Image.SAVE


def _not_an_image(path: Path) -> ImageError:
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return ImageError(path, "HEIC/HEIF photo: reading it needs pillow-heif (pip install pillow-heif), "
                                "or convert it to JPEG or PNG first")
    return ImageError(path, "not an image (content not recognised as a supported image format)")


class ImageError(Exception):
    """A file that cannot be used as a photo. ``str(e)`` is one line: ``<path>: <reason>``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded photo, upright.

    Attributes:
      rgb: uint8 ``[H, W, 3]``, values 0..255, EXIF orientation applied.
      alpha: uint8 ``[H, W]`` (255 = opaque) or ``None`` when the file has no transparency.
      format: Pillow's format name detected from the content (``"JPEG"``, ``"PNG"``,
        ``"WEBP"``, ...).
      icc_profile: the embedded RGB ICC profile (bytes) or ``None``.
      exif: the EXIF block (bytes, orientation already removed) or ``None``; written back only
        with ``keep_metadata=True``.
      source: the path the image was read from.
      mode: the original Pillow pixel mode (``"RGB"``, ``"I;16"``, ``"CMYK"``, ...).
      frames: number of frames in the file (only the first is used).
      notes: human-readable remarks about what was done (first frame of an animation,
        dropped grey ICC profile, Pillow warnings about the file).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str
    icc_profile: bytes | None
    exif: bytes | None
    source: Path
    mode: str = "RGB"
    frames: int = 1
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels, after orientation."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


@dataclasses.dataclass(frozen=True)
class WriteResult:
    """What :func:`write_image` wrote: the final path, the Pillow format and any notes."""

    path: Path
    format: str
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# reading


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Temporarily make Pillow refuse images over ``max_pixels`` pixels (restored after)."""
    with _PIL_GLOBALS:
        old = Image.MAX_IMAGE_PIXELS
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; the warning is
        # turned into an error by the caller's warning filter, so the limit is max_pixels.
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _bomb(path, pixels_msg: str, max_pixels: int | None) -> ImageError:
    limit = f"{max_pixels / 1e6:g} megapixels" if max_pixels else "the pixel limit"
    m = re.search(r"\((\d+) pixels\)", pixels_msg)
    size = f"{int(m.group(1)) / 1e6:.4g} megapixels" if m else "too many pixels"
    return ImageError(path, f"refused as a possible decompression bomb ({size}; the limit is {limit})")


def _icc_space(icc: bytes | None) -> bytes | None:
    """The ICC header's data colour space signature (``b"RGB "``, ``b"GRAY"``, ``b"CMYK"``)."""
    if not icc or len(icc) < 20:
        return None
    return bytes(icc[16:20])


def _gray16_to_8(arr: np.ndarray) -> np.ndarray:
    """uint16/int32 grey in 0..65535 -> uint8 with rounding."""
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb_alpha(im: Image.Image, icc: bytes | None, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    """Convert any Pillow mode to (uint8 [H, W, 3], uint8 [H, W] | None, RGB icc | None)."""
    mode = im.mode
    alpha = None
    if mode in ("RGBa", "La", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        rgb = np.asarray(im, dtype=np.uint8)
    elif mode == "RGBA":
        a = np.asarray(im, dtype=np.uint8)
        rgb, alpha = a[..., :3], a[..., 3]
    elif mode in ("1", "L", "LA"):
        g = np.asarray(im.convert("LA"), dtype=np.uint8)
        rgb = np.repeat(g[..., :1], 3, axis=-1)
        alpha = g[..., 1] if mode == "LA" else None
    elif mode.startswith("I;16") or mode == "I":
        g = _gray16_to_8(np.asarray(im))
        rgb = np.repeat(g[..., None], 3, axis=-1)
    elif mode == "P":
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    elif mode == "CMYK":
        rgb = None
        if _icc_space(icc) == b"CMYK":
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
                out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
                rgb = np.asarray(out, dtype=np.uint8)
                notes.append("CMYK converted to sRGB through its embedded ICC profile")
            except Exception as e:  # noqa: BLE001 - broken profile or no LittleCMS: plain conversion
                notes.append(f"CMYK ICC profile unusable ({type(e).__name__}); plain CMYK->RGB conversion used")
        if rgb is None:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        icc = None  # the pixels are sRGB now
    else:
        try:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as e:
            raise ValueError(f"unsupported pixel mode {mode!r} ({e})") from e
    if icc is not None and _icc_space(icc) != b"RGB ":
        space = (_icc_space(icc) or b"?").decode("latin-1").strip()
        notes.append(f"{space or 'non-RGB'} ICC profile not kept (it does not describe RGB pixels)")
        icc = None
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"unsupported pixel layout {rgb.shape} for mode {im.mode!r}")
    if alpha is not None:
        alpha = np.ascontiguousarray(alpha, dtype=np.uint8)
    return rgb, alpha, icc


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE) -> LoadedImage:
    """Decode a photo safely (see the module docstring for every rule).

    Args:
      path: the file. Its extension is ignored; the content decides.
      max_pixels: refuse images with more pixels than this (decompression bombs); ``None``
        disables the check.
      min_side: refuse images whose width or height (after orientation) is below this.

    Returns:
      A :class:`LoadedImage` with ``rgb`` uint8 ``[H, W, 3]``.

    Raises:
      ImageError: one clear line naming the file and the reason.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as e:
        raise ImageError(path, f"cannot access ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    notes: list[str] = []
    try:
        with _pixel_limit(max_pixels), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_decoders()) as im:
                fmt = im.format or "unknown"
                frames = int(getattr(im, "n_frames", 1) or 1)
                if frames > 1:
                    im.seek(0)
                    notes.append(f"{fmt} file has {frames} frames; only the first is used")
                im.load()
                icc = im.info.get("icc_profile") or None
                mode = im.mode
                try:
                    up = ImageOps.exif_transpose(im)
                except Exception as e:  # noqa: BLE001 - broken EXIF must not lose the photo
                    up = im.copy()
                    notes.append(f"EXIF orientation unreadable ({type(e).__name__}); used as stored")
                try:
                    exif_obj = up.getexif()
                    exif = exif_obj.tobytes() if len(exif_obj) else None
                except Exception as e:  # noqa: BLE001 - only needed for --keep-metadata
                    exif = None
                    notes.append(f"EXIF unreadable ({type(e).__name__}); it cannot be kept")
                rgb, alpha, icc = _to_rgb_alpha(up, icc, notes)
        for w in caught:
            notes.append(f"Pillow: {w.message}")
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except PermissionError:
        raise ImageError(path, "cannot read: permission denied") from None
    except Image.DecompressionBombError as e:
        raise _bomb(path, str(e), max_pixels) from None
    except Image.DecompressionBombWarning as e:
        raise _bomb(path, str(e), max_pixels) from None
    except UnidentifiedImageError:
        raise _not_an_image(path) from None
    except MemoryError:
        raise ImageError(path, "too large to decode in the available memory") from None
    except ValueError as e:
        if "unsupported" in str(e):
            raise ImageError(path, str(e)) from None
        raise ImageError(path, f"corrupt image data ({e})") from None
    except (OSError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise ImageError(path, f"truncated or incomplete file ({msg})") from None
        raise ImageError(path, f"corrupt or unreadable image data ({msg})") from None
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(path, f"too small ({w}x{h} px; need at least {min_side} px on each side)")
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        format=fmt,
        icc_profile=bytes(icc) if icc else None,
        exif=exif,
        source=path,
        mode=mode,
        frames=frames,
        notes=tuple(notes),
    )


def sniff_format(path: str | os.PathLike) -> str | None:
    """Pillow's format name of ``path`` from its header only (cheap), or ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _pixel_limit(None), Image.open(path, formats=_decoders()) as im:
                return im.format
    except Exception:  # noqa: BLE001 - a sniff never raises; read_image reports the reason
        return None


# --------------------------------------------------------------------------------------------
# naming


def resolve_format(format: str, source_format: str | None = None) -> str:
    """The output format key (``"png"``, ``"jpg"``, ``"webp"``, ``"heic"``, ``"avif"``) for a
    requested ``format``.

    ``"same"`` keeps JPEG (and MPO) as JPEG, WebP as WebP, HEIC/HEIF as HEIC, AVIF as AVIF
    (each where this Pillow can encode it) and writes every other input (PNG, TIFF, BMP,
    GIF, ...) as lossless PNG. ``"jpeg"`` is accepted for ``"jpg"``, ``"heif"`` for ``"heic"``.
    """
    f = {"jpeg": "jpg", "heif": "heic"}.get(format.lower().lstrip("."), format.lower().lstrip("."))
    if f == "same":
        if source_format is None:
            raise ValueError('format="same" needs the source format (source_format=...)')
        key = _SAME.get(source_format.upper(), "png")
        return key if _can_write(key) else "png"
    if f not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {format!r}; use one of png, jpg, webp, heic, avif, same")
    if not _can_write(f):
        raise ValueError(f"cannot write {f}: this Pillow has no encoder for it "
                         f"({'pip install pillow-heif' if f == 'heic' else 'Pillow >= 11.3 has AVIF'})")
    return f


def output_path(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    format: str = "same",
    source_format: str | None = None,
) -> Path:
    """``<stem>_cloaked.<ext>`` beside ``input_path`` or inside ``output_dir``.

    The extension is the written format's; the input's own suffix is reused (case included)
    when it already names that format (``IMG_1.JPEG -> IMG_1_cloaked.JPEG``). With
    ``format="same"`` and no ``source_format`` the format is sniffed from the file's content.
    """
    p = Path(input_path)
    if format.lower() == "same" and source_format is None:
        source_format = sniff_format(p) or ""
    key = resolve_format(format, source_format)
    _, canonical, accepted = OUTPUT_FORMATS[key]
    suffix = p.suffix if p.suffix.lower() in accepted else canonical
    folder = Path(output_dir) if output_dir is not None else p.parent
    return folder / f"{p.stem}{CLOAKED_SUFFIX}{suffix}"


def is_cloaked_output(path: str | os.PathLike) -> bool:
    """True for files named like an output of this tool (``*_cloaked.*``)."""
    return Path(path).stem.endswith(CLOAKED_SUFFIX)


# --------------------------------------------------------------------------------------------
# writing


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exif_for_output(exif: bytes, size: tuple[int, int]) -> Image.Exif:
    """EXIF to keep: orientation 1, current pixel size, no MakerNote, no thumbnail (IFD1)."""
    ex = Image.Exif()
    ex.load(exif)
    ex[_ORIENTATION] = 1
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    sub.pop(_MAKERNOTE, None)
    if _PIXEL_X in sub or _PIXEL_Y in sub:
        sub[_PIXEL_X], sub[_PIXEL_Y] = int(size[0]), int(size[1])
    return ex  # Exif.tobytes writes IFD0 + Exif/GPS/Interop IFDs only: IFD1 is dropped


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data, *, overwrite: bool = False) -> Path:
    """Write ``data`` (bytes-like) to ``path`` atomically: all of it or nothing.

    A hidden temporary file in the destination folder is written, flushed and fsync'ed, then
    moved into place: with ``os.link`` (fails if ``path`` exists, so an existing file is never
    replaced, even by a concurrent writer) unless ``overwrite``, else ``os.replace``. On any
    error the temporary file is removed and the error re-raised.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false.
      OSError: cannot write (missing folder, permissions, disk full, ...).
    """
    path = Path(path)
    exists_msg = f"{path}: output already exists (use --overwrite to replace it)"
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(exists_msg)
    folder = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path appeared meanwhile
            except FileExistsError:
                raise FileExistsError(exists_msg) from None
            except OSError:  # filesystem without hard links: check, then replace
                if path.exists():
                    raise FileExistsError(exists_msg) from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)
    return path


def write_image(
    path: str | os.PathLike,
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    format: str = "png",
    source_format: str | None = None,
    quality: int = 95,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    keep_metadata: bool = False,
    overwrite: bool = False,
) -> WriteResult:
    """Write ``rgb`` (uint8 ``[H, W, 3]``) to ``path`` atomically (see the module docstring).

    Args:
      path: destination file; its folder must exist. The format is ``format``'s, whatever
        the suffix.
      rgb: uint8 ``[H, W, 3]`` pixels, values 0..255.
      alpha: optional uint8 ``[H, W]`` alpha (255 = opaque); kept in PNG/WebP, composited
        over white for JPEG (with a note in the result).
      format: ``"png"``, ``"jpg"``, ``"webp"``, ``"heic"``, ``"avif"`` or ``"same"`` (uses
        ``source_format``).
      source_format: the input's Pillow format name, for ``format="same"``.
      quality: JPEG/WebP/HEIC/AVIF quality, 1..100.
      icc_profile: RGB ICC profile to embed (kept by default; it is not personal data).
      exif: EXIF bytes of the input; written only when ``keep_metadata`` is true.
      keep_metadata: keep EXIF (orientation reset to 1, no thumbnail, no MakerNote).
      overwrite: replace an existing ``path``; otherwise :class:`FileExistsError`.

    Returns:
      :class:`WriteResult` with the final path, the Pillow format and notes.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
      ValueError: bad array shapes/dtypes, format or quality.
      OSError: the folder is missing or not writable, the disk is full, ...; no temporary
        file and no partial output is left behind.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.dtype != np.uint8 or alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha must be uint8 {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    key = resolve_format(format, source_format)
    pil_format = OUTPUT_FORMATS[key][0]
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path}: output already exists (use --overwrite to replace it)")
    notes: list[str] = []

    if alpha is not None and key == "jpg":
        if int(alpha.min()) < 255:
            notes.append("JPEG has no transparency: transparent areas were composited over white")
        a = alpha.astype(np.float32)[..., None] / np.float32(255.0)
        comp = rgb.astype(np.float32) * a + np.float32(255.0) * (np.float32(1.0) - a)
        rgb = np.clip(np.rint(comp), 0, 255).astype(np.uint8)
        alpha = None
    if alpha is not None:
        im = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1), "RGBA")
    else:
        im = Image.fromarray(np.ascontiguousarray(rgb), "RGB")

    params: dict = {}
    if icc_profile:
        if _icc_space(icc_profile) == b"RGB ":
            params["icc_profile"] = bytes(icc_profile)
        else:
            notes.append("non-RGB ICC profile not embedded")
    if keep_metadata and exif:
        try:
            params["exif"] = _exif_for_output(exif, im.size).tobytes()
        except Exception as e:  # noqa: BLE001 - unparseable EXIF: privacy first, write without it
            notes.append(f"EXIF could not be re-encoded ({type(e).__name__}); written without EXIF")
    if key == "jpg":
        params.update(quality=int(quality), subsampling=0, optimize=False)
    elif key == "heic":
        params.update(quality=int(quality), chroma=444)
    elif key == "avif":
        params.update(quality=int(quality), subsampling="4:4:4")
    elif key == "webp":
        params.update(quality=int(quality), method=4)
    else:
        params.update(compress_level=6)

    buf = io.BytesIO()
    im.save(buf, format=pil_format, **params)
    atomic_write_bytes(path, buf.getbuffer(), overwrite=overwrite)
    return WriteResult(path=path, format=pil_format, notes=tuple(notes))
