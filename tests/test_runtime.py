import pytest
import torch

import vggnet
from vggnet.runtime import make_runtime

# run a second time with oneDNN and ATen capped at AVX2 (Makefile: make test)
pytestmark = pytest.mark.cpu_sensitive


def test_cpu_runtime_runs_a_model():
    rt = make_runtime("cpu", "bf16", channels_last=True)
    assert rt.device.type == "cpu" and rt.amp_dtype == torch.bfloat16 and not rt.needs_grad_scaler
    m = vggnet.create_model("A", num_classes=3, width=0.0625, crop_size=32, seed=0).eval()
    m = rt.prepare(m)
    with torch.no_grad(), rt.autocast():
        out = m(rt.input(torch.randn(2, 3, 32, 32)))
    assert out.shape == (2, 3) and out.dtype == torch.bfloat16


def test_bad_runtime_choices():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        make_runtime("cpu", "fp8")
    with pytest.raises(ValueError, match="'fp16' needs a CUDA GPU"):
        make_runtime("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            make_runtime("cuda")


def test_defaults_follow_the_hardware():
    from vggnet.runtime import cpu_has_native_bf16

    rt = make_runtime("cpu")
    assert rt.channels_last and not rt.compile
    assert rt.amp_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert rt.optimizer_options() == {"fused": True}
    assert rt.describe().startswith("cpu ") and not rt.pin_memory


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9)])
def test_maxpool2x2_is_max_pool2d(h, w):
    from vggnet.fuse import MaxPool2x2

    x = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(0))
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.to(torch.bfloat16)):
        out = MaxPool2x2()(t)
        assert torch.equal(out, torch.nn.functional.max_pool2d(t, 2, 2))
    assert MaxPool2x2()(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def _net(name, classes=5):
    model = vggnet.create_model(name, num_classes=classes, width=0.0625, crop_size=32, seed=0)
    model.eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("name", ["A-LRN", "vgg11_bn"])
def test_prepare_inference_matches_float32(name):
    from vggnet.fuse import MaxPool2x2, PackedConv2d, packing_works

    model = _net(name)
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_dense = model(x[..., :32, :32]), model.forward_dense(x)
    rt = make_runtime("cpu", "bf16")
    keys = list(model.state_dict())
    fast = rt.prepare_inference(model)
    assert fast is model and not fast.training
    assert fast.classifier.fc6.weight.dtype == torch.bfloat16
    assert isinstance(fast.features.pool1, MaxPool2x2)
    packed = packing_works(torch.bfloat16) is None
    conv = fast.features.conv1_1
    if packed:  # batch norm folded into the conv, ReLU fused: their slots are empty now
        assert isinstance(conv, PackedConv2d) and conv.dtype == torch.bfloat16 and conv.relu
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in fast.features)
        assert set(fast.state_dict()) == set(keys)  # the same keys: it can still be saved
        assert "laid out once with batch norm folded" in fast.inference_notes[0]
    else:  # where oneDNN refuses bf16 (an AVX2-only CPU): the plain layers, and why
        assert isinstance(conv, torch.nn.Conv2d) and conv.weight.dtype == torch.bfloat16
        assert "left unpacked" in fast.inference_notes[0]
    with rt.inference():
        out, dense = fast(rt.input(x[..., :32, :32])), fast.forward_dense(rt.input(x))
    assert out.dtype == torch.bfloat16 and dense.shape == ref_dense.shape == (3, 5, 2, 3)
    # bf16 has an 8-bit mantissa: a few parts in a thousand, relative to the logits' scale
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (dense.float() - ref_dense).abs().max() <= 0.02 * ref_dense.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_prepare_inference_fp32_is_float32(channels_last):
    from vggnet.fuse import PackedConv2d, packing_works

    model = _net("vgg11_bn", classes=3)
    x, big = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, ref_dense = model(x), model.forward_dense(big)
    rt = make_runtime("cpu", "fp32", channels_last=channels_last)
    fast = rt.prepare_inference(model, batch=2)
    with rt.inference():  # the dense input is not the size the weights were laid out for
        out, dense = fast(rt.input(x)), fast.forward_dense(rt.input(big))
    assert out.dtype == torch.float32 and fast.classifier.fc6.weight.dtype == torch.float32
    assert isinstance(fast.features.conv1_1, PackedConv2d) == (packing_works(torch.float32) is None)
    # folding batch norm reorders float32 roundings only
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-4)


