"""The benchmark suite at tiny size: that it runs every item and reports in the documented
format. It times nothing that is asserted (speed is judged by running the suite itself)."""

import json
import re

import pytest

from vggnet.bench import ITEMS, Settings, run
from vggnet.cli import main
from vggnet.model import create_model
from vggnet.preprocess import paper
from vggnet.runtime import cpu_has_native_bf16
from vggnet.synthetic import SyntheticSpec, make_synthetic
from vggnet.weights import save_weights

NUM = r"[0-9.e+]+"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A "trained" model for the agreement items: here an untrained tiny one with its dataset."""
    tmp = tmp_path_factory.mktemp("trained")
    spec = SyntheticSpec(train_per_class=1, val_per_class=3, num_classes=2, min_side=36,
                         max_side=40)
    make_synthetic(tmp / "data", spec, workers=1)
    model = create_model("A", num_classes=2, width=1 / 16, crop_size=32, seed=0)
    save_weights(tmp / "w.safetensors", model, paper((120.0, 110.0, 100.0)), ["disc", "ring"])
    return str(tmp / "w.safetensors"), str(tmp / "data")


@pytest.mark.cpu_sensitive
def test_bench_quick_reports_every_item(trained, tmp_path, capsys):
    # every item but peers (its own test below: exporting graphs takes a while)
    items = ",".join(i for i in ITEMS if i != "peers")
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                 "--items", items, "--trained", trained[0], "--data", trained[1]]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^matmul peak float32 \(n=256\): {NUM} GFLOP/s \(torch.mm {NUM}", out, re.M)
    native = cpu_has_native_bf16()  # else bf16 is emulated: no peak to measure
    bf16_peak = rf"{NUM} GFLOP/s" if native else "not measured, this CPU has no native bf16"
    assert re.search(rf"^matmul peak bfloat16( \(n=256\))?: {bf16_peak}", out, re.M)
    vs = (rf"ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x; ours {NUM} GFLOP/s = {NUM}% "
          rf"of the {NUM} GFLOP/s matmul peak")
    assert re.search(rf"^inference VGG-16 width 0.0625 32 batch 2: {vs}", out, re.M)
    assert re.search(r"^    logits vs float32: relative error", out, re.M)
    assert re.search(rf"^training step VGG-16 width 0.0625 32 batch 2: {vs}", out, re.M)
    assert re.search(rf"^training step VGG-16 width 0.0625 32 batch 8: {vs}", out, re.M)
    assert re.search(rf"^top-1 agreement with float32, trained VGG-11 width 0.0625 32 \(A\): "
                     rf"ours {NUM} % \[target >= 99%\]\n    6 validation images of", out, re.M)
    # the int8 matmul peak (u8 x s8, 32-bit sums) the int8 row reads against, where torch has one
    peak8 = re.search(rf"^int8 matmul peak( \(n=256\): {NUM} GOP/s \(|: not measured)", out, re.M)
    assert peak8
    of8 = (rf"; ours {NUM} GOP/s = {NUM}% of the {NUM} GOP/s int8 matmul peak" if peak8[1] != ": "
           "not measured" else "")
    assert re.search(r"^inference int8 VGG-16 width 0.0625 32 batch 2 \(quantize_int8, a flag\): "
                     rf"ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x{of8} \[target "
                     r"report\]\n    the default path .*\n    the net's multiply-adds alone at "
                     rf"the int8 peak measured alongside \(.*\): {NUM} img/s, {NUM}x the default "
                     "path",
                     out, re.M)
    # the accuracy/speed curve: no layer float, the default's two, then 1..3 more by sensitivity
    curve = re.findall(r"^int8 curve, trained VGG-11 width 0.0625 32: float32 layers (.*): ours "
                       rf"{NUM} % \[target report\]\n    agreement over 2 calibration sets of "
                       rf"about 1 training images each: {NUM}-{NUM}%\n    VGG-16 width 0.0625 32 "
                       rf"batch 2 with those layers in float32 \(.*\): {NUM} img/s, {NUM}x the "
                       "default path", out, re.M)
    assert curve[:2] == ["none", "conv1_1, fc8"] and len(curve) == 5
    assert [len(v.split(", ")) for v in curve[2:]] == [3, 4, 5]
    assert re.search(r"^    sensitivity \(KL from float32 with only that layer in int8, nats per "
                     r"image, on 2 calibration images\): (conv|fc)", out, re.M)
    assert re.search(rf"for scale, float32 itself keeps its top-1 class on {NUM}% / {NUM}% of them "
                     "under uniform pixel noise of \\+-1 / \\+-2 grey levels", out)
    assert re.search(r"^top-1 agreement with float32, int8 \(quantize_int8\), trained VGG-11 "
                     rf"width 0.0625 32: ours {NUM} % \[target >= 99%\]\n    6 validation images "
                     "of .*calibrated on 2 training images", out, re.M)
    assert re.search(rf"^evaluation dense vs 100 crops, VGG-16 width 0.0625 32, Q=\{{32,48\}}: "
                     rf"ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x \[target >= 5x\]",
                     out, re.M)
    for setting in ("paper S=256, crop 224", "paper S=\\[256,512\\], 224", "reduced S=73, crop 64"):
        assert re.search(rf"^input pipeline, {setting}: ours {NUM} img/s, baseline {NUM} img/s, "
                         rf"ratio {NUM}x \[target >= 2x plain, >= 75% of JPEG decoding alone\]\n"
                         rf"    JPEG decoding alone {NUM} img/s: ours is {NUM}% of it", out, re.M)
    for kind in ("inference", "training"):
        assert re.search(rf"^peak memory, {kind} VGG-16 width 0.0625 32 batch 2: ours {NUM} MiB, "
                         rf"baseline {NUM} MiB, ratio {NUM}x", out, re.M)
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["peaks"]) == ({"float32", "bfloat16"} if native else {"float32"})
    assert len(report["results"]) == 17
    r = report["results"][0]
    assert r["ratio"] == r["ours"] / r["baseline"] and 0 < r["of_peak"]


def test_bench_unknown_item_is_a_clear_error(capsys):
    assert main(["bench", "--quick", "--items", "inference,nope"]) == 2
    assert "unknown benchmark item(s) ['nope']" in capsys.readouterr().err


@pytest.mark.cpu_sensitive
def test_bench_peers_rows_and_verdicts(trained, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    # the verdict against ONNX Runtime, even in CI's AVX2-capped rerun (oneDNN read the cap
    # at load; the verdict's own handling of it: the test below)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    s = Settings.quick()
    s.engines = ("onnxruntime",)
    report = run(s, items=("peers",), trained=trained[0], data=trained[1])
    out = capsys.readouterr().out
    crops = [f"inference VGG-16 width 0.0625 32 batch 2, {k}" for k in
             ("plain", "vggnet", "vggnet int8", "vggnet int8 all layers", "onnxruntime fp32",
              "onnxruntime int8")]
    dense = [f"dense VGG-16 width 0.0625 32 one 48x64 image, {k}" for k in
             ("plain", "vggnet", "onnxruntime fp32")]
    # int8 of an untrained 2-class net calibrated on 2 images may be refused (too far off)
    measured = (r"( with float32 on the trained model: [0-9.]+%"
                r"|: not measured, this candidate was left out)")
    for row in crops + dense:
        agreement = (measured if row.endswith("int8")
                     else rf" with float32 on the trained model: {NUM}%$")
        assert re.search(rf"^peers, {row}: ours {NUM} img/s, baseline {NUM} img/s, ratio {NUM}x "
                         rf"\[target report\]\n    top-1 agreement{agreement}", out, re.M), row
    # which layers ran Winograd (none here: the 1/16-width net is below winograd.RULES)
    assert re.search(r"batch 2, vggnet: .*\n    top-1 agreement .*\n    Winograd ran in no layer "
                     r"\(the others: direct\)$", out, re.M)
    # plain is the reference of every agreement: 100% by definition
    assert re.search(r"batch 2, plain: .*\n    top-1 agreement .*: 100.0%$", out, re.M)
    for label in ("inference VGG-16 width 0.0625 32 batch 2",
                  "dense VGG-16 width 0.0625 32 one 48x64 image"):
        assert re.search(rf"^peers, {label}: vggnet, {NUM}% agreement against the fastest peer "
                         rf"with >= 99% agreement, onnxruntime fp32, 100.0% agreement: ours {NUM} "
                         rf"img/s, baseline {NUM} img/s, ratio {NUM}x \[target >= 1.1x\]", out,
                         re.M), label
    assert re.search(rf"^peers, inference .* batch 2: vggnet int8, {NUM}% agreement against the "
                     r"vggnet default: .*\[target >= 1.8x, >= 99% agreement\]\n    fastest peer "
                     rf"int8, onnxruntime int8(, {NUM}% agreement)?: {NUM} img/s; vggnet int8 is "
                     rf"{NUM}x it\n    like for like, every layer in int8: vggnet int8 all layers, "
                     rf"{NUM}% agreement is {NUM}x onnxruntime int8$",
                     out, re.M)
    assert len(report.results) == 6 + 2 + 3 + 1
    assert [r.ratio for r in report.results if r.item.endswith(", plain")] == [1.0, 1.0]


def test_peers_verdict_leaves_out_onnxruntime_under_the_onednn_cap(monkeypatch):
    from vggnet.bench_peers import verdicts

    rate = {"plain": 1.0, "vggnet": 3.0, "onnxruntime fp32": 4.0, "openvino fp32": 2.0}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    (row,) = verdicts("batch 1", rate, None)
    assert row.item.endswith("onnxruntime fp32") and row.ratio == 0.75 and row.notes == []
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    (row,) = verdicts("batch 1", rate, None)
    assert row.item.endswith("openvino fp32") and row.ratio == 1.5
    assert row.notes == ["onnxruntime fp32 left out of this verdict: ONNX Runtime ignores "
                         "ONEDNN_MAX_CPU_ISA=AVX2, so its rows are not that class's figures"]


@pytest.mark.cpu_sensitive
def test_int8_peak_leaves_out_an_engine_that_refuses(monkeypatch):
    import torch
    from torch.ao.nn.quantized import Linear

    from vggnet.bench_int8 import int8_peak

    real = Linear.set_weight_bias

    def onednn_refuses(self, w, b):
        if torch.backends.quantized.engine == "onednn":
            raise RuntimeError("onednn: unsupported")
        return real(self, w, b)

    engine = torch.backends.quantized.engine
    monkeypatch.setattr(Linear, "set_weight_bias", onednn_refuses)
    peak = int8_peak(64, 1)
    assert torch.backends.quantized.engine == engine  # left as it was
    assert peak is not None and "quantized linear (onednn)" not in peak.all
    assert peak.gflops == max(peak.all.values()) > 0 and peak.by in peak.all


def test_an_empty_sample_list_gives_no_crops_not_the_validation_split(trained):
    # int8 calibrates on ts.crops(ts.calibration): with no training images that must be
    # nothing (quantize_int8 then refuses), never the validation images it is judged on
    from vggnet.bench import trained_set

    ts = trained_set(*trained)
    assert ts.crops([]) == []
    assert sum(len(y) for _, y in ts.crops()) == len(ts.samples) == 6
