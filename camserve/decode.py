"""bytes -> RGB image, with a clear error for anything that is not a safe raster image."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from camserve.errors import (
    EMPTY_BODY,
    IMAGE_TOO_LARGE,
    UNDECODABLE_IMAGE,
    UNSUPPORTED_FORMAT,
    input_error,
)

# Raster formats we decode. Everything else (SVG, PDF, HTML, ...) is refused before PIL
# tries a plugin on it: fewer decoders means fewer parsers exposed to hostile bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000

# A truncated file must fail, not decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_TEXT_PREFIXES = (b"<", b"{", b"[", b"%PDF", b"#!")
_BOM = b"\xef\xbb\xbf"


def _looks_like_markup(data: bytes) -> bool:
    # An editor's UTF-8 byte order mark must not hide "<svg" from the check.
    return data[:512].removeprefix(_BOM).lstrip()[:5].startswith(_TEXT_PREFIXES)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode image bytes to an upright RGB image, or raise ``InputError``.

    ``min_side``: the smallest side the caller needs. A JPEG much larger than that is
    decoded at a reduced DCT scale (1/2, 1/4 or 1/8), still at least ``min_side`` on each
    side: several times faster, but not the pixels a full decode gives (up to ~100 grey
    levels apart after the resize), so serving does not use it (bench/jpeg_draft.py).
    """
    if not data:
        raise input_error(EMPTY_BODY, "the request carried no image bytes")
    if _looks_like_markup(data):
        raise input_error(
            UNSUPPORTED_FORMAT,
            "the body looks like text/markup (SVG, HTML, JSON?); send a raster image: "
            + ", ".join(ACCEPTED_FORMATS),
        )
    try:
        with warnings.catch_warnings():
            # PIL's bomb warning would only log; our own pixel limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise input_error(
            UNDECODABLE_IMAGE,
            "the bytes are not a recognised image; accepted formats: "
            + ", ".join(ACCEPTED_FORMATS),
        ) from None
    except Image.DecompressionBombError as err:
        raise input_error(IMAGE_TOO_LARGE, str(err)) from None
    except Exception as err:  # noqa: BLE001 - any parser failure is the client's bytes
        raise input_error(UNDECODABLE_IMAGE, f"cannot read image header: {err}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise input_error(UNDECODABLE_IMAGE, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise input_error(
            IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    try:
        if image.format == "PNG":
            # PIL checks chunk CRCs only while reading the header; libpng rejects a bad
            # CRC anywhere, and so do we: the bytes were damaged on the way.
            Image.open(io.BytesIO(data), formats=("PNG",)).verify()
        if min_side is not None and image.format == "JPEG":
            image.draft(image.mode, (min_side, min_side))
        image.load()  # first frame only for animated formats
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise input_error(IMAGE_TOO_LARGE, str(err)) from None
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as many types
        raise input_error(
            UNDECODABLE_IMAGE, f"{image.format} data is corrupt or truncated: {err}"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _to_8bit_grey(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        # Pasting through the alpha channel onto white gives alpha_composite's pixels
        # exactly, without its two extra RGBA copies (160 MB each at 40 Mpx).
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, (0, 0), rgba)
        return background
    return image.convert("RGB")


# value * 255 // 65535 for every 16-bit value: a lookup writes one byte per pixel, where the
# arithmetic on an int64 copy needed about 30 bytes per pixel (1 GB for a 40 Mpx image).
_SIXTEEN_TO_EIGHT = (np.arange(65536, dtype=np.uint32) * 255 // 65535).astype(np.uint8)


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit "L", rescaled: PIL's convert() clips at 255 instead.

    16-bit modes span 0..65535; a 32-bit "I" image spans 0..65535 when any value is above
    255, else 0..255 (an 8-bit image saved as 32-bit). Out-of-range values are clipped.
    """
    if image.mode.startswith("I;16"):
        return Image.fromarray(_SIXTEEN_TO_EIGHT[np.asarray(image)], "L")
    array = np.array(image)  # "I" is int32: a writable copy, clipped in place
    if array.max() > 255:
        return Image.fromarray(_SIXTEEN_TO_EIGHT[np.clip(array, 0, 65535, out=array)], "L")
    return Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8), "L")
