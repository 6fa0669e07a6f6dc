"""Inference, VGG-16 at 224, batch 1 and 8: ours vs plain float32 NCHW eager, matmul peak
alongside."""

import sys

from vggnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--items", "inference", *sys.argv[1:]]))