def test_keep_layer_outputs_keeps_every_tap():
    model = _net("vgg11_bn")
    x = torch.randn(2, 3, 32, 32)
    layers = ["conv1_1", "bn1_1", "relu1_1", "conv2_1", "pool2", "fc6", "relu7"]
    with torch.no_grad():
        ref = model.extract(x, layers)
    rt = make_runtime("cpu", "fp32")
    fast = rt.prepare_inference(model, keep_layer_outputs=True)
    assert isinstance(fast.features.bn1_1, torch.nn.BatchNorm2d)
    with rt.inference():
        got = fast.extract(rt.input(x), layers)
    for name in layers:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_private_conv_ops_missing_fall_back_to_eager(monkeypatch):
    # a torch build without the private oneDNN ops (or a CPU that refuses the dtype): the
    # layers stay plain eager ones, the results stay right, and the notes say why
    from vggnet import fuse

    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_conv2d_weight: not supported here")

    fuse.packing_works.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", refuse, raising=False)
    try:
        model = _net("vgg11_bn", classes=3)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
        rt = make_runtime("cpu", "fp32")
        fast = rt.prepare_inference(model)
        assert isinstance(fast.features.conv1_1, torch.nn.Conv2d)
        assert "left unpacked (torch.ops.mkldnn convolution refused" in fast.inference_notes[0]
        assert "not supported here" in fast.inference_notes[0]
        with rt.inference():
            torch.testing.assert_close(fast(rt.input(x)), ref)
    finally:
        fuse.packing_works.cache_clear()


def test_fold_batch_norm_is_the_same_function():
    from vggnet.fuse import fold_batch_norm

    model = _net("vgg11_bn")
    conv, bn = model.features.conv1_1, model.features.bn1_1
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    w, b = fold_batch_norm(conv, bn)
    with torch.no_grad():
        ref = bn.double()(conv.double()(x))
        got = torch.nn.functional.conv2d(x, w.double(), b.double(), padding=1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


HAS_AVX2 = hasattr(torch.cpu, "get_capabilities") and torch.cpu.get_capabilities().get("avx2")


@pytest.mark.skipif(not HAS_AVX2, reason="the AVX2 cap needs an x86 CPU with AVX2")
def test_avx2_cap_takes_effect_and_turns_native_bf16_off():
    # what `make test`'s second pass relies on: with the cap, oneDNN runs AVX2 kernels
    # (ONEDNN_VERBOSE names them), ATen dispatches AVX2, and bf16 is not the default
    import os
    import subprocess
    import sys

    code = ("import torch; from vggnet.runtime import cpu_has_native_bf16, make_runtime\n"
            "c = torch.nn.Conv2d(64, 64, 3, padding=1)\n"
            "c(torch.randn(2, 64, 56, 56))  # big enough for oneDNN\n"
            "print('ATEN', torch.backends.cpu.get_cpu_capability())\n"
            "print('NATIVE', cpu_has_native_bf16(), make_runtime('cpu').precision)\n")
    env = {**os.environ, **AVX2_CAP, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, check=True, env=env).stdout
    assert "isa:Intel AVX2" in out and "convolution,jit:avx2" in out
    assert "ATEN AVX2" in out and "NATIVE False fp32" in out


def test_keep_freed_memory_says_what_it_did(monkeypatch):
    import platform

    from vggnet import fuse

    fuse.keep_freed_memory.cache_clear()
    monkeypatch.setenv("VGGNET_KEEP_FREED_MEMORY", "0")
    assert fuse.keep_freed_memory() == "malloc left as it is (VGGNET_KEEP_FREED_MEMORY=0)"
    fuse.keep_freed_memory.cache_clear()
    monkeypatch.delenv("VGGNET_KEEP_FREED_MEMORY")
    note = fuse.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert note == "malloc keeps freed memory for reuse (no fresh pages per pass)"
    else:
        assert note.startswith("malloc left as it is")
    fast = make_runtime("cpu", "fp32").prepare_inference(_net("A"))
    assert fast.inference_notes[-1] == note


def test_packed_conv_lays_weights_out_per_shape_and_keeps_the_latest():
    from vggnet.fuse import PackedConv2d, packing_works

    if packing_works(torch.float32) is not None:
        pytest.skip(packing_works(torch.float32))
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    packed = PackedConv2d(conv, None, True, torch.float32, (2, 8, 12, 12))
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 8, 12, 12), (2, 8, 12, 12), (3, 8, 9, 11), (1, 8, 20, 16), (4, 8, 12, 12),
              (1, 8, 12, 12)]
    for shape in shapes:
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = torch.relu(conv(x))
            torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)
    # the SHAPES (4) most recently used, oldest first
    assert list(packed._packed) == [(3, 8, 9, 11), (1, 8, 20, 16), (4, 8, 12, 12), (1, 8, 12, 12)]
