"""``camserve``: build archives, calibrate them, and call a server.

camserve archive --model-dir models/shapes --name shapes --export-path model_store
camserve archive --arch resnet50 --weights my.pth
camserve archive --arch timm:convnext_tiny --weights model.safetensors --labels labels.txt
camserve archive --pretrained ./my-vit    # a save_pretrained or save_for_hf folder
camserve calibrate model_store/resnet50.mar ./images
camserve predict examples/*.png --out .run/overlays   # table + overlay PNGs
camserve report examples/ --out .run/report              # a page: .run/report/index.html
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROGRESS_MIN_IMAGES = 8


MODEL_OPTIONS = (
    "weights", "labels", "target_layer", "input_size", "resize", "center_crop", "mean", "std",
    "model_class", "topk", "batch_size", "target_layout",
    "multi_label", "threshold", "label_thresholds",
)  # fmt: skip


def _archive(args: argparse.Namespace) -> int:
    from camserve.tools.archive import build_archive, build_model_archive, make_preprocessing

    given = [f"--{k.replace('_', '-')}" for k in MODEL_OPTIONS if getattr(args, k) is not None]
    if args.model_dir is not None:
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply with --arch, --model-file or --pretrained"
            )
        name = args.name or args.model_dir.name
        path = build_archive(args.model_dir, name, args.export_path, args.version)
        print(f"wrote {path}")
        return 0
    timm = (args.arch or "").startswith("timm:")
    # What a library's own config decides: a timm model's pipeline (but for its input size
    # and normalisation, as timm's scripts allow), everything of a saved folder.
    decided = {"resize", "center_crop", "model_class"} | (
        {"weights", "input_size", "mean", "std"} if args.pretrained is not None else set()
    )
    if timm or args.pretrained is not None:
        refused = [f"--{k.replace('_', '-')}" for k in sorted(decided) if getattr(args, k)]
        if refused:
            source = "a timm model's" if timm else "a --pretrained folder's"
            raise ValueError(f"{source} own config decides that: drop {', '.join(refused)}")
    model: dict = {
        "labels": args.labels,
        "target_layer": args.target_layer,
        "target_layout": args.target_layout,
        "topk": args.topk or 5,
        "serving": {"batchSize": args.batch_size} if args.batch_size else None,
        "multi_label": bool(args.multi_label),
        "presence_threshold": args.threshold,
        "label_thresholds": args.label_thresholds,
    }
    if args.pretrained is not None:
        model["pretrained"] = args.pretrained
        default_name = args.pretrained.resolve().name
    elif timm:
        size = _size(args.input_size) if args.input_size else None
        model.update(
            weights=args.weights,
            architecture=args.arch,
            data_config={
                "input_size": (size, size) if isinstance(size, int) else size,
                "mean": args.mean,
                "std": args.std,
            },
        )
        default_name = args.arch.removeprefix("timm:")
    else:
        crop = args.center_crop
        model.update(
            weights=args.weights,
            architecture=args.arch,
            model_file=args.model_file,
            model_class=args.model_class,
            preprocessing=make_preprocessing(
                input_size=_size(args.input_size or "224"),
                resize=_size(args.resize) if args.resize else None,
                center_crop=None if crop in (None, "none") else _size(crop),
                crop=crop != "none",
                **{k: getattr(args, k) for k in ("mean", "std") if getattr(args, k) is not None},
            ),
        )
        default_name = (args.arch or args.model_class or "model").lower()
    name = args.name or re.sub(r"[^A-Za-z0-9_-]", "_", default_name)
    path, summary = build_model_archive(name, args.export_path, args.version, **model)
    print(summary.describe())
    print(f"wrote {path}")
    return 0


def _size(text: str) -> int | tuple[int, int]:
    """``224`` (an int) or ``224x192`` (an (H, W) pair)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"expected a size like 224 or 224x192, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 2:
        raise ValueError(f"expected a size like 224 or 224x192, got {text!r}")
    return parts[0], parts[1]


