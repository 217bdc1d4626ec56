"""Wire formats: each reads one TorchServe item into requests and writes their outcomes back.

A protocol is one small object per item. ``pick_protocol`` gives each item the first format
that claims it: a KServe v2 body (REST or gRPC), a KServe v1 body, else TorchServe's plain
body (raw image, JSON or multipart form, with ``Accept: image/png``). Then::

    requests = protocol.read(item, headers)   # [ParsedRequest | InputError], one per image
    reply = protocol.write(outcomes)          # outcomes: [Explanation | InputError], in order
    reply = protocol.refuse(error)            # the whole item refused (an answer too large)

Nothing here imports TorchServe: ``headers`` is any object with ``get(name)`` and
``request_id`` (``handlers/torchserve_internals.ItemHeaders`` under TorchServe).
"""

from __future__ import annotations

from camserve.protocols.base import Headers, ModelIdentity, Outcome, Protocol, Reply
from camserve.protocols.kserve_v1 import KServeV1
from camserve.protocols.kserve_v2 import KServeV2
from camserve.protocols.plain import PlainBody

# In the order they are asked: a KServe body is JSON that would also read as a plain body.
PROTOCOLS: tuple[type[Protocol], ...] = (KServeV2, KServeV1, PlainBody)

__all__ = [
    "PROTOCOLS",
    "Headers",
    "KServeV1",
    "KServeV2",
    "ModelIdentity",
    "Outcome",
    "PlainBody",
    "Protocol",
    "Reply",
    "pick_protocol",
]


def pick_protocol(item: object, model: ModelIdentity) -> Protocol:
    """The protocol of the first format in ``PROTOCOLS`` that claims ``item``."""
    for protocol in PROTOCOLS:
        claimed = protocol.claim(item, model)
        if claimed is not None:
            return claimed
    raise AssertionError("PlainBody claims every item")  # pragma: no cover
