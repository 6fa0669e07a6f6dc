import pytest

from vggnet import reproduce as rp


def _paper_cells(**changes):
    """Cells equal to the paper's numbers, with some top-1 errors changed."""
    cells = {k: {"top1_err": v[0], "top5_err": v[1], "images": 50_000} for k, v in rp.PAPER.items()}
    for k, v in changes.items():
        cells[k.replace("__", "/")] = {"top1_err": v, "top5_err": 5.0, "images": 50_000}
    return cells


def test_plan_chains_stages_like_the_paper():
    jobs = {j.id: j for j in rp.net_jobs()}
    assert list(jobs) == ["A@256", "A-LRN@256", "B@256", "C@256", "D@256", "E@256",
                          "C@384", "D@384", "E@384", "C@jit", "D@jit", "E@jit"]
    assert jobs["A@256"].init_from is None and jobs["A-LRN@256"].init_from is None
    assert {jobs[a].init_from for a in ("B@256", "C@256", "D@256", "E@256")} == {"A@256"}
    assert jobs["D@384"].init_from == "D@256" and jobs["D@384"].lr_factor == 0.1
    assert jobs["E@jit"].init_from == "E@384"
    order = list(jobs)
    assert all(order.index(j.init_from) < order.index(j.id) for j in jobs.values() if j.init_from)
    # every measured cell of Tables 3-6 is produced by some evaluation or ensemble
    made = {f"{e.id}/{m}" for e in rp.eval_jobs() for m in e.methods}
    made |= {f"{e.net}/multi/dense+multicrop" for e in rp.eval_jobs() if len(e.methods) == 2}
    made |= set(rp.ensemble_cells())
    assert made == set(rp.PAPER)
    kept = {e.net for e in rp.eval_jobs() if e.keep_posteriors}
    assert kept == set(rp.SEVEN) | {"E@jit"}


def test_paper_numbers_reproduce_the_papers_findings():
    verdicts = {f.claim.split(" (")[0]: f.verdict for f in rp.findings(_paper_cells())}
    assert set(verdicts.values()) == {"yes"}, verdicts
    assert len(verdicts) == 7


def test_findings_judge_each_direction():
    # LRN helping by much more than the noise; C beating D at S=384; jittering losing to S=256 for E
    cells = _paper_cells(**{"A-LRN@256__single__dense": 25.0, "C@384__single__dense": 26.0,
                            "E@jit__single__dense": 27.5, "D+E__multi__multicrop": 30.0})
    f = {x.claim.split(" (")[0]: x for x in rp.findings(cells)}
    assert f["LRN does not improve A"].verdict == "no"
    assert f["3x3 convs beat 1x1 at equal depth"].verdict == "partly (2 of 3)"
    assert "D/384 26.8 >= C/384 26.0" in f["3x3 convs beat 1x1 at equal depth"].ours
    jitter = f["Scale jittering at training helps, even at a single test scale"]
    assert jitter.verdict == "partly (3 of 6)"  # C/384 too
    assert f["The D+E ensemble beats each of its nets"].verdict == "partly (4 of 6)"
    # an A-LRN only slightly better than A is within noise at 500 images
    cells = _paper_cells(**{"A-LRN@256__single__dense": 29.0})
    small = {k: dict(v, images=500) for k, v in cells.items()}
    f = {x.claim.split(" (")[0]: x for x in rp.findings(small)}
    assert f["LRN does not improve A"].verdict == "yes"
    # nothing measured: nothing claimed
    assert {x.verdict for x in rp.findings({})} == {"not measured"}


def test_report_lays_out_tables_beside_the_paper():
    cells = _paper_cells(**{"D@jit__multi__dense": 11.25})
    cells.pop("7 nets/multi/dense")
    text = rp.render_report(cells, title_lines=["Preset: reduced"], factor=64 / 224)
    for n in (3, 4, 5, 6):
        assert f"### Table {n}:" in text
    assert "| A | 256 (here 73) | 256 (here 73) | **29.6** | 29.6 | **10.4** | 10.4 |" in text
    assert ("|  | [256;512] (here [73;146]) | 256,384,512 (here 73,110,146) | **11.2** | 24.8 | "
            "**5.0** | 7.5 |") in text
    assert "| D | dense | **11.2** | 24.8 |" in text  # Table 5's dense column is Table 4's cell
    assert "(E/384/352,384,416) | not run | 24.7 | not run | 7.5 |" in text
    assert "| multi-crop & dense | **24.4** | 24.4 | **7.1** | 7.1 |" in text
    assert "standard error of about 0.2 points" in text
    full = rp.render_report(_paper_cells(), title_lines=[])
    assert "(here" not in full and "| B | 256 | 224,256,288 | **28.2** | 28.2 |" in full


