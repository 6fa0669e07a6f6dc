"""The whole benchmark suite: ``python benchmarks/suite.py [--quick] [--json PATH]``."""

import sys

from vggnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