def _calibrate(args: argparse.Namespace) -> int:
    from camserve.explainer import load_sanity
    from camserve.tools import calibrate, sanity

    if args.sanity_images is None:
        args.sanity_images = sanity.DEFAULT_IMAGES
    if args.sanity_images < 1:
        raise ValueError(f"--sanity-images must be at least 1, got {args.sanity_images}")
    if args.sanity_seed is None:
        args.sanity_seed = sanity.DEFAULT_SEED

    if args.model_dir is not None and args.images is None and args.archive is not None:
        args.images, args.archive = args.archive, None  # calibrate --model-dir DIR IMAGES
    if (args.model_dir is None) == (args.archive is None):
        raise ValueError("give an archive (.mar) and an image folder, or --model-dir DIR IMAGES")
    if args.images is None:
        raise ValueError("give a folder of calibration images")
    if args.model_dir is not None:
        files = calibrate.image_files(args.images)[: args.limit]
        images = calibrate.read_images(files, args.max_pixels, args.skip_unreadable)
        stats = calibrate.calibrate_model_dir(
            args.model_dir, images, f"{len(files)} files under {args.images}", len(files),
            args.batch_size,
            baseline_images=calibrate.read_images(files, args.max_pixels, args.skip_unreadable),
            device=args.device, sanity_images=args.sanity_images, sanity_seed=args.sanity_seed,
        )  # fmt: skip
        written = args.model_dir / calibrate.CALIBRATION_FILE
        _print_sanity(load_sanity(written))
        print(f"wrote {written} ({stats.count} images)")
        return 0
    path, stats, checked = calibrate.calibrate_archive(
        args.archive,
        args.images,
        export_path=args.export_path,
        name=args.name,
        batch_size=args.batch_size,
        limit=args.limit,
        skip_unreadable=args.skip_unreadable,
        device=args.device,
        sanity_images=args.sanity_images,
        sanity_seed=args.sanity_seed,
    )
    _print_sanity(checked)
    print(f"calibrated on {stats.count} images; wrote {path}")
    return 0


def _print_sanity(result) -> None:
    """The sanity check's one-line summary (``camserve.sanity.SanityResult``), if any."""
    if result is not None:
        print(result.log_line())


def _kserve_bundle(args: argparse.Namespace) -> int:
    from camserve.tools.kserve_bundle import build_bundle

    out = build_bundle(args.model_dir, args.name or args.model_dir.name, args.out)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path}  ({path.stat().st_size} bytes)")
    print(f"\nCopy {out}/ to your storageUri (e.g. gs://bucket/camserve/) and apply")
    print("config/kserve/inferenceservice.yaml with storageUri pointing there.")
    return 0


def _progress(total: int):
    """A tqdm bar on stderr for runs of PROGRESS_MIN_IMAGES images or more, else None."""
    if total < PROGRESS_MIN_IMAGES:
        return None
    from tqdm import tqdm

    def progress(results):
        # disable=None: a bar on a terminal only, never in pipes or logs.
        return tqdm(results, total=total, unit="image", file=sys.stderr, disable=None)

    return progress


def _input_files(images: list[Path]) -> list[Path]:
    """The files given, with each folder replaced by the images under it (sorted)."""
    from camserve.tools.client import image_files

    files = []
    for path in images:
        files += image_files(path) if path.is_dir() else [path]
    return files


def _client(args: argparse.Namespace):
    """The client the options of ``predict`` and ``report`` describe."""
    from camserve.tools.client import (
        DEFAULT_MAX_REQUEST_SIZE,
        Client,
        find_token,
        max_request_size_from_config,
    )

    limit = args.max_request_size
    if limit is None:
        limit = (
            max_request_size_from_config(args.server_config)
            if args.server_config is not None
            else DEFAULT_MAX_REQUEST_SIZE
        )
    if limit <= 0:
        raise ValueError(f"the max_request_size must be a positive number of bytes, got {limit}")
    token = find_token(None, args.key_file)
    return Client(
        args.url, args.model, token, args.timeout, max_request_size=limit, protocol=args.protocol
    )


