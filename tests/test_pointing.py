"""The pointing game: peaks of upsampled maps, hits by hand on a net whose class score is its
brightest pixel, and the bookkeeping and centre baseline on the built-in dataset."""

import torch

import vggnet
from test_explain import max_pixel_net  # class 2 scores the maximum of input channel 0
from vggnet.annotations import attach_boxes, read_boxes
from vggnet.data import open_dataset
from vggnet.pointing import PointingResult, inside, peak_points, play_batch, pointing_game
from vggnet.preprocess import Preprocessing
from vggnet.protocol import centre_crop_resize
from vggnet.transforms import EvalTransform
from vggnet.weights import LoadedModel


def test_inside_excludes_the_right_and_bottom_edges():
    box = [torch.tensor([[2.0, 3.0, 6.0, 8.0]])] * 4
    points = torch.tensor([[2.0, 3.0], [5.9, 7.9], [6.0, 5.0], [4.0, 8.0]])
    assert inside(points, box).tolist() == [True, True, False, False]
    two = [torch.tensor([[0.0, 0.0, 1.0, 1.0], [4.0, 4.0, 5.0, 5.0]])]
    assert inside(torch.tensor([[4.5, 4.5]]), two).tolist() == [True]


def test_peak_points_after_upsampling():
    # a 2x2 map to 8x8 (bilinear, half-pixel centres): the top-right cell's value fills
    # rows 0-1, columns 6-7; the first of them in row-major order is (x=6, y=0)
    cam = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert peak_points(cam, (8, 8)).tolist() == [[6.5, 0.5]]
    sal = torch.zeros(1, 8, 8)
    sal[0, 5, 2] = 3.0  # at the input's size: the pixel itself
    assert peak_points(sal, (8, 8)).tolist() == [[2.5, 5.5]]


def test_hits_by_hand():
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    pixels[0, 0, 21, 5] = 200  # saliency peak (5.5, 21.5); Grad-CAM relu4_2 cell (2, 0) of 8 px:
    pixels[1, 0, 3, 29] = 200  # upsampled peaks (3.5, 19.5) and (27.5, 3.5)
    boxes = [torch.tensor([[0.0, 16.0, 12.0, 28.0]]),  # holds image 0's peaks, not the centre
             torch.tensor([[10.0, 10.0, 22.0, 22.0]])]  # holds the centre only
    result = PointingResult()
    play_batch(LoadedModel(max_pixel_net(), Preprocessing()), pixels, torch.tensor([2, 2]),
               boxes, ["relu4_2"], result)
    assert (result.images, result.correct) == (2, 2)
    assert result.hits == {"saliency": 1, "gradcam relu4_2": 1, "centre": 1}
    assert result.hits_when_correct == result.hits
    assert result.rate("saliency") == 0.5


def test_pointing_game_on_the_built_in_dataset(data):
    """Every validation image is played or left out, and the centre baseline is the hand
    count: the crop's centre inside the box mapped from the stored image."""
    d = open_dataset(data)
    annotations, sizes = read_boxes(data / "LOC_val_solution.csv")
    samples, report = attach_boxes(d.val.samples, annotations, sizes)
    assert report.boxed == len(d.val) == 6
    model = vggnet.create_model("A", num_classes=3, width=1 / 16, crop_size=32, seed=0)
    loaded = LoadedModel(model, Preprocessing(mean=(120.0, 120.0, 120.0)))
    r = pointing_game(loaded, samples, d.class_names, ["relu5_2", "relu3_2"], batch_size=4,
                      progress=False)
    assert r.images + r.left_out == 6 and 0 <= r.correct <= r.images
    assert set(r.hits) == {"saliency", "gradcam relu5_2", "gradcam relu3_2", "centre"}
    assert all(0 <= h <= r.images for h in r.hits.values())
    tf = EvalTransform(centre_crop_resize(32), 32)
    want = 0
    for s in samples:
        x1, y1, x2, y2 = tf.view(s.path)[1].from_image(s.boxes)[0].tolist()
        want += x1 <= 16 < x2 and y1 <= 16 < y2
    assert r.hits["centre"] == want
