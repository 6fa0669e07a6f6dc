"""Peak memory of inference and of a training step, ours vs the baseline, in fresh processes."""

import sys

from vggnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--items", "memory", *sys.argv[1:]]))
