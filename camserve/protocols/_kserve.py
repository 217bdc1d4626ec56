"""What KServe v1 and v2 share: how their bodies arrive, and the error contract.

Under KServe's TorchServe runtime a Python wrapper (kserve 0.13) fronts TorchServe and forwards
each request unchanged in shape (docs/deployment.md). A REST body arrives as
``{"body": dict}`` (or bytes, for the wrapper's v1 explain call, which sends no
Content-Type); the wrapper's gRPC call arrives as ``{"data": bytes}``. camserve reads these
bodies itself (TorchServe's ``kserve``/``kservev2`` envelopes are off): the envelopes drop
request-level parameters and answer only the first request of a batch.

The error contract: kserve 0.13 turns every non-200 from TorchServe into a 500 with the body
flattened into a string, so a client could not tell its own mistake from a server fault. A
client mistake is therefore answered with 200 and a typed error, while a server fault keeps
its 5xx status (so KServe's 500 and the 5xx alerts mean a server problem).
"""

from __future__ import annotations

from collections.abc import Sequence

from camserve.errors import InputError
from camserve.request import parse_json_body


def json_body(item: object) -> tuple[dict, bool] | None:
    """(the JSON object of a single-field item, whether it came through gRPC), or None."""
    if not isinstance(item, dict) or len(item) != 1:
        return None
    [(key, payload)] = item.items()
    if key not in ("body", "data"):
        return None
    if isinstance(payload, dict):
        return payload, False
    if isinstance(payload, bytes | bytearray | str) and payload[:1] in (b"{", "{"):
        try:  # hardened parsing (depth, encodings); a bad body is left to the plain parser
            body = parse_json_body(payload)
        except InputError:
            return None
        return body, key == "data" and isinstance(payload, bytes | bytearray)
    return None


def status(errors: Sequence[InputError]) -> tuple[int, str]:
    """(HTTP status, reason phrase): 200 for client mistakes, the worst 5xx for faults."""
    worst = max([200] + [e.status for e in errors if e.status >= 500])
    return worst, "OK" if worst == 200 else "camserve error"
