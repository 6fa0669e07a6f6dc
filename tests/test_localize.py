import pytest
import torch

from vggnet.annotations import attach_boxes, read_box_csv
from vggnet.boxes import Window, iou
from vggnet.data import open_dataset
from vggnet.localize import (
    DensePredictions,
    Localizer,
    LocalizerSpec,
    box_loss,
    crop_target,
    decode,
    dense_boxes,
    encode,
    localizer_from_classifier,
    protocol1,
    protocol1_error,
    protocol2_error,
    select,
    set_finetune,
    top5_correct,
    top5_guesses,
)
from vggnet.model import create_model
from vggnet.preprocess import Preprocessing


def tiny(classes=3, crop=32, bn=False, seed=0):
    return create_model("A", num_classes=classes, width=1 / 16, crop_size=crop, batch_norm=bn,
                        seed=seed).eval()


@pytest.mark.parametrize("regression,outputs", [("single-class", 4), ("per-class", 12)])
def test_localizer_copies_every_layer_but_fc8(regression, outputs):
    clf = tiny()
    loc = localizer_from_classifier(clf, regression, seed=1)
    assert loc.net.config.num_classes == outputs and loc.spec.boxes == outputs // 4
    ours, theirs = loc.net.state_dict(), clf.state_dict()
    for k, v in ours.items():
        if k.startswith("classifier.fc8."):
            assert v.shape[0] == outputs
        else:
            assert torch.equal(v, theirs[k]), k
    fc8 = loc.net.classifier.fc8
    assert torch.equal(fc8.bias, torch.full((outputs,), 0.5))
    assert 0.5e-3 < fc8.weight.std() < 2e-3
    assert torch.equal(localizer_from_classifier(clf, regression, seed=1).net.classifier.fc8.weight,
                       fc8.weight)  # seeded
    x = torch.randn(2, 3, 32, 32)
    assert loc.eval()(x).shape == (2, outputs // 4, 4)
    assert LocalizerSpec.from_dict(loc.spec.to_dict()) == loc.spec


def test_localizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="must be one of single-class, per-class; got 'pcr'"):
        LocalizerSpec("pcr", 10)
    with pytest.raises(ValueError, match="needs fc8 with 40 outputs; the net has 3"):
        Localizer(tiny(), LocalizerSpec("per-class", 10))
    with pytest.raises(ValueError, match="finetune must be one of all, fc; got 'conv'"):
        set_finetune(localizer_from_classifier(tiny()), "conv")


def test_pcr_head_picks_the_box_of_the_requested_class():
    loc = localizer_from_classifier(tiny(classes=4), "per-class", seed=2).eval()
    with torch.no_grad():  # hand-built fc8: class k's box is (4k, 4k+1, 4k+2, 4k+3)
        loc.net.classifier.fc8.weight.zero_()
        loc.net.classifier.fc8.bias.copy_(torch.arange(16.0))
    out = loc(torch.randn(3, 3, 32, 32))
    assert select(out, torch.tensor([2, 0, 3])).tolist() == [[8, 9, 10, 11], [0, 1, 2, 3],
                                                             [12, 13, 14, 15]]
    # with trained-like weights: fc8 outputs 4k..4k+3 are class k's box
    loc = localizer_from_classifier(tiny(classes=4), "per-class", seed=2).eval()
    x = torch.randn(3, 3, 32, 32)
    raw = loc.net(x)
    assert torch.equal(select(loc(x), torch.tensor([1, 3, 1])),
                       torch.stack([raw[0, 4:8], raw[1, 12:16], raw[2, 4:8]]))
    scr = localizer_from_classifier(tiny(classes=4), "single-class").eval()
    assert torch.equal(select(scr(x), torch.tensor([0, 3, 2])), scr.net(x))
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 4\), got 0..4"):
        select(loc(x), torch.tensor([0, 4, 1]))


def test_encode_decode_and_loss_hand_computed():
    b = torch.tensor([[8.0, 4.0, 24.0, 12.0]])  # in a 32-pixel crop
    assert encode(b, 32).tolist() == [[0.5, 0.25, 0.5, 0.25]]
    assert decode(encode(b, 32), 32).tolist() == b.tolist()
    out = torch.zeros(2, 3, 4)
    out[0, 1] = torch.tensor([1.0, 0, 0, 0])  # image 0, class 1: distance 1 from target 0
    out[1, 2] = torch.tensor([0.0, 2, 0, 0])  # image 1, class 2: distance 2
    loss = box_loss(out, torch.tensor([1, 2]), torch.zeros(2, 4))
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2)


