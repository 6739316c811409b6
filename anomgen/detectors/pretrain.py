"""Supervised pretraining of a ViT backbone on data disjoint from the task (plain torch).

FITYMI fine-tunes a *pretrained* ViT with outlier exposure; offline there is no ImageNet ViT, so the small ViT is
pretrained here on a shipped dataset by classification over its classes (record ``category`` -> class index) with a
temporary linear head, which is then dropped. The backbone file (:func:`save_backbone`) is what
``model=vit_oe``'s ``backbone.pretrained`` points at.

**Never pretrain on the task's out-classes.** Pretraining on the *other* shipped dataset satisfies that rule:
sklearn digits for Animal-MNIST tasks, Animal-MNIST for digit tasks. ``--exclude-classes`` (``exclude_classes``)
additionally allows same-dataset pretraining on the remaining classes, e.g. for a one-vs-one near-ND task
Dog vs Cat: ``--dataset animal_mnist --exclude-classes Dog Cat`` (never for one-vs-rest tasks, where every other
class is an out-class). Only the ``train`` split is used by default, so no test image of the dataset is ever seen.

    python -m anomgen.detectors.pretrain --dataset animal_mnist --arch vit_small --image-size 32 --epochs 30 \\
        --out .cache/backbones/vit_small_animal_mnist.pt

The default ``--out`` is ``<root>/.cache/backbones/<arch>_<dataset>.pt`` (root: ``$ANOMGEN_ROOT``, else the checkout),
the path ``configs/model/vit_oe.yaml`` reads with the default ``paths.cache_dir``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from anomgen.data.shipped import DATASETS, load_images, make_dataset
from anomgen.encoders.vit import ViTBackbone, build_vit, save_backbone
from anomgen.pixels import augment_batch

__all__ = ["ensure_backbone", "main", "pretrain_backbone"]


def pretrain_backbone(
    backbone: ViTBackbone,
    dataset: Dataset,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    exclude_classes: Sequence[str] = (),
    max_images: int | None = None,
    augment: dict | None = None,
    label_smoothing: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    history: list | None = None,
) -> ViTBackbone:
    """Train ``backbone`` to classify ``dataset``'s classes through a temporary linear head; return it (trained).

    AdamW with linear warm-up then cosine decay, cross-entropy with label smoothing, train-time augmentation
    ``augment`` (keyword arguments of :func:`~anomgen.pixels.augment_batch`; default pad-crop + flip).
    With ``history`` (a list), one dict per epoch is appended: ``epoch``, ``loss``, ``acc`` (running train accuracy
    under augmentation), ``seconds``. The head is discarded; the backbone comes back in eval mode, on ``device``.
    """
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    augment = {"kind": "pad_crop", "padding": 4, "flip": True} if augment is None else dict(augment)
    x, y, classes = load_images(dataset, exclude_classes, max_images, seed)
    if len(classes) < 2:
        raise ValueError(f"pretraining needs at least two classes, got {classes}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(backbone.feature_dim, len(classes))
    backbone.to(device).train()
    head.to(device).train()
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(total=total, desc=f"pretrain {backbone.config['arch']}", disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            start = time.perf_counter()
            perm = torch.randperm(len(x), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                images = augment_batch(x[idx], backbone.image_size, generator=generator, **augment).to(device)
                labels = y[idx].to(device)
                logits = head(backbone(images))
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"pretraining loss is {loss.item()} at epoch {epoch}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if history is not None:
                history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "acc": correct / seen,
                                "seconds": time.perf_counter() - start})
    finally:
        bar.close()
    backbone.pretrain_classes = classes
    return backbone.eval()


def default_out(arch: str, dataset: str) -> Path:
    """``<root>/.cache/backbones/<arch>_<dataset>.pt``, root = ``$ANOMGEN_ROOT``, else the checkout holding
    ``train.py`` (what ``paths.cache_dir`` is by default), else the working directory."""
    root = os.environ.get("ANOMGEN_ROOT")
    if root is None:
        checkout = Path(__file__).resolve().parents[2]
        root = str(checkout) if (checkout / "train.py").is_file() else "."
    return Path(root) / ".cache" / "backbones" / f"{arch}_{dataset}.pt"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m anomgen.detectors.pretrain",
        description="Pretrain a ViT backbone by classification on a shipped dataset disjoint from the task "
                    "(digits for Animal-MNIST tasks, animal_mnist for digit tasks).")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--split", default="train", choices=("train", "test", "all"),
                        help="split of the pretraining dataset (default train: no test image of it is seen)")
    parser.add_argument("--exclude-classes", nargs="*", default=[], metavar="CLASS",
                        help="classes left out (for same-dataset pretraining: the task's normal and out-classes)")
    parser.add_argument("--arch", default="vit_small", choices=("vit_small", "vit_b_16"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--hidden-dim", type=int, default=None)
    parser.add_argument("--mlp-dim", type=int, default=None)
    parser.add_argument("--init", default=None, help="start from these weights (a torchvision name or a file)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--max-images", type=int, default=None, help="a seeded random subset (for quick runs)")
    parser.add_argument("--augment", default="pad_crop", choices=("pad_crop", "resize_crop", "none"))
    parser.add_argument("--padding", type=int, default=4)
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="backbone file to write (default $ANOMGEN_ROOT/.cache/backbones/<arch>_<dataset>.pt)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    out = args.out or default_out(args.arch, args.dataset)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    backbone = build_vit(args.arch, args.image_size, args.init, patch_size=args.patch_size,
                         num_layers=args.num_layers, num_heads=args.num_heads, hidden_dim=args.hidden_dim,
                         mlp_dim=args.mlp_dim)
    dataset = make_dataset(args.dataset, args.split)
    augment = {"kind": None if args.augment == "none" else args.augment, "padding": args.padding,
               "flip": not args.no_flip}
    history: list = []
    pretrain_backbone(backbone, dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, exclude_classes=args.exclude_classes,
                      max_images=args.max_images, augment=augment, seed=args.seed, device=device,
                      progress=not args.no_progress, history=history)
    info = {
        "stage": "pretrain",
        "dataset": args.dataset,
        "split": args.split,
        "classes": list(backbone.pretrain_classes),
        "exclude_classes": list(args.exclude_classes),
        "init": args.init,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "augment": {k: v for k, v in augment.items()},
        "max_images": args.max_images,
        "seed": args.seed,
        "final_train_loss": history[-1]["loss"],
        "final_train_acc": history[-1]["acc"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = save_backbone(backbone.cpu(), out, info)
    print(f"train loss {history[-1]['loss']:.4f}  train acc {history[-1]['acc']:.4f}  "
          f"({sum(h['seconds'] for h in history):.1f} s)", file=sys.stderr)
    print(path)
    return path


if __name__ == "__main__":
    main()


def ensure_backbone(out: str | Path, dataset: str, epochs: int = 5, max_images: int | None = None,
                    arch: str = "vit_small", image_size: int = 32, seed: int = 0) -> Path:
    """The pretrained backbone file ``out``, pretraining it on ``dataset`` first when it does not exist.

    For pipelines that need a backbone pretrained on data disjoint from the task (``outlier_exposure.backbone`` in
    train.py): the first run pays for the pretraining, later runs reuse the file. A file pretrained on another
    dataset or for another number of epochs is an error (it would silently change the experiment).
    """
    out = Path(out)
    if out.is_file():
        info = torch.load(out, map_location="cpu", weights_only=False).get("info") or {}
        made = {"dataset": info.get("dataset"), "epochs": info.get("epochs")}
        if made != {"dataset": dataset, "epochs": epochs}:
            raise ValueError(f"{out} was pretrained with {made}, but this run asks for dataset={dataset!r}, "
                             f"epochs={epochs}; delete the file to pretrain again, or point the run at another file")
        return out
    argv = ["--dataset", dataset, "--epochs", str(epochs), "--arch", arch, "--image-size", str(image_size),
            "--seed", str(seed), "--out", str(out)]
    if max_images is not None:
        argv += ["--max-images", str(max_images)]
    return main(argv)
