"""What camserve relies on inside TorchServe 0.12.0, beyond its documented handler API.

Written against TorchServe 0.12.0 (``TORCHSERVE_VERSION``); tests/test_torchserve_internals.py
fails loudly when the installed TorchServe differs in any of these points:

- ``decode_input_request``: the worker parses ``application/json`` bodies before the handler
  unless ``TS_DECODE_INPUT_REQUEST`` is ``false`` (read per request in
  ``ts.protocol.otf_message_handler._retrieve_input_data``). camserve reads JSON itself.
- ``Service.retrieve_data_for_inference(batch)`` merges each request's form fields into one
  dict, so of two files named ``data`` only the last arrives; camserve wraps it to record
  the names sent more than once, in a request header that the plain protocol reads.
- ``max_response_size``: the frontend drops a worker's whole reply when one answer is longer;
  the worker is not told the limit, so it is read from the frontend's config file (the
  ``-f`` argument of the Java process among the worker's ancestors) or the environment.
- Per-item replies: ``context.set_response_status``/``set_response_content_type`` by index.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from camserve.properties import load_properties
from camserve.protocols import Reply
from camserve.protocols.plain import REPEATED_FIELDS_HEADER

log = logging.getLogger(__name__)

TORCHSERVE_VERSION = "0.12.0"
DECODE_INPUT_REQUEST_ENV = "TS_DECODE_INPUT_REQUEST"
DEFAULT_MAX_RESPONSE_SIZE = 6_553_500  # TorchServe's default, in bytes
MAX_RESPONSE_SIZE_ENV = "TS_MAX_RESPONSE_SIZE"
MAX_RESPONSE_SIZE_PROPERTY = "max_response_size"
FRONTEND_MAIN_CLASS = "org.pytorch.serve.ModelServer"


@dataclass(frozen=True)
class ItemHeaders:
    """The request headers and id of item ``index`` of a batch (``camserve.protocols.Headers``)."""

    context: object
    index: int

    def get(self, name: str) -> object | None:
        return self.context.get_request_header(self.index, name)

    @property
    def request_id(self) -> str:
        return self.context.get_request_id(self.index)


def install(version: str) -> None:
    """Prepare this worker's TorchServe for camserve; warn when it is not the version this
    module was written for."""
    if version != TORCHSERVE_VERSION:
        log.warning(
            "camserve was written for TorchServe %s, this is %s: see torchserve_internals",
            TORCHSERVE_VERSION,
            version,
        )
    take_json_bodies_raw()
    record_repeated_fields()


def take_json_bodies_raw() -> None:
    """Ask this worker not to parse JSON bodies before the handler: camserve's parser
    (``camserve.request.parse_json_body``) refuses repeated keys and reads UTF-16 and a byte
    order mark, where TorchServe's keeps the last key and gives up silently."""
    os.environ[DECODE_INPUT_REQUEST_ENV] = "false"


def record_repeated_fields() -> None:
    """Wrap TorchServe's merge of a request's fields to record, in a header set after the
    client's headers were copied (so a client cannot forge it), the names sent more than once."""
    from ts.service import Service

    merge = Service.retrieve_data_for_inference
    if getattr(merge, "records_repeated_fields", False):
        return

    def retrieve_data_for_inference(batch):
        headers, inputs, request_ids = merge(batch)
        try:
            for request, processor in zip(batch, headers, strict=True):
                names = Counter(p.get("name") for p in request.get("parameters") or [])
                repeated = ",".join(sorted(str(n) for n, count in names.items() if count > 1))
                processor.get_request_properties()[REPEATED_FIELDS_HEADER] = repeated
        except Exception:  # noqa: BLE001 - a changed TorchServe must not fail requests
            log.exception("cannot record repeated form fields; TorchServe keeps the last")
        return headers, inputs, request_ids

    retrieve_data_for_inference.records_repeated_fields = True
    Service.retrieve_data_for_inference = staticmethod(retrieve_data_for_inference)


def send(context, index: int, reply: Reply) -> str | bytes:
    """Set item ``index``'s content type and (when not 200) status; return its body."""
    # An envelope can hand the handler more items than requests: those have no status of
    # their own (camserve refuses envelopes, see camserve.protocols.plain).
    if index < len(context.request_processor or ()):
        context.set_response_content_type(index, reply.content_type)
        if reply.status != 200:
            context.set_response_status(reply.status, reply.phrase, idx=index)
    return reply.body


def frontend_config_path(pid: int | None = None, levels: int = 4) -> Path | None:
    """The ``-f`` config file of the TorchServe frontend among this process's ancestors
    (Linux ``/proc``); None when it cannot be found."""
    pid = os.getppid() if pid is None else pid
    for _ in range(levels):
        proc = Path("/proc") / str(pid)
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if FRONTEND_MAIN_CLASS in argv:
                if "-f" not in argv[:-1]:
                    return None
                path = Path(argv[argv.index("-f") + 1])
                return path if path.is_absolute() else Path(os.readlink(proc / "cwd")) / path
            pid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def max_response_size(
    environ: Mapping[str, str] | None = None, config_path: Path | None = None
) -> tuple[int, str]:
    """The frontend's ``max_response_size`` in bytes and where it came from (for the log):
    the smallest of ``TS_MAX_RESPONSE_SIZE`` and the config file's, else TorchServe's default."""
    environ = os.environ if environ is None else environ
    found: list[tuple[int, str]] = []
    if environ.get(MAX_RESPONSE_SIZE_ENV, "").strip().isdigit():
        found.append((int(environ[MAX_RESPONSE_SIZE_ENV]), MAX_RESPONSE_SIZE_ENV))
    if config_path is not None:
        try:
            value = load_properties(config_path).get(MAX_RESPONSE_SIZE_PROPERTY, "").strip()
        except (OSError, ValueError):
            value = ""
        if value.isdigit():
            found.append((int(value), str(config_path)))
    if not found:
        return DEFAULT_MAX_RESPONSE_SIZE, "TorchServe's default"
    return min(found)
