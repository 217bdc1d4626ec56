"""``camserve``: build archives, run a local server, and call it.

camserve archive --model-dir models/shapes --name shapes --export-path model_store
camserve serve    # starts TorchServe in the background and prints a request to paste
camserve stop
camserve predict examples/*.png --out .run/overlays   # table + overlay PNGs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_WORKDIR = Path(".run/serve")
PROGRESS_MIN_IMAGES = 8


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


def _predict(args: argparse.Namespace) -> int:
    """Explain images on a running server: a table on stdout, overlays in --out."""
    from tqdm import tqdm

    from camserve.client import Client, ClientError, find_token, format_table, predict_files

    paths = [Path(p) for p in args.images]

    def progress(results):
        # disable=None: a bar on a terminal only, never in pipes or logs.
        return tqdm(results, total=len(paths), unit="image", file=sys.stderr, disable=None)

    try:
        client = Client(args.url, args.model, find_token(None, args.key_file), args.timeout)
        outcomes = predict_files(
            client, paths, args.out, args.target, args.concurrency,
            progress if len(paths) >= PROGRESS_MIN_IMAGES else None,
        )  # fmt: skip
    except ClientError as err:
        print(f"camserve predict: error: {err}", file=sys.stderr)
        return 2
    print(format_table(outcomes))
    if args.out is not None:
        written = sum(1 for o in outcomes if o.overlays)
        print(f"\nwrote {written} overlay pair(s) (*.overlay.png, *.shifted.png) to {args.out}")
    return 0 if all(o.ok for o in outcomes) else 1


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

    from camserve.client import DEFAULT_KEY_FILE, DEFAULT_URL, TOKEN_ENV

    predict = commands.add_parser(
        "predict",
        help="explain images on a running server",
        description=f"Post images, print file/label/probability/score/stable, save overlays. "
        f"The token comes from ${TOKEN_ENV}, else from --key-file.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--url", default=DEFAULT_URL, help="TorchServe inference address")
    predict.add_argument("--model", default="shapes")
    predict.add_argument("--out", type=Path, help="write <name>.overlay.png and .shifted.png here")
    predict.add_argument("--target", help="class label or index to explain (default: top-1)")
    predict.add_argument("--concurrency", type=int, default=4, help="requests in flight (1-32)")
    predict.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE)
    predict.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    predict.set_defaults(run=_predict)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"camserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
