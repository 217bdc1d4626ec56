"""Java ``.properties`` files, read as ``java.util.Properties.load`` reads them.

TorchServe's frontend reads ``config.properties`` with Java's loader, so this reader follows
its rules rather than a simpler ``key=value`` split: ``#``/``!`` comments, ``=``, ``:`` or
whitespace between key and value, a trailing backslash continuing a line, backslash escapes
(``\\t``, ``\\n``, ``\\uXXXX``, ``\\=``...), ISO-8859-1 text, and the last of repeated keys.
The worker (the size budget), the client and the development harness all use it.
"""

from __future__ import annotations

from pathlib import Path

_SEPARATORS = "=:"
_WHITESPACE = " \t\f"
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def parse_properties(text: str) -> dict[str, str]:
    """Every key and value of a properties text; a malformed ``\\u`` escape is a ValueError."""
    properties = {}
    for line in _logical_lines(text):
        key, value = _split(line)
        properties[_unescape(key)] = _unescape(value)
    return properties


def load_properties(path: str | Path) -> dict[str, str]:
    """``parse_properties`` of a file, decoded as ISO-8859-1 like ``Properties.load``."""
    return parse_properties(Path(path).read_text(encoding="latin-1"))


def _logical_lines(text: str):
    """Non-comment lines, joined across backslash continuations, leading whitespace cut."""
    pending: str | None = None
    for natural in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = natural.lstrip(_WHITESPACE)
        if pending is None and (not stripped or stripped[0] in "#!"):
            continue
        line = stripped if pending is None else pending + stripped
        trailing = len(stripped) - len(stripped.rstrip("\\"))
        if trailing % 2:  # an odd count: the last backslash escapes the line break
            pending = line[:-1]
            continue
        pending = None
        yield line
    if pending is not None:
        yield pending


def _split(line: str) -> tuple[str, str]:
    """(key, value) of a logical line: the key ends at an unescaped separator or whitespace."""
    end, escaped = 0, False
    while end < len(line):
        char = line[end]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in _SEPARATORS or char in _WHITESPACE:
            break
        end += 1
    rest = line[end:].lstrip(_WHITESPACE)
    if rest[:1] and rest[0] in _SEPARATORS:
        rest = rest[1:].lstrip(_WHITESPACE)
    return line[:end], rest


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char != "\\" or i + 1 == len(text):
            out.append(char if char != "\\" else "")
            i += 1
            continue
        following = text[i + 1]
        if following == "u":
            digits = text[i + 2 : i + 6]
            if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"malformed \\uxxxx escape: {text[i : i + 6]!r}")
            out.append(chr(int(digits, 16)))
            i += 6
        else:
            out.append(_ESCAPES.get(following, following))
            i += 2
    return "".join(out)
