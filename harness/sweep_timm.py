"""Archive and explain one small model of every timm family, the way a user would.

For each family (a ``timm.models`` module) the smallest registered model (parameters counted
on the ``meta`` device, nothing allocated) is built with seeded random weights and a
5-class head, saved as safetensors, and run through the real ``camserve archive --arch
timm:NAME --weights W --labels L`` (``camserve.tools.cli.main``; only torch-model-archiver's
zip of the model folder is replaced by a copy). The folder is loaded as the handler loads it
(``Explainer.from_directory``) and explains two photos. Each model runs in a child process
(a crash or a hang is recorded, not fatal) and gives one JSON line:

- ``status``: ``ok``; ``refused`` (exit 2 with one line: ``message``); ``crash`` (a
  traceback from archive or explain: ``message``); ``slow`` (building took longer than
  ``--build-limit`` seconds) or ``timeout``.
- ``layer``, ``layout``, ``grid`` ((h, w) at the input size), ``compensable``;
  ``finite``, ``nonzero`` (the top class's map), ``captum`` (the map equals Captum's
  LayerGradCam on the grid), ``score_in_range``, ``verified`` (the archive's
  preprocessing check against ``timm.data.create_transform``), ``timm_grid`` (the
  explained grid equals timm's own (N, C, h, w) map; None where not comparable),
  ``signed_max`` (an empty map with a negative signed map is the random weights' answer),
  ``reinitialised`` (all-zero weight matrices given random values), ``seconds``.

Random weights, CPU, one thread, each model at its own default input size; the parameter
counts are kept next to ``--out`` (``.params.json``): counting all of timm takes ~10 min.
Development-only:

    .venv/bin/python -m harness.sweep_timm --out /tmp/sweep.jsonl
    .venv/bin/python -m harness.sweep_timm --models resnet18,eva02_tiny_patch14_224
    .venv/bin/python -m harness.sweep_timm --table /tmp/sweep.jsonl   # the docs' table
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

LABELS = ["cat", "dog", "bird", "fish", "frog"]
# Families without a classifier: Gemma 4's vision encoder (num_classes 0).
NOT_CLASSIFIERS = ("gemma4_vit",)
CHECKS = ("finite", "nonzero", "captum", "score_in_range", "verified", "timm_grid")


def families() -> dict[str, list[str]]:
    """timm.models module -> its registered model names."""
    import timm
    from timm.models._registry import _model_to_module

    grouped: dict[str, list[str]] = {}
    for name in timm.list_models():
        grouped.setdefault(_model_to_module[name], []).append(name)
    return grouped


def parameter_count(name: str) -> int | None:
    """Parameters of ``name`` built on the meta device (no memory, no init); None: no build."""
    import timm
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=len(LABELS))
    except Exception:  # noqa: BLE001 - a model that cannot build is simply not picked
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_per_family(
    chosen: list[str] | None = None, cache: Path | None = None
) -> list[tuple[str, str, int]]:
    """(family, model, parameters): the smallest buildable model of each family. Counting
    all of timm's models takes minutes: ``cache`` (JSON, name -> count) keeps the counts."""
    counts = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    picked = []
    for family, names in sorted(families().items()):
        if family in NOT_CLASSIFIERS or (chosen and family not in chosen):
            continue
        for name in names:
            if name not in counts:
                counts[name] = parameter_count(name)
        if cache:
            cache.write_text(json.dumps(counts))
        counted = [(counts[n], n) for n in names]
        counted = [(count, n) for count, n in counted if count is not None]
        if counted:
            count, name = min(counted)
            picked.append((family, name, count))
    return picked


def _photos():
    import matplotlib
    from PIL import Image

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    photo = photo.convert("RGB")
    return [photo, photo.crop((6, 180, 506, 430))]


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _archive(name: str, work: Path) -> tuple[int, str, str]:
    """``camserve archive`` as the command line runs it: (exit status, stdout, stderr).

    Everything but the packing: torch-model-archiver's zip of the model folder (the same for
    every model, seconds each) is replaced by a copy of the folder."""
    from camserve.tools import archive
    from camserve.tools.cli import main as camserve

    def copy_folder(model_dir, name, export_path, version="1.0"):
        return Path(shutil.copytree(model_dir, Path(export_path) / name))

    archive.build_archive = copy_folder

    out, err = io.StringIO(), io.StringIO()
    argv = [
        "archive", "--arch", f"timm:{name}", "--weights", str(work / "w.safetensors"),
        "--labels", str(work / "labels.txt"), "--export-path", str(work / "store"),
        "--name", "model",
    ]  # fmt: skip
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = camserve(argv)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001 - recorded: a traceback is a finding
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()


