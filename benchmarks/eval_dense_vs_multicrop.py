"""Dense multi-scale evaluation vs the paper's 150-crop protocol, measured in one run.

Both run through ``vggnet.evaluate.predict`` on the same images (ImageNet-like 500x375 and
375x500 JPEGs, written to a temporary folder) at the same test scales, with flips: dense runs
the fully convolutional net once per scale and flip (6 passes per image); multi-crop runs
5x5 crops x 2 flips x 3 scales = 150 crops per image. The two alternate ``--repeats`` times
and each keeps its best run, so a burst of load on a shared machine does not decide the
ratio. Prints images/s of each and the ratio.

    .venv/bin/python benchmarks/eval_dense_vs_multicrop.py                 # CPU-sized default
    .venv/bin/python benchmarks/eval_dense_vs_multicrop.py --width 1 --images 64 --device cuda
"""

from __future__ import annotations

import argparse

import torch

from vggnet.bench_evaluation import measure
from vggnet.runtime import make_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="D")
    ap.add_argument("--width", type=float, default=0.25, help="1 = the paper's VGG (use on a GPU)")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--scales", default="256,384,512")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16, help="crop-sized inputs per forward pass")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = make_runtime(args.device, args.precision)
    r = measure(args.arch, args.width, args.crop, [int(q) for q in args.scales.split(",")],
                args.images, args.batch_size, args.workers, rt, args.repeats)
    print(f"VGG {args.arch} width {args.width:g}, crop {args.crop}, Q={{{args.scales}}}, flips, "
          f"{args.images} images of 500x375/375x500, {rt.device} {rt.amp_dtype or torch.float32}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"dense multi-scale        : {r['dense']:8.2f} images/s  "
          f"(2 x {len(r['scales'])} passes per image)")
    print(f"multi-crop ({len(r['scales']) * 50} crops)   : {r['multicrop']:8.2f} images/s")
    print(f"dense / multi-crop speed : {r['dense'] / r['multicrop']:.2f}x  (target >= 5x)")
    print(f"multiply-adds per 4:3 image: dense {r['dense_macs'] / 1e9:.1f} G, multi-crop "
          f"{r['multicrop_macs'] / 1e9:.1f} G (ratio {r['multicrop_macs'] / r['dense_macs']:.2f})")


if __name__ == "__main__":
    main()
