"""handlers/torchserve_internals.py against the installed TorchServe: each point camserve
relies on beyond TorchServe's documented handler API fails here, loudly, if TorchServe changes
it (the module names the version it was written for)."""

from __future__ import annotations

import inspect
import io
import json
import os
import struct
from unittest import mock

import ts.version
from ts.protocol import otf_message_handler
from ts.service import Service

from camserve.handlers import torchserve_internals as internals
from camserve.protocols.plain import REPEATED_FIELDS_HEADER


def test_written_for_the_installed_torchserve():
    assert ts.version.__version__ == internals.TORCHSERVE_VERSION


def _frame(name: str, content_type: str, value: bytes) -> io.BytesIO:
    """One input parameter as the frontend sends it to the worker (otf_message_handler)."""
    parts = b""
    for field in (name.encode(), content_type.encode(), value):
        parts += struct.pack("!i", len(field)) + field
    return io.BytesIO(parts)


class _Socket:
    def __init__(self, stream: io.BytesIO) -> None:
        self.stream = stream

    def recv(self, size: int) -> bytes:
        return self.stream.read(size)


def test_json_bodies_reach_the_handler_raw_once_decoding_is_off():
    body = json.dumps({"image": "abc"}).encode()
    with mock.patch.dict(os.environ):
        os.environ.pop(internals.DECODE_INPUT_REQUEST_ENV, None)
        parsed = otf_message_handler._retrieve_input_data(
            _Socket(_frame("body", "application/json", body))
        )
        assert parsed["value"] == {"image": "abc"}  # TorchServe's default: parsed
        internals.take_json_bodies_raw()
        raw = otf_message_handler._retrieve_input_data(
            _Socket(_frame("body", "application/json", body))
        )
    assert raw["value"] == body


def test_the_wrapped_merge_keeps_its_signature_and_records_repeated_fields():
    original = Service.retrieve_data_for_inference
    assert list(inspect.signature(original).parameters) == ["batch"]
    batch = [
        {
            "requestId": b"r1",
            "parameters": [
                {"name": "data", "contentType": "image/png", "value": b"first"},
                {"name": "data", "contentType": "image/png", "value": b"second"},
                {"name": "topk", "contentType": "text/plain", "value": b"2"},
            ],
            "headers": [{"name": b"Accept", "value": b"image/png"}],
        }
    ]
    headers, inputs, ids = original(batch)  # TorchServe's own merge keeps the last file
    assert inputs == [{"data": b"second", "topk": b"2"}] and ids == {0: "r1"}
    try:
        internals.record_repeated_fields()
        internals.record_repeated_fields()  # a second install does not wrap twice
        wrapped = Service.retrieve_data_for_inference
        assert wrapped.records_repeated_fields
        headers, inputs, ids = wrapped(batch)
    finally:
        Service.retrieve_data_for_inference = staticmethod(original)
    assert inputs == [{"data": b"second", "topk": b"2"}] and ids == {0: "r1"}
    [processor] = headers
    assert processor.get_request_property(REPEATED_FIELDS_HEADER) == "data"
    assert processor.get_request_property("Accept") == "image/png"


def test_the_limit_is_the_smallest_one_found(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("# max_response_size=1\nmax_response_size = 20000\nother=3\n")
    default = (internals.DEFAULT_MAX_RESPONSE_SIZE, "TorchServe's default")
    assert internals.max_response_size({}, None) == default
    assert internals.max_response_size({}, config) == (20000, str(config))
    assert internals.max_response_size({"TS_MAX_RESPONSE_SIZE": "9000"}, config)[0] == 9000
    assert internals.max_response_size({"TS_MAX_RESPONSE_SIZE": "90000"}, config)[0] == 20000
    missing = tmp_path / "missing.properties"
    assert internals.max_response_size({}, missing) == default


def test_the_frontend_config_is_found_among_the_ancestors(tmp_path):
    """The worker's parent chain holds the Java frontend started with ``-f``; a process
    without one (this test) finds none."""
    assert internals.frontend_config_path() is None
