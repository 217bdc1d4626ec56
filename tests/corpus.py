# ruff: noqa: E501 - the corpus is a table: one case per line reads best
"""The bad-input corpus: malformed and unusual requests, each with the answer it must get.

Generated in memory from the shapes data set, so it needs no files and no camserve code
beyond the data generator (the oracles must not share the decoder they check). Write it to
a folder for other tools (curl, a fuzzer's seed corpus) with::

    .venv/bin/python -m tests.corpus OUTDIR
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from harness.shapes.dataset import CLASSES, HELD_OUT_SEED, render_sample

OK = "ok"
# The answer's length when the request sets no topk: the shapes model's configured topk.
DEFAULT_TOPK = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "models" / "shapes" / "model-config.yaml").read_text()
)["handler"]["topk"]
# TorchServe's frontend refuses bodies over max_request_size itself: 413, empty body.
FRONTEND_413 = "frontend_413"


@dataclass(frozen=True)
class Case:
    """One request and what it must get back.

    ``expect`` is an error code, ``OK``, or ``FRONTEND_413``. For ``OK`` cases the oracles
    are: ``same_as`` (PNG bytes whose answer must be identical), ``differs_from`` (PNG bytes
    whose Grad-CAM must differ: proves a transformation was really applied), ``label``
    (the known class) and ``topk`` (the number of predictions listed).

    Besides a body or a ``form``: ``parts`` is a multipart form whose field names may
    repeat, ``accept`` the Accept header, ``query`` a query string for the URL.
    """

    name: str
    expect: str
    status: int
    body: bytes | None = None
    content_type: str | None = None
    form: dict[str, bytes] | None = None
    same_as: bytes | None = None
    differs_from: bytes | None = None
    label: int | None = None
    topk: int | None = None
    parts: tuple[tuple[str, bytes], ...] | None = None
    accept: str | None = None
    query: str | None = None
    extra: dict = field(default_factory=dict)

    def request_kwargs(self) -> dict:
        """Keyword arguments for ``requests.post`` (``params`` for the query string)."""
        headers = {"Accept": self.accept} if self.accept else {}
        params = {"params": self.query} if self.query else {}
        if self.parts is not None:
            return {"files": [(k, (k, v)) for k, v in self.parts], "headers": headers, **params}
        if self.form is not None:
            files = {k: (k, v) for k, v in self.form.items() if k == "data"}
            data = {k: v for k, v in self.form.items() if k != "data"}
            return {"files": files, "data": data, "headers": headers, **params}
        if self.content_type:
            headers["Content-Type"] = self.content_type
        return {"data": self.body, "headers": headers, **params}


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def sample(index: int):
    return render_sample(HELD_OUT_SEED, index)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes that declares a huge canvas."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"\x00" * 1024, 9)  # the start of row 0; the rest never comes
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A GIF whose screen and frame both claim 65535 x 65535 pixels."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    descriptor = data.index(b",")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def corrupt_png_crc(png: bytes, chunk: bytes) -> bytes:
    """Flip the stored CRC of the first ``chunk``; the data itself stays intact."""
    data = bytearray(png)
    at = data.index(chunk)
    length = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 + length] ^= 0xFF
    return bytes(data)


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def pixels_of(data: bytes) -> Image.Image:
    """Decode with plain PIL and no EXIF handling: the stored pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def exif_case() -> Case:
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the upright image
    # rotated the other way, and a viewer that honours the tag shows it upright again.
    upright = sample(2)
    stored = upright.image.transpose(Image.Transpose.ROTATE_90)
    data = with_orientation(stored, 6)
    shown = pixels_of(data).transpose(Image.Transpose.ROTATE_270)
    return Case(
        "exif_rotated_jpeg", OK, 200, body=data, same_as=encode(shown),
        differs_from=encode(pixels_of(data)), label=upright.label,
    )  # fmt: skip


def animated_gif_case() -> Case:
    first, second = (
        sample(3),
        next(s for s in (sample(i) for i in range(4, 40)) if s.label != sample(3).label),
    )
    data = encode(
        first.image, "GIF", save_all=True, append_images=[second.image], duration=100, loop=0
    )
    with Image.open(io.BytesIO(data)) as gif:
        frames = [gif.convert("RGB")]
        gif.seek(1)
        frames.append(gif.convert("RGB"))
    return Case(
        "animated_gif", OK, 200, body=data, same_as=encode(frames[0]),
        differs_from=encode(frames[1]), label=first.label,
        extra={"second_label": second.label},
    )  # fmt: skip