def check_one(name: str, build_limit: float) -> dict:
    """Build, archive, load and explain ``name``; the record described in the module doc."""
    import timm
    import torch
    from captum.attr import LayerGradCam
    from safetensors.torch import save_model

    from camserve.explainer import Explainer
    from camserve.grid import NCHW, GridLayer
    from camserve.request import ParsedRequest, RequestOptions

    record: dict = {"model": name}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sweep-timm-") as folder:
        work = Path(folder)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=len(LABELS)).eval()
            record["reinitialised"] = _no_zero_weights(model)
        record["build_seconds"] = round(time.perf_counter() - started, 1)
        if record["build_seconds"] > build_limit:
            return record | {"status": "slow"}
        record["input_size"] = list(model.pretrained_cfg["input_size"][1:])
        save_model(model, str(work / "w.safetensors"))
        (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
        del model

        status, stdout, stderr = _archive(name, work)
        lines = stderr.strip().splitlines()
        if status != 0:
            clean = status == 2 and len(lines) == 1 and "Traceback" not in stderr
            record.update(
                status="refused" if clean else "crash",
                exit=status,
                message=lines[-1] if clean or not lines else "\n".join(lines[-3:]),
            )
            return record | {"seconds": round(time.perf_counter() - started, 1)}
        summary = stdout.strip().splitlines()[0]
        record["verified"] = "create_transform" in summary and "refused" not in summary
        record["summary"] = summary
        unpacked = work / "store" / "model"
        try:
            record.update(_explain(unpacked, Explainer, ParsedRequest, RequestOptions))
        except Exception:  # noqa: BLE001 - recorded: a traceback is a finding
            return record | {
                "status": "crash",
                "message": "explain: " + traceback.format_exc().strip().splitlines()[-1],
                "seconds": round(time.perf_counter() - started, 1),
            }

        def _captum(explainer, answers) -> bool:
            tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
            for answer in answers:
                x = answer.image.tensor[None]
                theirs = LayerGradCam(explainer.model, tap).attribute(
                    x, target=answer.explained.index, relu_attributions=True
                )[0, 0]
                ours = answer.explained.grad_cam
                scale = theirs.max().clamp_min(1e-30)
                if ours.shape != theirs.shape or not torch.allclose(
                    ours / scale, theirs / scale, atol=1e-5, rtol=0
                ):
                    return False
            return True

        explainer, answers = record.pop("_explainer"), record.pop("_answers")
        layer = explainer.model.get_submodule(explainer.config.target_layer)
        record.update(
            status="ok",
            layer=explainer.config.target_layer,
            layout=layer.layout if isinstance(layer, GridLayer) else NCHW,
            captum=_captum(explainer, answers),
            timm_grid=_grid_as_timm_reads_it(explainer, answers[0].image.tensor[None]),
            seconds=round(time.perf_counter() - started, 1),
        )
    return record


def _grid_as_timm_reads_it(explainer, x) -> bool | None:
    """Whether the explained grid equals timm's own (N, C, h, w) map: the last
    ``forward_intermediates`` output (tokens and channels reordered by timm's code) for the
    last ``feature_info`` module (with the final norm for ``norm``), ``forward_features``'
    output for the map the head reads; None for another layer (a ``norm1``) or a model
    without the method."""
    import torch

    from camserve.grid import NHWC, GridLayer
    from camserve.sources.timm import feature_layers, head_input

    model, layer = explainer.model, explainer.config.target_layer
    wrapper = model.get_submodule(layer)
    layout = wrapper.layout if isinstance(wrapper, GridLayer) else None
    if layer in head_input(model):

        def theirs(x):
            features = model.forward_features(x)
            return features.permute(0, 3, 1, 2) if layout == NHWC else features

    elif layer in feature_layers(model)[:1] or layer == "norm":
        # The final norm (MViTv2's fallback): timm's intermediates with its final norm.
        def theirs(x):
            return model.forward_intermediates(
                x, indices=1, norm=layer == "norm", intermediates_only=True
            )[-1]

    else:
        return None
    seen = []
    tap = model.get_submodule(explainer.gradcam.layer_name)
    handle = tap.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            expected = theirs(x)
    except Exception:  # noqa: BLE001 - not every family implements forward_intermediates
        return None
    finally:
        handle.remove()
    if not seen or seen[-1].shape != expected.shape:
        return False
    return bool(torch.allclose(seen[-1], expected, atol=1e-5, rtol=1e-4))


def _no_zero_weights(model) -> list[str]:
    """Give all-zero weight matrices (timm zero-initialises some heads: MLP-Mixer, ...)
    random values, as trained weights would have: a zero head gives zero gradient
    everywhere, a finding about the initialisation, not the layer. Returns their names."""
    import torch

    zero = [n for n, p in model.named_parameters() if p.dim() >= 2 and not p.any()]
    with torch.no_grad():
        for name in zero:
            model.get_parameter(name).normal_(std=0.02)
    return zero


def _explain(directory: Path, explainer_class, parsed_request, options) -> dict:
    explainer = explainer_class.from_directory(directory)
    answers = [
        explainer.explain([explainer.prepare(parsed_request(_jpeg(image), options()))])[0]
        for image in _photos()
    ]
    maps = [answer.explained.grad_cam for answer in answers]
    scores = [answer.explained.zero_reference.score for answer in answers]
    return {
        "_explainer": explainer,
        "_answers": answers,
        "grid": list(maps[0].shape),
        "compensable": explainer.compensation.compensable,
        "finite": all(bool(m.isfinite().all()) for m in maps),
        "nonzero": all(bool(m.gt(0).any()) for m in maps),
        # An empty map with a negative signed map: the random weights' answer, not a fault.
        "signed_max": [float(answer.explained.signed_map.max()) for answer in answers],
        "score_in_range": all(math.isfinite(s) and 0 <= s <= 1 for s in scores),
    }


def run_all(models: list[tuple[str, str, int]], out: Path, limit: float, timeout: float) -> None:
    """Each model in a child process; one JSON line each, appended to ``out``."""
    with out.open("a") as sink:
        for family, name, count in models:
            started = time.perf_counter()
            command = [sys.executable, "-m", "harness.sweep_timm", "--one", name]
            command += ["--build-limit", str(limit)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                last = done.stdout.strip().splitlines()[-1:] or [""]
                try:
                    record = json.loads(last[0])
                except ValueError:
                    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                    record = {"model": name, "status": "crash", "message": tail[0]}
            except subprocess.TimeoutExpired:
                record = {"model": name, "status": "timeout"}
            record = {"family": family, "parameters": count} | record
            record["wall_seconds"] = round(time.perf_counter() - started, 1)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(_line(record), flush=True)


def _line(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record['family']:28} {record['model']:40} {record.get('status')}: " + str(
            record.get("message", "")
        )
    flags = [k for k in CHECKS if record.get(k) is False]
    bad = f" FAILED {','.join(flags)}" if flags else ""
    return (
        f"{record['family']:28} {record['model']:40} {record['layer']} {record['layout']} "
        f"grid {record['grid']} compensable={record['compensable']} "
        f"{record['seconds']}s{bad}"
    )


def table(paths: list[Path]) -> str:
    """The docs' Markdown table from sweeps' JSON lines (a later line for a model wins)."""
    records = {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record["family"]] = record
    rows = [
        "| family | model | layer | layout | compensable | notes |",
        "|---|---|---|---|---|---|",
    ]
    for family, r in sorted(records.items()):
        if r["status"] != "ok":
            # The first reason of a refusal, e.g. "module 'blocks.2' does not run in ...".
            why = r.get("message", "").partition("automatically: ")[2]
            why = why.split("; ")[0].split(". Name one")[0]
            why = f"{r['status']}: {why}" if why else r["status"]
            rows.append(f"| {family} | `{r['model']}` | {why} | | | |")
            continue
        failed = [k for k in CHECKS if r.get(k) is False]
        notes = []
        if failed == ["nonzero"] and min(r.get("signed_max", [-1])) <= 0:
            notes.append("empty map on a photo: the signed map is negative everywhere")
        elif failed:
            notes.append(f"FAILED {', '.join(failed)}")
        notes.append(f"grid {r['grid'][0]}x{r['grid'][1]} at {r['input_size'][0]}")
        rows.append(
            f"| {family} | `{r['model']}` | `{r['layer']}` | {r['layout']} | "
            f"{'yes' if r['compensable'] else 'no'} | {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sweep_timm", description=__doc__)
    parser.add_argument("--families", help="comma-separated timm.models modules (default all)")
    parser.add_argument("--models", help="comma-separated model names instead of families")
    parser.add_argument("--out", type=Path, default=Path("sweep-timm.jsonl"))
    parser.add_argument("--build-limit", type=float, default=60.0, help="seconds to build")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print the docs' table of sweeps' output"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    import torch

    # One thread: on a shared 2-core machine OpenMP's waiting slows a second one down.
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(check_one(args.one, args.build_limit)))
        return 0
    if args.models:
        module = {n: f for f, names in families().items() for n in names}
        models = [(module.get(n, "?"), n, 0) for n in args.models.split(",")]
    else:
        chosen = args.families.split(",") if args.families else None
        models = smallest_per_family(chosen, args.out.with_suffix(".params.json"))
    run_all(models, args.out, args.build_limit, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