def _predict(args: argparse.Namespace) -> int:
    """Explain images on a running server: a table on stdout, overlays in --out.

    Exit code 0: every image answered; 1: some images failed (their rows say why); 2: the
    run stopped (no server, no token, no such model) or could not start."""
    from camserve.tools.client import (
        ClientError,
        RunStopped,
        format_table,
        predict_files,
        write_csv,
    )

    paths = _input_files(args.images)
    try:
        client = _client(args)
        outcomes = predict_files(
            client, paths, args.out, args.target, args.concurrency, _progress(len(paths))
        )
    except RunStopped as err:
        # The rows already answered are printed; the images not sent are listed as such.
        if any(not o.stopped for o in err.outcomes):
            print(format_table(err.outcomes))
        unsent = sum(1 for o in err.outcomes if o.stopped)
        print(
            f"camserve predict: error: {err} ({unsent} of {len(paths)} image(s) not sent)",
            file=sys.stderr,
        )
        return 2
    except ClientError as err:
        print(f"camserve predict: error: {err}", file=sys.stderr)
        return 2
    print(format_table(outcomes))
    if args.csv is not None:
        rows = write_csv(outcomes, args.csv)
        print(f"\nwrote {rows} row(s), one per image and explained label, to {args.csv}")
    if args.out is not None:
        written = sum(len(o.overlays) // 2 for o in outcomes)
        print(f"\nwrote {written} overlay pair(s) (*.overlay.png, *.shifted.png) to {args.out}")
    failed = sum(1 for o in outcomes if not o.ok)
    if failed:
        print(f"camserve predict: {failed} of {len(outcomes)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    """Explain images on a running server and write a page to review them: --out/index.html.

    Exit codes as ``predict``; a run that stops early still writes its page."""
    from camserve.tools.client import ClientError
    from camserve.tools.report import run_report

    if args.maps is not None and args.maps < 1:
        raise ValueError(f"--maps must be at least 1, got {args.maps}")
    paths = _input_files(args.images)
    try:
        client = _client(args)
        report = run_report(
            client, paths, args.out, args.target, args.maps, args.concurrency,
            _progress(len(paths)),
        )  # fmt: skip
    except ClientError as err:
        print(f"camserve report: error: {err}", file=sys.stderr)
        return 2
    cards = sum(len(e.cards) for e in report.entries)
    print(
        f"wrote {report.page}: {len(paths)} image(s), {cards} explanation(s), "
        f"{report.failed} failed"
    )
    if report.stopped is not None:
        unsent = sum(1 for o in report.outcomes if o.stopped)
        print(
            f"camserve report: error: {report.stopped} ({unsent} of {len(paths)} image(s) "
            "not sent)",
            file=sys.stderr,
        )
        return 2
    if report.failed:
        print(f"camserve report: {report.failed} of {len(paths)} image(s) failed", file=sys.stderr)
    return 1 if report.failed else 0


def _client_options(parser: argparse.ArgumentParser) -> None:
    """The options ``predict`` and ``report`` share: where the server is and how to ask it."""
    from camserve.tools.client import DEFAULT_KEY_FILE, DEFAULT_URL, PROTOCOLS

    parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files, or folders of them"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's inference address")
    parser.add_argument("--model", default="shapes")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=PROTOCOLS[0],
        help="TorchServe's /predictions API (default), or a KServe v1/v2 endpoint",
    )
    parser.add_argument(
        "--target",
        help="class label or index to explain (default: top-1); for a multi-label model, "
        "several labels separated by commas (default: every present label)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (1-32)")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--max-request-size",
        type=int,
        metavar="BYTES",
        help="the server's max_request_size: larger requests are refused before sending "
        "(default: --server-config's, else 10485760 as in camserve's configs)",
    )
    size.add_argument(
        "--server-config",
        type=Path,
        metavar="PROPERTIES",
        help="the server's config.properties, read for max_request_size",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    archive = commands.add_parser(
        "archive",
        help="pack a model folder, a torchvision or timm architecture / custom class and its "
        "weights, or a saved transformers/timm folder, into a .mar",
    )
    source = archive.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a folder with model-config.yaml")
    source.add_argument(
        "--arch",
        help="a torchvision classification model (resnet50), or timm:NAME (timm:convnext_tiny)",
    )
    source.add_argument("--model-file", type=Path, help="a .py file defining an nn.Module")
    source.add_argument(
        "--pretrained",
        type=Path,
        metavar="DIR",
        help="a saved folder: transformers' save_pretrained or timm's save_for_hf layout",
    )
    archive.add_argument("--model-class", help="the nn.Module class in --model-file")
    archive.add_argument(
        "--weights",
        type=Path,
        help=".safetensors (recommended), a state_dict or a training checkpoint (weights_only)",
    )
    archive.add_argument(
        "--labels", type=Path, help="index_to_name.json or one label a line (overrides a folder's)"
    )
    archive.add_argument("--target-layer", help="Grad-CAM layer (default: picked automatically)")
    archive.add_argument(
        "--target-layout",
        help="how the target layer's output holds its grid, for a model whose family camserve "
        "does not know: nchw, nhwc, tokens (N, h*w, C), cls_tokens (N, 1 + h*w, C) or "
        "prefixK_tokens (N, K + h*w, C)",
    )  # fmt: skip
    archive.add_argument("--input-size", help="network input, 224 or HxW (default 224)")
    archive.add_argument("--resize", help="shorter side (256) or HxW (default input*256/224)")
    archive.add_argument("--center-crop", help="HxW (default: the input size), or none")
    archive.add_argument("--mean", type=float, nargs=3, help="R G B (default: ImageNet)")
    archive.add_argument("--std", type=float, nargs=3, help="R G B (default: ImageNet)")
    archive.add_argument("--topk", type=int, help="classes listed per answer (default 5)")
    # default=None: a flag not given is told apart from one given, as for the options above.
    archive.add_argument(
        "--multi-label",
        action="store_true",
        default=None,
        help="a sigmoid head: every label scored on its own, each present label explained "
        "(model-config.yaml: multi_label: true; a transformers folder whose config says "
        "problem_type multi_label_classification is one without the flag)",
    )
    archive.add_argument(
        "--threshold",
        type=float,
        help="with --multi-label: a label is present at probability >= this, in (0, 1) "
        "(default 0.5; model-config.yaml: presence_threshold)",
    )
    archive.add_argument(
        "--label-thresholds",
        type=Path,
        metavar="FILE",
        help="with --multi-label: a JSON object label -> threshold for the labels that need "
        "their own (shipped as label_thresholds.json)",
    )
    archive.add_argument("--batch-size", type=int, help="TorchServe batchSize (default 8)")
    archive.add_argument("--name", help="model name (default: the folder, arch or class)")
    archive.add_argument("--export-path", type=Path, default=Path("model_store"))
    archive.add_argument("--version", default="1.0")
    archive.set_defaults(run=_archive)

    calibrate = commands.add_parser(
        "calibrate",
        help="per-channel mean/std at the target layer over a set of images -> new archive",
    )
    calibrate.add_argument("archive", type=Path, nargs="?", help="the .mar to calibrate")
    calibrate.add_argument("images", type=Path, nargs="?", help="a folder of images")
    calibrate.add_argument("--model-dir", type=Path, help="calibrate a model folder in place")
    calibrate.add_argument("--name", help="new model name (default <name>_calibrated)")
    calibrate.add_argument("--export-path", type=Path, help="default: the archive's folder")
    calibrate.add_argument("--batch-size", type=int, default=32)
    calibrate.add_argument("--limit", type=int, help="use at most this many images")
    calibrate.add_argument("--skip-unreadable", action="store_true")
    calibrate.add_argument("--max-pixels", type=int, default=40_000_000)
    calibrate.add_argument(
        "--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 (default cpu)"
    )
    calibrate.add_argument(
        "--sanity-images", type=int,
        help="images of the sanity check: the first of the calibration images (default 48)",
    )  # fmt: skip
    calibrate.add_argument(
        "--sanity-seed", type=int, help="seed of its re-initialisation (default 0)"
    )
    calibrate.set_defaults(run=_calibrate)

    bundle = commands.add_parser(
        "kserve-bundle",
        help="the storage layout of KServe's TorchServe runtime: config/ + model-store/*.mar",
    )
    bundle.add_argument("--model-dir", type=Path, required=True, help="a model folder")
    bundle.add_argument("--name", help="model name (default: the folder's name)")
    bundle.add_argument("--out", type=Path, default=Path("kserve-bundle"))
    bundle.set_defaults(run=_kserve_bundle)

    from camserve.tools.client import TOKEN_ENV

    predict = commands.add_parser(
        "predict",
        help="explain images on a running server",
        description=f"Post images, print file/label/probability/score/stable (a multi-label "
        f"model: one row per explained label, with present), save overlays. "
        f"The token comes from ${TOKEN_ENV}, else from --key-file.",
    )
    _client_options(predict)
    predict.add_argument("--out", type=Path, help="write <name>.overlay.png and .shifted.png here")
    predict.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write one row per image and label here"
    )
    predict.set_defaults(run=_predict)

    report = commands.add_parser(
        "report",
        help="explain images on a running server and write a page to review them",
        description=f"Post images as predict does and write OUT/index.html: a summary and "
        f"one card per image and explained class, least stable first. The token comes from "
        f"${TOKEN_ENV}, else from --key-file.",
    )
    _client_options(report)
    report.add_argument("--out", type=Path, required=True, help="the report's folder")
    report.add_argument(
        "--maps",
        type=int,
        help="explain this many classes of each image (1-5; default: the server's, 1)",
    )
    report.set_defaults(run=_report)

    args = parser.parse_args(argv)
    from camserve.sources import MissingExtra

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError, MissingExtra) as err:
        print(f"camserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
