"""A small training script of the kind pdt's users have; nothing in it knows about pdt.

It trains a fully connected network on scikit-learn's digits (shipped with the package,
no download), saves a checkpoint per epoch (model, optimizer, epoch) and resumes from
any checkpoint, including one that pdt fused. The data order of epoch e depends only on
(seed, e), so a run resumed from any checkpoint sees the same batches as an unbroken one.

    python examples/train_digits.py --out runs/digits --epochs 8
    python examples/train_digits.py --out runs/digits --epochs 1 --resume runs/digits/epoch_0008.pdt.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def make_model(hidden: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    raise ValueError(f"unknown optimizer {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(out: Path, epochs: int, resume: Path | None = None, optimizer_name: str = "sgd", lr: float = 0.05,
          hidden: int = 64, seed: int = 0, batch_size: int = 64) -> list[dict]:
    """Train `epochs` more epochs, saving `epoch_NNNN.pt` after each; return per-epoch metrics."""
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_data()
    model = make_model(hidden, seed)
    optimizer = make_optimizer(model, optimizer_name, lr)
    start = 0
    if resume is not None:
        checkpoint = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = int(checkpoint["epoch"])
    out.mkdir(parents=True, exist_ok=True)
    metrics = []
    for epoch in range(start + 1, start + epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, len(order), batch_size):
            batch = order[i: i + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        train_loss, _ = evaluate(model, x_train, y_train)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   out / f"epoch_{epoch:04d}.pt")
        metrics.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc})
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--epochs", type=int, default=8, help="epochs to train (more, when resuming)")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for row in train(args.out, args.epochs, args.resume, args.optimizer, args.lr, args.hidden, args.seed,
                     args.batch_size):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
