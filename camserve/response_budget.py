"""How large one answer may be: TorchServe's ``max_response_size``, found from the worker.

TorchServe's frontend reads each answer of a worker's reply with a length check
(``ModelResponseDecoder``): one answer longer than ``max_response_size`` makes it drop the
whole reply, the worker is restarted and every request of that batch gets "Worker died".
The limit applies to each answer on its own, not to their sum (measured on TorchServe
0.12: four 1.999 MB answers pass under a 2 MB limit, one of 2.0001 MB kills the batch).
So the handler checks every encoded answer against this limit, and an answer that does
not fit is replaced by a short ``response_too_large`` error.

The worker is not told the limit. It is found, smallest first, in:
``TS_MAX_RESPONSE_SIZE`` (TorchServe's environment override), and the
``max_response_size`` of the config file the frontend was started with (its ``-f``
argument, read from the parent process's command line); else TorchServe's default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from camserve.errors import RESPONSE_TOO_LARGE, InputError, input_error

DEFAULT_MAX_RESPONSE_SIZE = 6_553_500  # TorchServe's default, in bytes
FRONTEND_MAIN_CLASS = "org.pytorch.serve.ModelServer"
PROPERTY = "max_response_size"


def properties_value(text: str, key: str) -> str | None:
    """``key``'s value in a Java properties text (``key=value`` lines, ``#`` comments)."""
    value = None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            name, _, found = line.partition("=")
            if name.strip() == key:
                value = found.strip()
    return value


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
    """The limit in bytes and where it came from (for the log)."""
    environ = os.environ if environ is None else environ
    found: list[tuple[int, str]] = []
    if environ.get("TS_MAX_RESPONSE_SIZE", "").strip().isdigit():
        found.append((int(environ["TS_MAX_RESPONSE_SIZE"]), "TS_MAX_RESPONSE_SIZE"))
    if config_path is not None:
        try:
            value = properties_value(config_path.read_text(errors="replace"), PROPERTY)
        except OSError:
            value = None
        if value is not None and value.isdigit():
            found.append((int(value), str(config_path)))
    if not found:
        return DEFAULT_MAX_RESPONSE_SIZE, "TorchServe's default"
    return min(found)


def check_fits(size: int, limit: int) -> InputError | None:
    """The error for an answer of ``size`` bytes over ``limit``, else None."""
    if size <= limit:  # the frontend refuses only a length above the limit
        return None
    return input_error(
        RESPONSE_TOO_LARGE,
        f"the answer is {size} bytes, over the server's max_response_size of {limit}: "
        "ask for less (images=false, fewer maps, a smaller topk) or raise max_response_size",
    )
