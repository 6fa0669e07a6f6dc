"""Training: the VGG-16 step at 224 and the reduced preset's step, ours vs plain float32, with
their loss curves over the timed steps."""

import sys

from vggnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--items", "training", *sys.argv[1:]]))
