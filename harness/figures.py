"""The README's figure of what the zero-reference score measures, drawn from a real example.

python -m harness.figures --model-dir models/shapes --out docs/score.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from camserve.explainer import Explainer
from camserve.zero_reference import total_variation
from harness.shapes.dataset import HELD_OUT_SEED, render_sample


def score_figure(explainer: Explainer, index: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = render_sample(HELD_OUT_SEED, index)
    [result] = explainer.explain([explainer.prepare_image(sample.image)])
    explained = result.explained
    signed = explained.signed_map.double()
    offset = explained.zero_reference.offset
    radius = explained.zero_reference.worst_case.radius
    span = max(3 * radius, 1.5 * abs(offset), float(signed.abs().max()) * 0.6)
    offsets = torch.linspace(-span, span, 601, dtype=torch.float64)
    shifted = signed[None] + offsets[:, None, None]
    curve = total_variation(signed[None].expand_as(shifted), shifted)

    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6), width_ratios=[1, 1, 1, 1, 1.6])
    axes[0].imshow(sample.image)
    axes[0].set_title(f"input ({explainer.labels[explained.index]})")
    limit = float(signed.abs().max())
    image = axes[1].imshow(signed.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit)
    axes[1].set_title("signed map M = Σ α_k A^k")
    fig.colorbar(image, ax=axes[1], fraction=0.046)
    axes[2].imshow(explained.grad_cam.numpy(), cmap="inferno")
    axes[2].set_title("Grad-CAM = ReLU(M)")
    axes[3].imshow(explained.shifted_grad_cam.numpy(), cmap="inferno")
    axes[3].set_title(f"ReLU(M + c), c = {offset:+.3f}")
    for axis in axes[:4]:
        axis.set_xticks([])
        axis.set_yticks([])
    plot = axes[4]
    plot.plot(offsets.numpy(), curve.numpy(), color="black", linewidth=1.2)
    plot.axvspan(
        -radius, radius, color="tab:orange", alpha=0.2, label=f"gauge ball |c| ≤ r = {radius:.3f}"
    )
    score = explained.zero_reference
    plot.axvline(
        offset, color="tab:blue", linestyle="--", label=f"{score.reference}: {score.score:.3f}"
    )
    worst = score.worst_case
    plot.plot(
        [worst.offset], [worst.score], "o", color="tab:red", label=f"worst case: {worst.score:.3f}"
    )
    plot.set_xlabel("offset c added to M (the ReLU's cut-off moves to -c)")
    plot.set_ylabel("TV(P(M), P(M + c))")
    plot.set_ylim(0, 1.02)
    plot.legend(fontsize=8, loc="upper center")
    plot.set_title("share of the map's mass that moves")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes"))
    parser.add_argument("--index", type=int, default=1, help="held-out sample to draw")
    parser.add_argument("--out", type=Path, default=Path("docs/score.png"))
    args = parser.parse_args(argv)
    score_figure(Explainer.from_directory(args.model_dir), args.index, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
