"""camserve/properties.py reads .properties files as java.util.Properties.load does."""

from __future__ import annotations

import pytest

from camserve.properties import load_properties, parse_properties
from tests.conftest import CONFIG, REPO


def test_separators_comments_and_whitespace():
    text = (
        "# a comment\n"
        "! another\n"
        "   \n"
        "a=1\n"
        "b = 2\n"
        "c:3\n"
        "d 4\n"
        "e\t=\t 5 \n"  # the value keeps its trailing space
        "f\n"  # a key with an empty value
        "g=h=i\n"  # only the first separator splits
        "a=last\n"  # the last of a repeated key wins
    )
    assert parse_properties(text) == {
        "a": "last", "b": "2", "c": "3", "d": "4", "e": "5 ", "f": "", "g": "h=i",
    }  # fmt: skip


def test_continuations_and_escapes():
    text = (
        "long = one, \\\n"
        "       two, \\\n"
        "  # not a comment inside a continuation\n"
        "key\\ with\\:separators = tab\\there \\u00e9\\\\\n"
        "ends\\\\\n"  # an even count of backslashes does not continue
        "next=1\r\n"
        "crlf=2\r"
        "cr=3"
    )
    assert parse_properties(text) == {
        "long": "one, two, # not a comment inside a continuation",
        "key with:separators": "tab\there \u00e9\\",
        "ends\\": "",
        "next": "1",
        "crlf": "2",
        "cr": "3",
    }


def test_a_malformed_unicode_escape_is_an_error():
    with pytest.raises(ValueError, match="uxxxx"):
        parse_properties("a=\\u00g1\n")


def test_files_are_latin_1(tmp_path):
    path = tmp_path / "config.properties"
    path.write_bytes("name=caf\xe9\n".encode("latin-1"))
    assert load_properties(path) == {"name": "café"}


def test_every_shipped_config_reads_as_before():
    """The shipped files use only ``key=value``: a plain split must agree (a regression
    guard for the configs the servers and tests read)."""
    for path in [CONFIG, *sorted((REPO / "config").rglob("*.properties"))]:
        expected = {}
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                expected[key.strip()] = value.strip()
        assert load_properties(path) == expected, path
