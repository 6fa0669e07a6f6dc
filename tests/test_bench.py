"""The benchmark suite at tiny size: that it runs every item and reports in the documented
format. It times nothing that is asserted (speed is judged by running the suite itself)."""

import json
import re

import pytest

from vggnet.cli import main
from vggnet.model import create_model
from vggnet.preprocess import paper
from vggnet.synthetic import SyntheticSpec, make_synthetic
from vggnet.weights import save_weights

NUM = r"[0-9.e+]+"


@pytest.mark.cpu_sensitive
def test_bench_quick_reports_every_item(tmp_path, capsys):
    # a trained model for the agreement item: here an untrained tiny one with its dataset
    spec = SyntheticSpec(train_per_class=1, val_per_class=3, num_classes=2, min_side=36, max_side=40)
    make_synthetic(tmp_path / "data", spec, workers=1)
    model = create_model("A", num_classes=2, width=1 / 16, crop_size=32, seed=0)
    save_weights(tmp_path / "w.safetensors", model, paper((120.0, 110.0, 100.0)), ["disc", "ring"])
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                 "--trained", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^matmul peak float32 \(n=256\): {NUM} GFLOP/s \(torch.mm {NUM}", out, re.M)
    assert re.search(rf"^matmul peak bfloat16 \(n=256\): {NUM} GFLOP/s", out, re.M)
    vs = rf"ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x; ours {NUM} GFLOP/s = {NUM}% of the {NUM} GFLOP/s matmul peak"
    assert re.search(rf"^inference VGG-16 width 0.0625 32 batch 2: {vs}", out, re.M)
    assert re.search(r"^    logits vs float32: relative error", out, re.M)
    assert re.search(rf"^training step VGG-16 width 0.0625 32 batch 2: {vs}", out, re.M)
    assert re.search(rf"^training step VGG-16 width 0.0625 32 batch 8: {vs}", out, re.M)
    assert re.search(rf"^top-1 agreement with float32, trained VGG-11 width 0.0625 32 \(A\): "
                     rf"ours {NUM} % \[target >= 99%\]\n    6 validation images of", out, re.M)
    assert re.search(rf"^inference int8 VGG-16 width 0.0625 32 batch 2 \(quantize_int8, a flag\): ours {NUM} "
                     rf"img/s, baseline {NUM} img/s, ratio {NUM}x \[target report\]\n    the default path", out, re.M)
    assert re.search(rf"^top-1 agreement with float32, int8 \(quantize_int8\), trained VGG-11 width 0.0625 32: "
                     rf"ours {NUM} %.*\n    6 validation images of .*calibrated on 2 training images", out, re.M)
    assert re.search(rf"^evaluation dense vs 100 crops, VGG-16 width 0.0625 32, Q=\{{32,48\}}: "
                     rf"ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x \[target >= 5x\]", out, re.M)
    for setting in ("paper S=256, crop 224", "paper S=\\[256,512\\], 224", "reduced S=73, crop 64"):
        assert re.search(rf"^input pipeline, {setting}: ours {NUM} img/s, baseline {NUM} img/s, "
                         rf"ratio {NUM}x \[target >= 2x plain, >= 75% of JPEG decoding alone\]\n"
                         rf"    JPEG decoding alone {NUM} img/s: ours is {NUM}% of it", out, re.M)
    for kind in ("inference", "training"):
        assert re.search(rf"^peak memory, {kind} VGG-16 width 0.0625 32 batch 2: ours {NUM} MiB, "
                         rf"baseline {NUM} MiB, ratio {NUM}x", out, re.M)
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["peaks"]) == {"float32", "bfloat16"}
    assert len(report["results"]) == 12
    r = report["results"][0]
    assert r["ratio"] == r["ours"] / r["baseline"] and 0 < r["of_peak"]


def test_bench_unknown_item_is_a_clear_error(capsys):
    assert main(["bench", "--quick", "--items", "inference,nope"]) == 2
    assert "unknown benchmark item(s) ['nope']" in capsys.readouterr().err
