"""Train the ``shapes`` classifier (``make train``) or, with ``--multi-label``, the
``shapes-multi`` one (``make train-multi``): writes a state_dict and a training record.

python -m harness.shapes.train --seed 0 --out models/shapes
python -m harness.shapes.train --multi-label --seed 0 --out models/shapes-multi
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from harness.shapes import shapes_net
from harness.shapes.dataset import (
    CLASSES,
    TRAIN_SEED,
    generate,
    generate_multi,
    multi_to_uint8_tensors,
    to_uint8_tensors,
)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def train(
    seed: int, count: int, epochs: int, batch_size: int, multi_label: bool = False, log=print
) -> nn.Module:
    """One class per image and a softmax cross-entropy, or (``multi_label``) the images of
    ``render_multi_sample`` and a per-label sigmoid cross-entropy."""
    torch.manual_seed(seed)
    if multi_label:
        images, labels = multi_to_uint8_tensors(generate_multi(TRAIN_SEED, count))
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        images, labels, _ = to_uint8_tensors(generate(TRAIN_SEED, count))
        loss_fn = nn.CrossEntropyLoss()
    model = shapes_net(len(CLASSES))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((count + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(count, generator=generator)
        correct, total_loss = 0, 0.0
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            x = normalise(images[batch])
            if torch.rand((), generator=generator) < 0.5:
                x = x.flip(-1)  # shapes are mirror-symmetric classes
            logits = model(x)
            loss = loss_fn(logits, labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
            if multi_label:  # every label right: the image's whole set
                correct += int(((logits > 0) == labels[batch].bool()).all(1).sum())
            else:
                correct += int((logits.argmax(1) == labels[batch]).sum())
        log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / count:.4f}, acc {correct / count:.4f}")
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--multi-label", action="store_true", help="1 to 3 objects per image, sigmoid head"
    )
    parser.add_argument("--count", type=int, default=16000, help="training images")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("models/shapes"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model = train(args.seed, args.count, args.epochs, args.batch_size, args.multi_label)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.out.name}.pt"  # models/shapes/shapes.pt, ...
    torch.save(model.state_dict(), weights)
    (args.out / "index_to_name.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(CLASSES)}, indent=2) + "\n"
    )
    record = {
        "command": "python -m harness.shapes."
        + Path(__file__).stem
        + " "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "train_data_seed": TRAIN_SEED,
        **(
            {"multi_label": True, "data": "render_multi_sample", "loss": "BCEWithLogitsLoss"}
            if args.multi_label
            else {}
        ),
        "count": args.count,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "normalisation": {"mean": MEAN, "std": STD},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {weights} in {record['seconds']} s")


if __name__ == "__main__":
    main()
