import subprocess
import sys

from vggnet.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "vggnet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "info" in out.stdout


def test_info_d(capsys):
    assert main(["info", "D"]) == 0
    out = capsys.readouterr().out
    assert "conv5_3   conv3-512" in out
    assert "parameters: 138,357,544" in out
    assert "15.47 G" in out


def test_info_all_and_dense_size(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "143,667,240" in out and "A-LRN" in out
    assert main(["info", "vgg16", "--size", "256,320"]) == 0
    assert "4096x2x4" in capsys.readouterr().out


def test_info_bad_name_is_a_clear_error(capsys):
    assert main(["info", "Z"]) == 2
    err = capsys.readouterr().err
    assert "unknown VGG model 'Z'" in err and "vgg16" in err
    assert main(["info", "D", "--size", "100,100"]) == 2
    assert "at least the crop size 224x224, got 100x100" in capsys.readouterr().err
