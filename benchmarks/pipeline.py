"""Input pipeline benchmark: images per second per worker, ours vs a plain Pillow pipeline
(the measurement is ``vggnet.bench_pipeline``; see its docstring).

    .venv/bin/python benchmarks/pipeline.py [--images 200] [--repeat 3]
"""

from __future__ import annotations

import argparse

import torch

from vggnet.bench_pipeline import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)  # one loader worker
    r = measure(a.images, a.repeat, a.batch)
    print(f"{a.images} JPEGs, 500x375 / 375x500, {r['kb']:.0f} kB on average; one process, "
          f"one thread; best of {a.repeat}\n")
    print(f"{'setting':<26} {'decode':>9} {'plain':>9} {'ours':>9} {'ours/plain':>11} "
          f"{'ours/decode':>12}")
    dec = r["decode"]
    for name, (pl, ours) in r["settings"].items():
        print(f"{name:<26} {dec:>7.0f}/s {pl:>7.0f}/s {ours:>7.0f}/s {ours / pl:>10.2f}x "
              f"{100 * ours / dec:>11.0f}%")
    print("\ntargets: ours/plain >= 2.00x, ours/decode >= 75%")
    for name, (pl, ours) in r["settings"].items():
        vs_plain, vs_dec = ours / pl, ours / dec
        print(f"  {name:<26} {'met' if vs_plain >= 2 else 'NOT met':>7} (x{vs_plain:.2f})   "
              f"{'met' if vs_dec >= 0.75 else 'NOT met':>7} ({100 * vs_dec:.0f}%)")


if __name__ == "__main__":
    main()