def transparent_border(image: Image.Image, width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """RGBA pixels with a fully transparent border, and the same over white."""
    rgba = np.dstack([np.asarray(image), np.full(image.size[::-1], 255, np.uint8)])
    rgba[:width, :, 3] = rgba[-width:, :, 3] = rgba[:, :width, 3] = rgba[:, -width:, 3] = 0
    over_white = rgba[..., :3].copy()
    over_white[rgba[..., 3] == 0] = 255
    return rgba, over_white


def palette_case() -> Case:
    s = sample(5)
    indexed = s.image.quantize(colors=255)
    pixels = np.asarray(indexed).copy()
    pixels[:4, :] = 255  # index 255 is the transparent entry
    palette = indexed.getpalette()[: 255 * 3] + [0, 0, 0]
    image = Image.fromarray(pixels, "P")
    image.putpalette(palette)
    reference = np.asarray(image.convert("RGB")).copy()
    reference[:4, :] = 255
    data = encode(image, "PNG", transparency=255)
    return Case(
        "palette_with_transparency_png", OK, 200, body=data,
        same_as=encode(Image.fromarray(reference)),
    )  # fmt: skip


def good_cases() -> list[Case]:
    """Unusual but valid images: each must get the same answer as its plain RGB twin."""
    s = [sample(i) for i in range(12)]
    grey = s[0].image.convert("L")
    rgba, over_white = transparent_border(s[1].image)
    grey16 = np.asarray(s[4].image.convert("L")).astype(np.uint16) * 257  # full 16-bit scale
    huge = s[7].image.resize((6000, 6000), Image.Resampling.BILINEAR)
    return [
        Case("grayscale_png", OK, 200, body=encode(grey), same_as=encode(grey.convert("RGB"))),
        Case("rgba_png", OK, 200, body=encode(Image.fromarray(rgba, "RGBA")), same_as=encode(Image.fromarray(over_white))),
        palette_case(),
        Case("grayscale_16bit_png", OK, 200, body=encode(Image.fromarray(grey16)), same_as=encode(s[4].image.convert("L").convert("RGB"))),
        Case("cmyk_jpeg", OK, 200, body=encode(s[6].image.convert("CMYK"), "JPEG", quality=95), label=s[6].label),
        exif_case(),
        animated_gif_case(),
        Case("webp_lossless", OK, 200, body=encode(s[8].image, "WEBP", lossless=True), same_as=encode(s[8].image), label=s[8].label),
        Case("webp_lossy", OK, 200, body=encode(s[8].image, "WEBP", quality=90), label=s[8].label),
        Case("tiff", OK, 200, body=encode(s[9].image, "TIFF", compression="tiff_deflate"), same_as=encode(s[9].image), label=s[9].label),
        Case("bmp", OK, 200, body=encode(s[10].image, "BMP"), same_as=encode(s[10].image), label=s[10].label),
        Case("huge_real_image_36mpx", OK, 200, body=encode(huge, "JPEG", quality=85), label=s[7].label),
        Case("one_pixel", OK, 200, body=encode(Image.new("RGB", (1, 1), (200, 30, 30)))),
        Case("huge_topk_is_capped", OK, 200, form={"data": encode(s[11].image), "topk": b"1000"}, same_as=encode(s[11].image), label=s[11].label, topk=len(CLASSES)),
        Case("json_with_target_and_topk", OK, 200, content_type="application/json", body=json.dumps({"image": base64.b64encode(encode(s[11].image)).decode(), "target": CLASSES[0], "topk": 2}).encode(), label=s[11].label, topk=2),
        Case("json_utf8_bom", OK, 200, content_type="application/json", body=b"\xef\xbb\xbf" + json.dumps({"image": base64.b64encode(encode(s[11].image)).decode()}).encode(), same_as=encode(s[11].image), label=s[11].label),
        Case("json_utf16_le_bom", OK, 200, content_type="application/json", body=json.dumps({"image": base64.b64encode(encode(s[11].image)).decode()}).encode("utf-16"), same_as=encode(s[11].image), label=s[11].label),
        Case("json_utf16_be", OK, 200, content_type="application/json", body=json.dumps({"image": base64.b64encode(encode(s[11].image)).decode(), "topk": 1}).encode("utf-16-be"), label=s[11].label, topk=1),
        Case("accept_png", OK, 200, body=encode(s[11].image), accept="image/png"),
        # TorchServe's frontend drops the query string of /predictions: the option never arrives.
        Case("options_in_query_string_are_ignored", OK, 200, body=encode(s[11].image), query="topk=1", same_as=encode(s[11].image), label=s[11].label, topk=DEFAULT_TOPK),
        Case("json_data_url", OK, 200, content_type="application/json", body=json.dumps({"image": "data:image/png;base64," + base64.b64encode(encode(s[11].image)).decode()}).encode(), same_as=encode(s[11].image), label=s[11].label),
    ]  # fmt: skip


def bad_cases(max_request_size: int) -> list[Case]:
    """Inputs that must get their defined 4xx."""
    png = encode(sample(0).image)
    jpeg = encode(sample(0).image, "JPEG", quality=90)
    b64 = base64.b64encode(png).decode()

    def json_body(payload) -> bytes:
        return json.dumps(payload).encode()

    j = "application/json"
    return [
        Case("empty_body", "empty_body", 400, body=b""),
        Case("empty_multipart_file", "empty_body", 400, form={"data": b""}),
        Case("plain_text", "undecodable_image", 422, body=b"hello, this is not an image\n", content_type="text/plain"),
        Case("html", "unsupported_format", 415, body=b"<!doctype html><html><body>hi</body></html>", content_type="text/html"),
        Case("svg", "unsupported_format", 415, body=b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="20"/></svg>', content_type="image/svg+xml"),
        Case("svg_with_bom", "unsupported_format", 415, body=b'\xef\xbb\xbf<svg xmlns="http://www.w3.org/2000/svg"/>'),
        Case("pdf", "unsupported_format", 415, body=b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
        Case("binary_garbage", "undecodable_image", 422, body=bytes(range(256)) * 4),
        Case("truncated_png", "undecodable_image", 422, body=png[: len(png) // 2]),
        Case("truncated_png_header", "undecodable_image", 422, body=png[:20]),
        Case("truncated_jpeg", "undecodable_image", 422, body=jpeg[: len(jpeg) // 2]),
        Case("png_bad_header_crc", "undecodable_image", 422, body=corrupt_png_crc(png, b"IHDR")),
        Case("png_bad_data_crc", "undecodable_image", 422, body=corrupt_png_crc(png, b"IDAT")),
        Case("png_decompression_bomb", "image_too_large", 413, body=png_bomb()),
        Case("gif_decompression_bomb", "image_too_large", 413, body=gif_bomb()),
        Case("png_over_max_pixels", "image_too_large", 413, body=encode(Image.new("L", (8000, 6000)))),
        Case("invalid_json", "invalid_json", 400, body=b'{"image": "abc", ', content_type=j),
        Case("json_list", "invalid_json", 400, body=b"[1, 2, 3]", content_type=j),
        Case("json_huge_integer", "invalid_json", 400, body=b'{"image": "' + b64.encode() + b'", "topk": 1' + b"0" * 5000 + b"}", content_type=j),
        Case("invalid_base64", "invalid_base64", 400, body=json_body({"image": "!!not*base64!!"}), content_type=j),
        Case("base64_not_a_string", "invalid_base64", 400, body=json_body({"image": 12345}), content_type=j),
        Case("json_without_image", "missing_image", 400, body=json_body({"target": 1}), content_type=j),
        Case("json_unknown_option", "unknown_option", 400, body=json_body({"image": b64, "colour": "red"}), content_type=j),
        Case("form_unknown_option", "unknown_option", 400, form={"data": png, "explain_harder": b"1"}),
        Case("form_without_image", "missing_image", 400, form={"target": b"1", "topk": b"2"}),
        Case("unknown_target_label", "unknown_target", 400, body=json_body({"image": b64, "target": "hexagon"}), content_type=j),
        Case("target_index_out_of_range", "unknown_target", 400, body=json_body({"image": b64, "target": len(CLASSES)}), content_type=j),
        Case("negative_target_index", "unknown_target", 400, form={"data": png, "target": b"-1"}),
        Case("target_not_a_number_or_label", "bad_option", 400, body=json_body({"image": b64, "target": [1]}), content_type=j),
        Case("unicode_digit_target", "unknown_target", 400, form={"data": png, "target": "\u00b2".encode()}),
        Case("negative_topk", "bad_option", 400, body=json_body({"image": b64, "topk": -3}), content_type=j),
        Case("zero_topk", "bad_option", 400, form={"data": png, "topk": b"0"}),
        Case("huge_topk", "bad_option", 400, body=json_body({"image": b64, "topk": 10**12}), content_type=j),
        Case("unicode_digit_topk", "bad_option", 400, form={"data": png, "topk": "\u00b2".encode()}),
        Case("bad_images_flag", "bad_option", 400, body=json_body({"image": b64, "images": "maybe"}), content_type=j),
        Case("json_nested_500_deep_target", "bad_option", 400, body=nested_json(b64, "target", 500), content_type=j),
        Case("json_nested_1000_deep_target", "invalid_json", 400, body=nested_json(b64, "target", 1000), content_type=j),
        Case("json_nested_100000_deep_maps", "invalid_json", 400, body=nested_json(b64, "maps", 100_000, "{\"a\":", "}"), content_type=j),
        Case("json_not_an_object", "invalid_json", 400, body=b'"just a string"', content_type=j),
        Case("json_not_utf", "invalid_json", 400, body=b'{"image": "\xff\xfe\xfd"}', content_type=j),
        Case("json_repeated_image_key", "invalid_json", 400, body=f'{{"image": "{b64}", "image": "{b64}"}}'.encode(), content_type=j),
        Case("json_repeated_nested_key", "invalid_json", 400, body=f'{{"image": {{"b64": "{b64}", "b64": "{b64}"}}}}'.encode(), content_type=j),
        Case("json_control_character_target", "unknown_target", 400, body=json_body({"image": b64, "target": "\x7f\x01" * 50_000}), content_type=j),
        Case("json_long_list_target", "bad_option", 400, body=json_body({"image": b64, "target": [0] * 100_000}), content_type=j),
        Case("json_many_unknown_fields", "unknown_option", 400, body=json_body({"image": b64, **{f"field{i}": i for i in range(20_000)}}), content_type=j),
        Case("form_two_data_files", "missing_image", 400, parts=(("data", png), ("data", encode(sample(1).image)))),
        Case("form_repeated_option", "bad_option", 400, parts=(("data", png), ("topk", b"1"), ("topk", b"2"))),
        Case("body_over_max_request_size", FRONTEND_413, 413, body=b"\x89PNG\r\n\x1a\n" + b"\x00" * max_request_size),
    ]  # fmt: skip


def nested_json(b64: str, option: str, depth: int, opening: str = "[", closing: str = "]") -> bytes:
    """A JSON body whose ``option`` is a value nested ``depth`` levels deep."""
    value = opening * depth + "0" + closing * depth
    return f'{{"image": "{b64}", "{option}": {value}}}'.encode()


def build_corpus(max_request_size: int = 10 * 1024 * 1024) -> list[Case]:
    """Every case, good first; names are unique."""
    cases = good_cases() + bad_cases(max_request_size)
    assert len({c.name for c in cases}) == len(cases)
    return cases


def write_corpus(out: Path, cases: list[Case]) -> None:
    """One file per body (forms as one file per field) and a manifest of expectations."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for case in cases:
        entry = {"name": case.name, "expect": case.expect, "status": case.status}
        entry.update({k: v for k, v in (("accept", case.accept), ("query", case.query)) if v})
        if case.parts is not None:
            entry["parts"] = []
            for number, (key, value) in enumerate(case.parts):
                (out / f"{case.name}.{number}.{key}").write_bytes(value)
                entry["parts"].append([key, f"{case.name}.{number}.{key}"])
        elif case.form is not None:
            entry["form"] = {}
            for key, value in case.form.items():
                (out / f"{case.name}.{key}").write_bytes(value)
                entry["form"][key] = f"{case.name}.{key}"
        else:
            (out / f"{case.name}.bin").write_bytes(case.body or b"")
            entry.update(file=f"{case.name}.bin", content_type=case.content_type)
        manifest.append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write_corpus(Path(sys.argv[1]), build_corpus())
    print(f"wrote {len(build_corpus())} cases to {sys.argv[1]}")