def test_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    """The whole chain at a tiny size: 12 trainings, every cell, the report; then a rerun
    that only redoes what was deleted."""
    import json

    import torch

    from vggnet import train as train_module
    from vggnet.cli import main

    out = tmp_path / "study"
    args = ["reproduce", "--out", str(out), "--epochs", "1", "--finetune-epochs", "1",
            "--train-per-class", "7", "--val-per-class", "2", "--width", "0.0625",
            "--batch-size", "16", "--device", "cpu", "--workers", "0", "--threads", "1"]
    threads = torch.get_num_threads()
    assert main(args) == 0
    assert torch.get_num_threads() == threads  # restored
    text = (out / "report.md").read_text()
    assert "not run" not in text and "| E@jit | 1 | finished |" in text
    for n in (3, 4, 5, 6):
        assert f"### Table {n}:" in text
    cells = rp.load_cells(out)
    assert set(cells) == set(rp.PAPER) and {c["images"] for c in cells.values()} == {20}
    # the paper's chaining, as the training runs recorded it
    d384 = json.loads((out / "nets" / "D@384" / "settings.json").read_text())
    assert d384["init_from"].endswith("D@256") and d384["scale"] == [110, 110]
    assert abs(d384["lr"] - 1e-3) < 1e-12  # the S=384 stage: lr/10
    assert d384["transfer_lr_factor"] == 1.0  # on every copied layer (not lr/100)
    ejit = json.loads((out / "nets" / "E@jit" / "settings.json").read_text())
    assert ejit["init_from"].endswith("E@384") and ejit["scale"] == [73, 146]
    assert cells["E@jit/multi/dense"]["scales"] == [73, 109, 146]  # the middle of [73, 146]
    assert "256,384,512 (here 73,109,146)" in text
    assert cells["D@256/multi/dense"]["scales"] == [64, 73, 82]
    assert cells["C@jit/single/dense"]["scales"] == [109]
    # the D+E ensemble is the mean of the stored posteriors of D and E
    post = [torch.load(out / "posteriors" / f"{n}__multi.pt", weights_only=True)
            for n in ("D@jit", "E@jit")]
    from vggnet.evaluate import scores
    s = scores((post[0]["dense"] + post[1]["dense"]) / 2, post[0]["labels"],
               [str(i) for i in range(10)])
    assert abs(s["top1_err"] - cells["D+E/multi/dense"]["top1_err"]) < 1e-9
    capsys.readouterr()

    # rerun: nothing is trained or evaluated again except what was removed
    def no_training(*a, **k):
        raise AssertionError("a finished training ran again")

    (out / "cells" / "D+E__multi__dense.json").unlink()
    (out / "cells" / "A@256__single__dense.json").unlink()
    kept = (out / "cells" / "B@256__single__dense.json").stat().st_mtime_ns
    orig = train_module.train
    train_module.train = no_training
    try:
        assert main(args) == 0
    finally:
        train_module.train = orig
    assert set(rp.load_cells(out)) == set(rp.PAPER)
    assert (out / "cells" / "B@256__single__dense.json").stat().st_mtime_ns == kept


def test_study_files_are_written_atomically_with_fsync(tmp_path, monkeypatch):
    import json
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    rp._write_json(tmp_path / "cells" / "x.json", {"cell": "x", "top1_err": 1.5})
    assert json.loads((tmp_path / "cells" / "x.json").read_text()) == {"cell": "x", "top1_err": 1.5}
    assert len(synced) >= 1  # the file (and its folder) reached the disk before the rename
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["x.json"]  # no temporary left


def test_default_study_folder_is_new_per_run(tmp_path, monkeypatch, capsys):
    """Without --out each study gets its own folder (reproduce/PRESET-DATE), never an earlier
    one's; --out of an earlier study resumes it."""
    from vggnet.cli import main

    monkeypatch.chdir(tmp_path)
    folders = []

    def run(study):
        folders.append(study.out)
        study.out.mkdir(parents=True, exist_ok=True)
        return study.out / "report.md"

    monkeypatch.setattr(rp.Study, "run", run)
    assert main(["reproduce"]) == 0 and main(["reproduce"]) == 0
    assert len(set(folders)) == 2 and all(f.parent.name == "reproduce" for f in folders)
    assert all(f.name.startswith("reduced-") for f in folders)
    assert f"to resume it after an interruption, run the same command with --out {folders[0]}" \
        in capsys.readouterr().out
    assert main(["reproduce", "--out", str(folders[0])]) == 0 and folders[-1] == folders[0]


@pytest.mark.parametrize("study", ["classification", "localisation"])
def test_a_missing_dataset_is_refused_before_the_study_folder_is_made(tmp_path, capsys, study):
    from vggnet.cli import main

    out = tmp_path / "study"
    assert main(["reproduce", "--study", study, "--data", str(tmp_path / "gone"),
                 "--out", str(out), "--no-progress"]) == 2
    assert f"dataset folder {str(tmp_path / 'gone')!r} does not exist" in capsys.readouterr().err
    assert not out.exists()
