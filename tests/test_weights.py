import os

import pytest
import torch

import vggnet
from vggnet import preprocess
from vggnet.checkpoint import atomic_save
from vggnet.convert import convert
from vggnet.weights import load_model, load_state_checked, save_weights


def _net(**kw):
    return vggnet.create_model("C", num_classes=4, width=0.0625, crop_size=32, seed=0, **kw).eval()


def test_safetensors_roundtrip(tmp_path):
    m = _net()
    p = save_weights(tmp_path / "w.safetensors", m, preprocess.CAFFE, ["a", "b", "c", "d"],
                     {"source": "test"})
    loaded = load_model(p)
    assert loaded.model.config == m.config
    assert loaded.preprocessing == preprocess.CAFFE
    assert loaded.class_names == ["a", "b", "c", "d"]
    assert loaded.meta["provenance"] == {"source": "test"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x), m(x))
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_checkpoint_is_loadable_as_model(tmp_path):
    m = _net()
    atomic_save({"model_config": m.config.to_dict(), "model": m.state_dict(),
                 "preprocessing": preprocess.paper((1.0, 2.0, 3.0)).to_dict(), "class_names": None,
                 "epoch": 3}, tmp_path / "last.pt")
    loaded = load_model(tmp_path / "last.pt")
    assert loaded.meta["epoch"] == 3 and loaded.preprocessing.mean == (1.0, 2.0, 3.0)


def test_mismatch_leaves_model_untouched():
    m, other = _net(), vggnet.create_model("C", num_classes=5, width=0.0625, crop_size=32)
    before = m.classifier.fc8.weight.clone()
    state = other.state_dict()
    with pytest.raises(ValueError, match=r"classifier.fc8.weight has shape \[5, 256\] in the file "
                                         r"and \[4, 256\]"):
        load_state_checked(m, state)
    assert torch.equal(before, m.classifier.fc8.weight)
    with pytest.raises(ValueError, match=r"missing \['features.conv5_3.weight'"):
        load_state_checked(m, {k: v for k, v in m.state_dict().items() if "conv5_3" not in k})


def test_foreign_and_malicious_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint .* safely"):
        load_model(tmp_path / "evil.pt")
    # the importer reads foreign torch files (torchvision state dicts) the same guarded way
    torch.save({"features.0.weight": Evil()}, tmp_path / "evil.pth")
    for path in (tmp_path / "evil.pt", tmp_path / "evil.pth"):
        with pytest.raises(ValueError, match="cannot read checkpoint .* safely"):
            convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")


def test_safetensors_header_length_starting_like_a_pickle(tmp_path):
    """A header length whose low byte is 0x80 (a pickle's first byte) is still safetensors."""
    m, p = _net(), tmp_path / "w.safetensors"
    for n in range(0, 256, 8):  # safetensors pads its header to multiples of 8
        save_weights(p, m, preprocess.CAFFE, provenance={"pad": "x" * n})
        if p.read_bytes()[0] == 0x80:
            break
    assert p.read_bytes()[0] == 0x80
    assert load_model(p).model.config == m.config
