"""How large one answer may be: TorchServe's ``max_response_size``.

TorchServe's frontend reads each answer of a worker's reply with a length check
(``ModelResponseDecoder``): one answer longer than ``max_response_size`` makes it drop the
whole reply, the worker is restarted and every request of that batch gets "Worker died".
The limit applies to each answer on its own, not to their sum (measured on TorchServe
0.12: four 1.999 MB answers pass under a 2 MB limit, one of 2.0001 MB kills the batch).
So the handler checks every encoded answer against this limit, and an answer that does
not fit is replaced by a short ``response_too_large`` error. Where the worker finds the
limit is TorchServe's business: ``handlers/torchserve_internals.max_response_size``.
"""

from __future__ import annotations

from camserve.errors import RESPONSE_TOO_LARGE, InputError, input_error


def check_fits(size: int, limit: int) -> InputError | None:
    """The error for an answer of ``size`` bytes over ``limit``, else None."""
    if size <= limit:  # the frontend refuses only a length above the limit
        return None
    return input_error(
        RESPONSE_TOO_LARGE,
        f"the answer is {size} bytes, over the server's max_response_size of {limit}: "
        "ask for less (images=false, fewer maps, a smaller topk) or raise max_response_size",
    )
