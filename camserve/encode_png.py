"""result -> PNG pictures: an 8-bit grayscale heatmap and a colormap overlay.

Both are drawn at the network's input size, for the map and for the map under the
reference shift, so a reader sees what the zero-reference score measured. Rendering is
a bilinear upsample (torch), a colormap lookup table (matplotlib, no figures) and a PNG
encode (PIL): well under a millisecond per picture at 64x64.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from camserve.explainer import ClassExplanation, Explanation
from camserve.maps import peak_normalised
from camserve.preprocess import Preprocessing

DEFAULT_COLORMAP = "inferno"
OVERLAY_OPACITY = 0.55  # of the colour map over the image
# Fast zlib level: these pictures are small, and the request should not wait on compression.
PNG_COMPRESS_LEVEL = 3
PNG_MEDIA_TYPE = "image/png"


def upsample(grad_cam: Tensor, size: tuple[int, int]) -> Tensor:
    """ReLU'd map (h, w) -> (H, W) in [0, 1]: bilinear, then divided by its maximum.

    An empty map (no positive evidence) stays all zeros instead of dividing by zero.
    """
    grid = grad_cam.detach().to(torch.float32)[None, None]
    big = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return peak_normalised(big)


def _to_uint8(unit: Tensor) -> np.ndarray:
    # numpy, not torch: tiny arrays, and torch's per-op thread dispatch costs more than the work.
    return (np.clip(unit.numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=8)
def _lookup_table(name: str) -> np.ndarray:
    """256 RGB entries of a matplotlib colormap: a table lookup beats calling the map per pixel."""
    return colormaps[name](np.linspace(0, 1, 256), bytes=True)[:, :3]


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def heatmap_image(grad_cam: Tensor, size: tuple[int, int]) -> Image.Image:
    """The map at the input size as 8-bit grayscale (white = the map's maximum)."""
    return Image.fromarray(_to_uint8(upsample(grad_cam, size)), "L")


def overlay_image(
    grad_cam: Tensor,
    background: Image.Image,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = OVERLAY_OPACITY,
) -> Image.Image:
    """The map in a perceptual colormap blended over ``background`` (resized to its size)."""
    width, height = background.size
    levels = _to_uint8(upsample(grad_cam, (height, width)))
    colours = Image.fromarray(_lookup_table(colormap)[levels], "RGB")
    return Image.blend(background.convert("RGB"), colours, opacity)


def network_view(tensor: Tensor, preprocessing: Preprocessing) -> Image.Image:
    """The network input (3, H, W) back to RGB: exactly the pixels the map refers to (after
    resize and crop), so the overlay lines up with the map. Undoes the normalisation, the
    rescale factor (BiT's 1/127.5 as well as 1/255) and a BGR channel order."""
    if preprocessing.channel_order == "bgr":  # the network took B, G, R (camserve.preprocess)
        tensor = tensor.flip(0)
    mean_t = torch.as_tensor(preprocessing.mean, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(preprocessing.std, dtype=torch.float32)[:, None, None]
    rescaled = tensor.detach().to(device="cpu", dtype=torch.float32) * std_t + mean_t
    unit = rescaled / (preprocessing.rescale_factor * 255.0)  # pixel / 255
    return Image.fromarray(_to_uint8(unit).transpose(1, 2, 0), "RGB")


def background_of(explanation: Explanation) -> Image.Image:
    """What the overlay is drawn on: the network's view of the image (after resize and crop)."""
    return network_view(explanation.image.tensor, explanation.model.preprocessing)


def render_images(
    explanation: Explanation,
    colormap: str = DEFAULT_COLORMAP,
    explained: ClassExplanation | None = None,
    background: Image.Image | None = None,
) -> dict[str, Image.Image]:
    """The four pictures of an ``images`` block, as PIL images: of ``explained`` (default: the
    explained class; a ``more_explanations`` class otherwise) over ``background`` (default:
    the image as the network saw it; pass it to draw several classes on one)."""
    background = background_of(explanation) if background is None else background
    size = (background.height, background.width)
    explained = explanation.explained if explained is None else explained
    return {
        "heatmap_png": heatmap_image(explained.grad_cam, size),
        "overlay_png": overlay_image(explained.grad_cam, background, colormap),
        "shifted_heatmap_png": heatmap_image(explained.shifted_grad_cam, size),
        "shifted_overlay_png": overlay_image(explained.shifted_grad_cam, background, colormap),
    }


def images_json(
    explanation: Explanation,
    explained: ClassExplanation | None = None,
    background: Image.Image | None = None,
) -> dict[str, str]:
    """An ``images`` block (of ``explained``, default the explained class): base64 PNGs."""
    return {
        key: base64.b64encode(encode_png(image)).decode("ascii")
        for key, image in render_images(
            explanation, explained=explained, background=background
        ).items()
    }


def overlay_png(explanation: Explanation, colormap: str = DEFAULT_COLORMAP) -> bytes:
    """The body of an ``Accept: image/png`` answer: the overlay of the (unshifted) map or, for
    a multi-label model, one labelled overlay per explained label, side by side."""
    background = background_of(explanation)
    if explanation.model.multi_label:
        return encode_png(labelled_overlays(explanation, background, colormap))
    return encode_png(overlay_image(explanation.explained.grad_cam, background, colormap))


PANEL_GAP = 4  # pixels between two labelled overlays
CAPTION_BACKGROUND = (24, 24, 24)
PRESENT_TEXT = (255, 255, 255)
ABSENT_TEXT = (150, 150, 150)


def labelled_overlays(
    explanation: Explanation, background: Image.Image, colormap: str = DEFAULT_COLORMAP
) -> Image.Image:
    """Each explained label's overlay, left to right in the answer's order, captioned with
    the label and its probability (and ``absent`` when it is below its threshold)."""
    width, height = background.size
    font = _caption_font(width)
    line = _line_height(font)
    caption = 2 * line + 4
    items = (explanation.explained, *explanation.more)
    strip = Image.new(
        "RGB",
        (len(items) * width + (len(items) - 1) * PANEL_GAP, height + caption),
        CAPTION_BACKGROUND,
    )
    draw = ImageDraw.Draw(strip)
    for position, item in enumerate(items):
        left = position * (width + PANEL_GAP)
        strip.paste(overlay_image(item.grad_cam, background, colormap), (left, 0))
        present = explanation.is_present(item.index) is not False
        probability = f"p {float(explanation.probabilities[item.index]):.2f}"
        lines = (explanation.model.labels[item.index], probability + ("" if present else " absent"))
        for row, text in enumerate(lines):
            draw.text(
                (left + 2, height + 2 + row * line),
                _fit(draw, text, font, width - 4),
                fill=PRESENT_TEXT if present else ABSENT_TEXT,
                font=font,
            )
    return strip


@lru_cache(maxsize=8)
def _caption_font(panel_width: int) -> ImageFont.ImageFont:
    """Pillow's own font, larger on larger panels (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=max(10, panel_width // 16))
    except (TypeError, OSError, ImportError):  # an older Pillow, or no FreeType
        return ImageFont.load_default()


def _line_height(font: ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom + 2


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def accepts_png(accept: str | None) -> bool:
    """True when an ``Accept`` header asks for image/png over JSON.

    ``*/*`` or a missing header keep the JSON default; image/png wins only when it is
    named and ranked (q-value) at least as high as application/json.
    """
    if not accept:
        return False
    ranks: dict[str, float] = {}
    for part in str(accept).split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media.lower()] = max(quality, ranks.get(media.lower(), 0.0))
    png = ranks.get(PNG_MEDIA_TYPE, ranks.get("image/*", 0.0))
    return png > 0 and png >= ranks.get("application/json", 0.0)