def test_crop_target_takes_the_largest_visible_box():
    win = Window((200, 100), (100, 50), (10, 5, 42, 37))
    boxes = torch.tensor([[40.0, 20, 100, 60],  # -> (10, 5, 40, 25): 440 of 600 px inside
                          [0.0, 0, 10, 10],  # -> left of the crop: nothing visible
                          [30.0, 16, 40, 30]])  # -> (5, 3, 10, 10), 35 px
    # not clipped: the target reaches beyond the crop's right edge (x2 = 40 > 32)
    assert crop_target(boxes, win).tolist() == pytest.approx([25 / 32, 15 / 32, 30 / 32, 20 / 32])
    flipped = Window((200, 100), (100, 50), (10, 5, 42, 37), flip=True)  # -> (-8, 5, 22, 25)
    assert crop_target(boxes, flipped).tolist() == pytest.approx([7 / 32, 15 / 32, 30 / 32,
                                                                  20 / 32])
    assert crop_target(boxes[1:2], win) is None
    # 440 / 600 = 73% of the first box inside: taken at min_visible 0.73; at 0.74 the third
    # (wholly inside, though smaller) is, and alone nothing
    assert crop_target(boxes, win, min_visible=0.73).tolist() == crop_target(boxes, win).tolist()
    assert crop_target(boxes, win, min_visible=0.74).tolist() == pytest.approx(
        [7.5 / 32, 6.5 / 32, 5 / 32, 7 / 32])
    assert crop_target(boxes[:1], win, min_visible=0.74) is None
    # the whole image: a box larger than the crop that fills it (1024 of 5000 px inside)
    assert crop_target(torch.tensor([[0.0, 0, 200, 100]]), win, min_visible=0.99).tolist() == \
        pytest.approx([40 / 32, 20 / 32, 100 / 32, 50 / 32])


def test_dense_boxes_hand_computed():
    # every location predicts the central half of its window: crop 64, stride 32, rescaled 0.5
    boxes = torch.tensor([0.5, 0.5, 0.5, 0.5]).view(1, 4, 1, 1).expand(1, 4, 2, 3)
    win = Window((448, 320), (224, 160), (0, 0, 224, 160))
    got = dense_boxes(boxes, win, 64)
    assert got.shape == (6, 1, 4)
    # location (i, j): input (32j + 16, 32i + 16, 32j + 48, 32i + 48), doubled
    want = [[2 * (32 * j + 16), 2 * (32 * i + 16), 2 * (32 * j + 48), 2 * (32 * i + 48)]
            for i in range(2) for j in range(3)]
    assert got[:, 0].tolist() == want


def _centre_taps_only(net):
    """3x3 convs reduced to their centre tap: zero padding then changes nothing, so a dense
    location equals its crop exactly."""
    with torch.no_grad():
        for m in net.features:
            if isinstance(m, torch.nn.Conv2d):
                keep = torch.zeros_like(m.weight)
                keep[..., 1, 1] = 1
                m.weight.mul_(keep)
                m.bias.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("flip", [False, True])
def test_dense_location_is_its_crops_box_in_image_coordinates(flip):
    torch.manual_seed(0)
    loc = localizer_from_classifier(tiny(classes=2, crop=64), "per-class", seed=3).eval()
    _centre_taps_only(loc.net)
    x = torch.randn(1, 3, 160, 224)  # the stored 448x320 image rescaled by 1/2
    view = x.flip(-1) if flip else x
    win = Window((448, 320), (224, 160), (0, 0, 224, 160), flip=flip)
    with torch.no_grad():
        dense = loc.forward_dense(view)[0]  # (2, 4, 4, 6)
    assert dense.shape == (2, 4, 4, 6)
    got = dense_boxes(dense, win, 64)  # (24, 2, 4)
    for i in range(4):
        for j in range(6):
            crop = view[..., 32 * i:32 * i + 64, 32 * j:32 * j + 64]
            x0 = 224 - 32 * j - 64 if flip else 32 * j  # the crop's place in the rescaled image
            crop_win = Window((448, 320), (224, 160), (x0, 32 * i, x0 + 64, 32 * i + 64), flip)
            with torch.no_grad():
                want = crop_win.to_image(decode(loc(crop)[0], 64))
            assert torch.allclose(got[i * 6 + j], want, atol=1e-3), (i, j)


def _hand_predictions() -> DensePredictions:
    """4 locations, 6 classes (PCR). Class 1's boxes: A, B, D overlapping (posteriors 0.2, 0.3,
    0.1) and C far away (0.45): merged (threshold 1) into the mean of A, B, D, summed 0.6."""
    boxes = torch.tensor([[20.0, 20, 30, 30]]).repeat(4, 6, 1)
    boxes[:, 1] = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [3, 0, 13, 10], [50, 50, 60, 60]])
    probs = torch.full((4, 6), 0.1)
    probs[:, 1] = torch.tensor([0.2, 0.3, 0.1, 0.45])
    scores = torch.tensor([0.02, 0.3, 0.12, 0.25, 0.2, 0.11])  # top 5: 1, 3, 4, 2, 5
    return DensePredictions(boxes, probs, scores)


def test_top5_guesses_merge_per_class_and_rate_by_the_classifier():
    guesses = top5_guesses(_hand_predictions())
    assert [g.label for g in guesses] == [1, 3, 4, 2, 5]
    assert guesses[0].box == pytest.approx((4 / 3, 0, 34 / 3, 10))
    assert guesses[0].score == pytest.approx(0.6)
    assert guesses[1].box == (20, 20, 30, 30) and guesses[1].score == pytest.approx(0.4)
    # little merging: the single strong box wins
    strict = top5_guesses(_hand_predictions(), threshold=0.2)
    assert strict[0].box == (50, 50, 60, 60) and strict[0].score == pytest.approx(0.45)


