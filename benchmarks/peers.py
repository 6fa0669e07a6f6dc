"""vggnet against ONNX Runtime and OpenVINO on the same weights, same run, interleaved."""

import sys

from vggnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--items", "peers", *sys.argv[1:]]))
