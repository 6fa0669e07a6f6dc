"""Fine-tune a localisation net from a trained classifier with vggnet.localize and test it
(protocol 1, optionally protocol 2): a plain loop over the library, to size the reduced
localisation study before `vggnet localize train` and `vggnet reproduce --study localisation`
exist (they replace this script).

    vggnet train --data DATA --preset reduced --model vgg16_bn --batch-size 64 --epochs 12 \
        --out runs/D
    python benchmarks/localisation_feasibility.py --data DATA --classifier runs/D/best.pt \
        --regression per-class --finetune all --epochs 4 --lr 0.05 [--protocol2 73 110]

DATA needs LOC_train_solution.csv and LOC_val_solution.csv (the built-in dataset has them).
Prints per epoch the training loss and speed, then protocol 1's error beside a constant box
(the mean training target), and protocol 2's top-5 localisation error per test scale.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vggnet.annotations import attach_boxes, read_boxes
from vggnet.data import open_dataset
from vggnet.localize import (
    REGRESSIONS,
    box_loss,
    crop_target,
    localizer_from_classifier,
    protocol1_error,
    protocol2_error,
    set_finetune,
)
from vggnet.transforms import TrainTransform
from vggnet.weights import load_model


def batches(samples, tf: TrainTransform, prep, rng: np.random.Generator, size: int):
    """(inputs, labels, targets) of random crops; crops showing too little of a box are left out."""
    order = rng.permutation(len(samples))
    for i in range(0, len(order) - size + 1, size):
        xs, labels, targets = [], [], []
        for j in order[i:i + size]:
            pixels, window = tf.view(samples[j].path, tf.draw(rng))
            target = crop_target(samples[j].boxes, window)
            if target is not None:
                xs.append(torch.from_numpy(pixels).permute(2, 0, 1))
                labels.append(samples[j].label)
                targets.append(target)
        yield prep.normalize(torch.stack(xs)), torch.tensor(labels), torch.stack(targets)


def constant_box_error(classifier, box: torch.Tensor, val, names, q: int, prep) -> float:
    """Protocol 1's error of a net that always answers ``box`` (encoded)."""
    const = localizer_from_classifier(classifier, "single-class")
    with torch.no_grad():
        const.net.classifier.fc8.weight.zero_()
        const.net.classifier.fc8.bias.copy_(box)
    return protocol1_error(const, val, names, q, prep).error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--regression", choices=REGRESSIONS, default="per-class")
    ap.add_argument("--finetune", choices=("all", "fc"), default="all")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scale", type=int, default=None, help="S (default: the classifier's)")
    ap.add_argument("--protocol2", type=int, nargs="*", default=[], help="test scales Q")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds, root = open_dataset(args.data), Path(args.data)
    train, report = attach_boxes(ds.train.samples, *read_boxes(root / "LOC_train_solution.csv"))
    val, _ = attach_boxes(ds.val.samples, *read_boxes(root / "LOC_val_solution.csv"))
    print(f"train: {report.summary()}")
    clf = load_model(args.classifier)
    prep, crop = clf.preprocessing, clf.model.config.crop_size
    trained = clf.meta.get("train_settings", {}).get("scale")
    s = args.scale or (trained[0] if trained else None)
    if s is None:
        ap.error(f"--scale is needed: {args.classifier!r} records no training scale")
    loc = localizer_from_classifier(clf.model, args.regression, seed=args.seed)
    opt = torch.optim.SGD(set_finetune(loc, args.finetune), lr=args.lr, momentum=0.9,
                          weight_decay=5e-4)
    tf, rng = TrainTransform(scale=(s, s), crop_size=crop), np.random.default_rng(args.seed)
    seen = []
    for epoch in range(1, args.epochs + 1):
        loc.train()
        start, losses = time.time(), []
        for x, labels, targets in batches(train, tf, prep, rng, args.batch_size):
            loss = box_loss(loc(x), labels, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            seen.append(targets)
        took = time.time() - start
        print(f"epoch {epoch}: loss {np.mean(losses):.4f}, {took:.1f} s, "
              f"{len(losses) * args.batch_size / took:.0f} img/s", flush=True)
    start = time.time()
    r1 = protocol1_error(loc, val, ds.class_names, s, prep)
    took = time.time() - start
    const = constant_box_error(clf.model, torch.cat(seen).mean(0), val, ds.class_names, s, prep)
    print(f"protocol 1 (Q={s}): {r1.error:.1f}% error ({took:.1f} s, {len(val)} "
          f"images); a constant box: {const:.1f}%")
    for q in args.protocol2:
        start = time.time()
        r2 = protocol2_error(loc, clf.model.eval(), val, ds.class_names, (q,), prep)
        print(f"protocol 2 (Q={q}): top-5 localisation error {r2.error:.1f}% "
              f"({time.time() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
