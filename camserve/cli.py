"""``camserve``: build archives, run a local server, and (later) call it.

    camserve archive --model-dir models/shapes --name shapes --export-path model_store
    camserve serve    # starts TorchServe in the background and prints a request to paste
    camserve stop
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_WORKDIR = Path(".run/serve")


def _archive(args: argparse.Namespace) -> int:
    from camserve.archive import build_archive

    path = build_archive(args.model_dir, args.name, args.export_path, args.version)
    print(f"wrote {path}")
    return 0


def _server(args: argparse.Namespace):
    from camserve.server import LocalTorchServe

    return LocalTorchServe(
        workdir=args.workdir,
        base_config=args.config,
        model_store=args.model_store,
        models=args.models,
        foreground=False,
    )


def _serve(args: argparse.Namespace) -> int:
    server = _server(args)
    server.start(wait_for=args.models.split("=")[0])
    key_file = server.workdir / "key_file.json"
    model = args.models.split("=")[0]
    print(f"TorchServe is up: inference {server.inference_url}, metrics {server.metrics_url}")
    print(f"Tokens are in {key_file}. Post an image with:\n")
    print(
        f"  curl -s -H \"Authorization: Bearer $(python3 -c 'import json; print(json.load("
        f'open("{key_file}"))["inference"]["key"])\')" '
        f"--data-binary @examples/star.png {server.inference_url}/predictions/{model}\n"
    )
    print("Stop it with: make stop")
    return 0


def _stop(args: argparse.Namespace) -> int:
    _server(args).stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    archive = commands.add_parser("archive", help="pack a model folder into a .mar")
    archive.add_argument("--model-dir", type=Path, required=True)
    archive.add_argument("--name", required=True)
    archive.add_argument("--export-path", type=Path, default=Path("model_store"))
    archive.add_argument("--version", default="1.0")
    archive.set_defaults(run=_archive)

    for name, run, text in (
        ("serve", _serve, "start TorchServe in the background"),
        ("stop", _stop, "stop the background TorchServe"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
        sub.add_argument("--config", type=Path, default=Path("config/config.properties"))
        sub.add_argument("--model-store", type=Path, default=Path("model_store"))
        sub.add_argument("--models", default="shapes=shapes.mar")
        sub.set_defaults(run=run)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"camserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
