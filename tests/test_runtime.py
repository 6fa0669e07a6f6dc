import pytest
import torch

import vggnet
from vggnet.runtime import make_runtime


def test_cpu_runtime_runs_a_model():
    rt = make_runtime("cpu", "bf16", channels_last=True)
    assert rt.device.type == "cpu" and rt.amp_dtype == torch.bfloat16 and not rt.needs_grad_scaler
    m = rt.prepare(vggnet.create_model("A", num_classes=3, width=0.0625, crop_size=32, seed=0).eval())
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
