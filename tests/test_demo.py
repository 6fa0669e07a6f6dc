import pytest

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
                 "lr.png", "report.md"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "# Training report: VGG A" in report and "## Main job" in report
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 2 and ck["train_settings"]["preset"] == "reduced"
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    # the second run reuses the dataset (cached) and writes a new run folder
    assert main(args + ["--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "already there" in out and "generating" not in out
