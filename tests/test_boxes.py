import pytest
import torch

from vggnet.boxes import (
    Window,
    area,
    clip,
    cxcywh_to_xyxy,
    greedy_merge,
    hflip,
    iou,
    match_score,
    rescale,
    translate,
    xyxy_to_cxcywh,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_formats_round_trip():
    b = t([10, 5, 20, 8])  # pixel columns 10..19, rows 5..7
    assert xyxy_to_cxcywh(b).tolist() == [[15, 6.5, 10, 3]]
    assert cxcywh_to_xyxy(xyxy_to_cxcywh(b)).tolist() == b.tolist()
    assert area(b).tolist() == [30]
    assert area(t([5, 5, 4, 9])).tolist() == [0]  # inverted: empty


def test_iou_hand_computed():
    a = t([0, 0, 10, 10])
    others = t([5, 5, 15, 15],  # 25 / (100 + 100 - 25)
               [10, 0, 20, 10],  # touching edges: no overlap
               [2, 2, 4, 4],  # inside: 4 / 100
               [0, 0, 10, 10],
               [3, 3, 3, 3])  # empty
    assert iou(a, others).tolist() == pytest.approx([1 / 7, 0, 0.04, 1, 0])
    assert iou(t([3, 3, 3, 3]), t([3, 3, 3, 3])).tolist() == [0]  # no 0/0
    # paired vs pairwise
    m = iou(others[:, None], others[None])
    assert m.shape == (5, 5)
    assert torch.equal(m.diagonal(), iou(others, others))
    assert torch.equal(m, m.T)


def test_transforms_hand_computed():
    b = t([40, 20, 100, 60])
    assert rescale(b, 0.5, 0.25).tolist() == [[20, 5, 50, 15]]
    assert translate(b, -10, 5).tolist() == [[30, 25, 90, 65]]
    assert hflip(b, 120).tolist() == [[20, 20, 80, 60]]
    assert hflip(hflip(b, 120), 120).tolist() == b.tolist()
    out, changed = clip(t([-8, 5, 22, 25], [1, 2, 3, 4], [40, 40, 50, 50]), 32, 32)
    assert out.tolist() == [[0, 5, 22, 25], [1, 2, 3, 4], [32, 32, 32, 32]]
    assert changed.tolist() == [True, False, True]
    assert area(out).tolist() == [440, 4, 0]  # wholly outside: nothing left


def test_window_maps_image_boxes_into_a_flipped_crop_and_back():
    # a 200x100 image rescaled to 100x50 (S=50), the crop (10, 5)-(42, 37)
    win = Window((200, 100), (100, 50), (10, 5, 42, 37))
    b = t([40, 20, 100, 60])  # -> (20, 10, 50, 30) rescaled -> (10, 5, 40, 25) in the crop
    assert win.from_image(b).tolist() == [[10, 5, 40, 25]]
    flipped = Window((200, 100), (100, 50), (10, 5, 42, 37), flip=True)
    assert flipped.from_image(b).tolist() == [[32 - 40, 5, 32 - 10, 25]]
    for w in (win, flipped):
        assert torch.allclose(w.to_image(w.from_image(b)), b)
    assert win.size == (32, 32) and win.scale == (0.5, 0.5)


# A, B, D overlap in a row; C is far away. Scores by hand (mean side 10):
# A-B: centres 1 apart -> 0.1, IoU 90/110 -> 0.1 + 0.181818 = 0.281818
# B-D: 0.2 + (1 - 80/120) = 0.533333;  A-D: 0.3 + (1 - 70/130) = 0.761538
# after merging A and B into AB = (0.5, 0, 10.5, 10): AB-D = 0.25 + (1 - 75/125) = 0.65
A, B, C, D = [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [3, 0, 13, 10]
BOXES, SCORES = t(A, B, C, D), torch.tensor([0.2, 0.3, 0.45, 0.1], dtype=torch.float64)


def test_match_score_hand_computed():
    assert match_score(t(A), t(B)).item() == pytest.approx(0.281818, abs=1e-6)
    assert match_score(t(B), t(D)).item() == pytest.approx(0.533333, abs=1e-6)
    assert match_score(t(A), t(D)).item() == pytest.approx(0.761538, abs=1e-6)
    assert match_score(t(A), t(A)).item() == 0
    assert match_score(t(A), t(C)).item() > 1  # disjoint: 1 - IoU = 1 plus the distance


@pytest.mark.parametrize("threshold,boxes,scores,counts", [
    (0.2, [C, B, A, D], [0.45, 0.3, 0.2, 0.1], [1, 1, 1, 1]),  # nothing close enough
    (0.5, [[0.5, 0, 10.5, 10], C, D], [0.5, 0.45, 0.1], [2, 1, 1]),  # A+B only
    # A+B, then AB+D: the mean of all three (pairwise averaging would give x1 = 1.75)
    (0.7, [[4 / 3, 0, 34 / 3, 10], C], [0.6, 0.45], [3, 1]),
    (10.0, [[13.5, 12.5, 23.5, 22.5]], [1.05], [4]),  # a threshold above every score
])
def test_greedy_merge_hand_computed(threshold, boxes, scores, counts):
    got, summed, n = greedy_merge(BOXES, SCORES, threshold)
    assert torch.allclose(got, t(*boxes))
    assert summed.tolist() == pytest.approx(scores)
    assert n.tolist() == counts


def test_greedy_merge_default_keeps_disjoint_boxes_apart_and_rates_by_summed_score():
    # three weak overlapping boxes outscore one strong box elsewhere
    boxes = t(A, B, D, C)
    got, summed, n = greedy_merge(boxes, torch.tensor([0.3, 0.3, 0.3, 0.8], dtype=torch.float64))
    assert n.tolist() == [3, 1]
    assert summed.tolist() == pytest.approx([0.9, 0.8])
    assert torch.allclose(got[1], t(C)[0])
    one, s, k = greedy_merge(t(A), torch.tensor([0.4], dtype=torch.float64))
    assert one.tolist() == [A] and k.tolist() == [1]
    with pytest.raises(ValueError, match=r"boxes \(n, 4\) and scores \(n,\)"):
        greedy_merge(t(A, B), torch.ones(3))


def _white_box_image(path) -> torch.Tensor:
    """A 150x100 black PNG with a white rectangle over pixel columns 30..79 and rows 20..59."""
    from PIL import Image

    img = Image.new("RGB", (150, 100))
    img.paste((255, 255, 255), (30, 20, 80, 60))
    img.save(path)
    return t([30, 20, 80, 60])


def _extent(pixels) -> list[float]:
    """xyxy of the pixels brighter than mid-grey."""
    ys, xs = torch.nonzero(torch.as_tensor(pixels).float().mean(-1) > 127.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("scale,crop,u,v,flip", [
    (64, 48, 0.3, 0.9, False), (64, 48, 0.7, 0.2, True),  # shrunk 100 -> 64
    (160, 128, 0.5, 0.4, True), (160, 128, 0.99, 0.0, False),  # enlarged 100 -> 160
])
def test_training_crop_box_follows_the_crop(tmp_path, scale, crop, u, v, flip):
    from vggnet.transforms import TrainTransform

    box = _white_box_image(tmp_path / "x.png")
    tf = TrainTransform(scale=(scale, scale), crop_size=crop)
    pixels, win = tf.view(tmp_path / "x.png", {"s": scale, "u": u, "v": v, "flip": flip,
                                               "alpha": None})
    assert pixels.shape == (crop, crop, 3)
    assert win.flip == flip and win.size == (crop, crop)
    inside, _ = clip(win.from_image(box), crop, crop)
    # crop_resized starts a window up to one source pixel before its grid position
    tol = max(1.0, scale / 100)
    assert inside[0].tolist() == pytest.approx(_extent(pixels), abs=tol)


@pytest.mark.parametrize("crop", [64, None])
def test_test_view_box_follows_the_view(tmp_path, crop):
    from vggnet.transforms import EvalTransform

    box = _white_box_image(tmp_path / "x.png")
    pixels, win = EvalTransform(size=80, crop_size=crop).view(tmp_path / "x.png")
    assert win.box == ((28, 8, 92, 72) if crop else (0, 0, 120, 80))
    inside, changed = clip(win.from_image(box), *win.size)
    assert changed.item() == (crop is not None)  # the central crop cuts the rectangle's left
    assert inside[0].tolist() == pytest.approx(_extent(pixels), abs=1.0)
