import json
import re

import pytest

from docblocks import REPO, blocks, commands
from vggnet.checkpoint import load_checkpoint
from vggnet.cli import main


@pytest.mark.cpu_sensitive
def test_main_job_end_to_end_at_a_tiny_setting(tmp_path, capsys):
    args = ["demo", "--data-dir", str(tmp_path / "data"), "--train-per-class", "4",
            "--val-per-class", "2", "--classes", "3", "--epochs", "2", "--width", "0.0625",
            "--crop-size", "32", "--scale", "37", "--batch-size", "6", "--workers", "0",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    assert "generating the built-in dataset" in out and "main job done in" in out
    assert "top-1 error" in out and "run folder:" in out
    run = tmp_path / "run1"
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.jsonl", "loss.png", "error.png",
                 "report.md", "settings.json"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "# Training report: vgg11_bn (VGG A with batch norm)" in report
    assert "## Main job" in report and "vgg11_bn (VGG A with batch norm) (reduced)" in out
    assert json.loads((run / "settings.json").read_text())["batch_norm"] is True
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 2 and ck["train_settings"]["preset"] == "reduced"
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    # the second run reuses the dataset (cached) and writes a new run folder
    assert main(args + ["--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "already there" in out and "generating" not in out


def test_demo_help_readme_and_train_command_describe_the_same_model_and_recipe():
    """`demo --help`, the README and report.md name the net the same way, and the README's
    reduced train command trains what the demo trains."""
    from vggnet.cli import build_parser, settings_from_options
    from vggnet.demo import demo_train_settings
    from vggnet.model import config_for
    from vggnet.runtime import make_runtime
    from vggnet.settings import DemoSettings, TrainCommand, make_settings

    label = config_for(DemoSettings().model).label
    assert label == "vgg11_bn (VGG A with batch norm)"
    assert label in " ".join(DemoSettings.__doc__.split())
    readme = (REPO / "README.md").read_text()
    assert label in readme
    argv = next(a for b in blocks(REPO / "README.md", "bash") for a in commands(b.code)
                if a[:3] == ["train", "--data", "data/shapes"])
    values = vars(build_parser(argv).parse_args(argv))
    c = settings_from_options(TrainCommand, {k: v for k, v in values.items()
                                             if not k.startswith("_")}, argv[1:])
    readme_settings = make_settings(c.preset, **c.given).to_dict()
    demo = demo_train_settings(DemoSettings()).to_dict()
    differ = {k for k in demo if demo[k] != readme_settings[k]}
    assert differ <= {"out", "precision"}, differ
    # precision: the demo's explicit choice is what "auto" gives on this CPU
    assert (make_runtime("cpu", demo["precision"]).amp_dtype
            == make_runtime("cpu", readme_settings["precision"]).amp_dtype)
    assert re.search(r"batch 64\b", readme) and "35 epochs" in readme
