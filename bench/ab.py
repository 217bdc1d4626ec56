"""Before/after in one process: another checkout's serving core against this one, and a
plain prediction (``bench.inprocess.plain_prediction``), interleaved round after round on the
same inputs.

    git worktree add --detach /tmp/before <commit>
    python -m bench.ab --before-tree /tmp/before --model shapes --batches 1 8

On a shared machine, separate runs see different loads; here every round times all three
back to back, so the ratios compare like with like. The older core's modules are loaded
under other names (``before_camserve.*``) next to this checkout's ``camserve``.
Writes bench/results/<date>-ab.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from captum.attr import LayerGradCam

from bench.inprocess import explainers, plain_prediction, prepared_batch
from bench.run import RESULTS, machine
from bench.timing import interleaved
from camserve.explainer import Explainer, PreparedImage

PREFIX = "before_camserve"


def load_core(tree: Path) -> types.ModuleType:
    """The ``camserve`` package of ``tree`` as ``before_camserve``, imports rewritten."""
    package = types.ModuleType(PREFIX)
    package.__path__ = [str(tree / "camserve")]
    sys.modules[PREFIX] = package

    def finder(name: str) -> types.ModuleType:
        full = f"{PREFIX}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        path = tree / "camserve" / f"{name}.py"
        source = path.read_text().replace("from camserve.", f"from {PREFIX}.")
        source = source.replace("from camserve import", f"from {PREFIX} import")
        module = types.ModuleType(full)
        module.__file__ = str(path)
        sys.modules[full] = module
        for dependency in _dependencies(source):
            finder(dependency)
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - our own tree
        return module

    return finder("explainer")


def _dependencies(source: str) -> list[str]:
    names = []
    for line in source.splitlines():
        if line.startswith(f"from {PREFIX}."):
            names.append(line.split()[1].removeprefix(f"{PREFIX}."))
        elif line.startswith(f"from {PREFIX} import"):
            names += [n.strip() for n in line.split("import", 1)[1].split(",")]
    return names


def captum_alone(explainer: Explainer, prepared: list[PreparedImage]) -> Callable[[], object]:
    """The floor while Captum makes the map: its ``LayerGradCam`` on the served (frozen) model,
    told each image's class, after a plain prediction; nothing of camserve (no score, no
    second map, no transfer). camserve's own cost is what ``after`` adds to this."""
    layer = explainer.model.get_submodule(explainer.gradcam.layer_name)
    gradcam = LayerGradCam(explainer.model, layer)
    plain = plain_prediction(explainer, prepared)
    targets = plain()[1][:, 0].tolist()
    x = torch.stack([item.tensor for item in prepared]).to(explainer.device)

    def run():
        return gradcam.attribute(x, target=targets, relu_attributions=False)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-tree", type=Path, required=True)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="ab")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    after = explainers([args.model])[args.model]
    before_module = load_core(args.before_tree.resolve())
    if args.model == "shapes":
        before = before_module.Explainer.from_directory(Path("models/shapes"))
    else:
        raise SystemExit("only the shapes model is wired up")
    results: dict = {
        "command": " ".join(
            ["python", "-m", "bench.ab", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "before_tree": str(args.before_tree),
        "ab": {},
    }
    for batch in args.batches:
        prepared = prepared_batch(after, batch)
        # The older core's PreparedImage may have other fields (an ``image`` it kept).
        fields = before_module.PreparedImage.__dataclass_fields__
        values = {"image": None, "requested_class": None, "target": None}
        old = [
            before_module.PreparedImage(
                **{k: v for k, v in values.items() if k in fields},
                tensor=p.tensor,
                options=p.options,
                topk=p.topk,
            )  # fmt: skip
            for p in prepared
        ]

        plain = plain_prediction(after, prepared)
        captum = captum_alone(after, prepared)

        stats = interleaved(
            {
                "plain": plain,
                "captum_alone": captum,
                "before": lambda old=old: before.explain(old),
                "after": lambda prepared=prepared: after.explain(prepared),
            },
            repeats=args.repeats,
            warmup=5,
            budget_s=600.0,
        )
        plain_s = stats["plain"].median_s
        results["ab"][f"{args.model}/batch{batch}"] = {
            "stats": {k: v.to_json() for k, v in stats.items()},
            "ratio_to_plain": {k: round(v.median_s / plain_s, 3) for k, v in stats.items()},
            "ratio_to_plain_p10": {
                k: round(v.p10_s / stats["plain"].p10_s, 3) for k, v in stats.items()
            },
        }
        print(args.model, batch, results["ab"][f"{args.model}/batch{batch}"]["ratio_to_plain"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y-%m-%d}-{args.name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