def test_top5_correct_needs_class_and_overlap():
    guesses = top5_guesses(_hand_predictions())
    truth = torch.tensor([[0.0, 0, 11, 10]])  # IoU with the merged box 96.67 / 113.33 = 0.85
    assert top5_correct(guesses, 1, truth)
    assert not top5_correct(guesses, 0, truth)  # class 0 is not in the top 5
    assert not top5_correct(guesses, 1, torch.tensor([[50.0, 50, 60, 60]]))
    assert top5_correct(top5_guesses(_hand_predictions(), threshold=0.2), 1,
                        torch.tensor([[0.0, 0, 1, 1], [50.0, 50, 60, 60]]))  # any true box
    assert not top5_correct(guesses, 1, torch.zeros(0, 4))


def test_union_of_scr_and_pcr_predictions():
    pcr = _hand_predictions()
    scr = DensePredictions(torch.tensor([[[0.0, 0, 5, 5]]]), torch.full((1, 6), 0.5),
                           torch.tensor([0.1, 0.0, 0.0, 0.0, 0.0, 0.9]), views=1)
    both = pcr.union(scr)
    assert both.boxes.shape == (5, 6, 4) and both.probs.shape == (5, 6)
    assert torch.equal(both.boxes[4], torch.tensor([[0.0, 0, 5, 5]]).expand(6, 4))
    assert both.class_scores.tolist() == pytest.approx([0.06, 0.15, 0.06, 0.125, 0.1, 0.505])


def test_protocol1_hand_computed():
    # a localiser whose every crop gets class 0: the central half; class 1: the top-left quarter
    loc = localizer_from_classifier(tiny(classes=2), "per-class").eval()
    with torch.no_grad():
        loc.net.classifier.fc8.weight.zero_()
        loc.net.classifier.fc8.bias.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.5, 0.5]))
    win = Window((64, 64), (32, 32), (0, 0, 32, 32))  # crop (8, 8, 24, 24): image (16, 16, 48, 48)
    crops = torch.randn(4, 3, 32, 32)
    truth = [torch.tensor([[16.0, 16, 48, 48]]),
             torch.tensor([[16.0, 16, 48, 80]]),  # IoU 1024 / 2048 = 0.5: correct
             torch.tensor([[16.0, 16, 48, 81]]),  # just under 0.5
             torch.tensor([[0.0, 0, 32, 32], [30, 30, 60, 60]])]  # class 1: (0, 0, 32, 32)
    got = protocol1(loc, crops, torch.tensor([0, 0, 0, 1]), [win] * 4, truth)
    assert got == [True, True, False, True]
    assert iou(torch.tensor([16.0, 16, 48, 48]), torch.tensor([16.0, 16, 48, 81])) < 0.5


@pytest.mark.parametrize("bn", [False, True])
def test_finetune_fc_freezes_the_conv_layers(bn):
    torch.manual_seed(0)
    loc = localizer_from_classifier(tiny(bn=bn), "single-class", seed=4)
    params = set_finetune(loc, "fc")
    loc.train()
    assert {n for n, p in loc.named_parameters() if p.requires_grad} == {
        f"net.classifier.fc{i}.{w}" for i in (6, 7, 8) for w in ("weight", "bias")}
    before = {k: v.clone() for k, v in loc.state_dict().items()}
    opt = torch.optim.SGD(params, lr=1e-2)
    x, target = torch.randn(8, 3, 32, 32), torch.rand(8, 4)
    labels = torch.zeros(8, dtype=torch.long)
    losses = []
    for _ in range(5):
        loss = box_loss(loc(x), labels, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = loc.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"net.classifier.fc{i}.{w}" for i in (6, 7, 8) for w in ("weight", "bias")}
    assert losses[-1] < losses[0]
    set_finetune(loc, "all")
    assert all(p.requires_grad for p in loc.parameters())
    assert loc.net.features.training  # batch norm trains again


def test_protocols_end_to_end_on_the_built_in_data(data):
    ds = open_dataset(data)
    samples, report = attach_boxes(ds.val.samples, read_box_csv(data / "LOC_val_solution.csv"))
    assert report.boxed == len(ds.val.samples) == 6
    clf = tiny()
    loc = localizer_from_classifier(clf, "per-class", seed=5)
    prep = Preprocessing(mean=(120.0, 120.0, 120.0), std=(60.0, 60.0, 60.0))
    r1 = protocol1_error(loc, samples, ds.class_names, size=40, prep=prep, batch_size=4)
    r2 = protocol2_error(loc, clf, samples, ds.class_names, scales=(40, 64), prep=prep, flip=True)
    for r in (r1, r2):
        assert len(r.correct) == 6 and 0 <= r.error <= 100
        assert r.error == pytest.approx(100 * r.correct.count(False) / 6)
