import numpy as np
import pytest
import torch
from PIL import Image

from vggnet import synthetic
from vggnet.annotations import (
    LabelledBox,
    attach_boxes,
    read_box_csv,
    read_box_xml,
    read_boxes,
    write_box_csv,
)
from vggnet.data import open_dataset
from vggnet.synthetic import BOX_FILES, SyntheticSpec, image_id, object_box, render_all


def _outline_extent(p: synthetic.Placement, w: float, h: float) -> tuple[float, ...]:
    """The extent of the shape's outline (polygon, or outer circle: the crescent lies inside
    it) clipped to the frame [0, w] x [0, h]: its boundary sampled every ~0.01 pixel where it
    is inside the frame, plus the frame's corners that are inside the shape."""
    from matplotlib.path import Path as Outline

    if p.shape in synthetic.POLYGONS:
        corners = np.array(synthetic._place(synthetic.POLYGONS[p.shape], p.cx, p.cy, p.r, p.angle))
        f = np.linspace(0, 1, 10_000)[:, None, None]
        edge = (corners + f * (np.roll(corners, -1, 0) - corners)).reshape(-1, 2)
    else:
        a = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
        corners = edge = np.stack([p.cx + p.r * np.cos(a), p.cy + p.r * np.sin(a)], 1)
    edge = edge[(edge[:, 0] >= 0) & (edge[:, 0] <= w) & (edge[:, 1] >= 0) & (edge[:, 1] <= h)]
    frame = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    pts = np.concatenate([edge, frame[Outline(corners).contains_points(frame)]])
    return (*pts.min(0).tolist(), *pts.max(0).tolist())


def test_synthetic_box_is_the_drawn_shapes_extent():
    spec = SyntheticSpec(seed=3, train_per_class=3, val_per_class=1)
    partly_outside = 0
    for i in range(spec.count("train")):
        image, label, _, box, place = render_all(spec, "train", i)
        w, h = image.size
        assert place.shape == spec.classes[label]
        x1, y1, x2, y2 = _outline_extent(place, w, h)
        partly_outside += (x1, y1, x2, y2) != pytest.approx(_outline_extent(place, 1e9, 1e9))
        # the shape's pixels lie inside its outline's extent (within a pixel) ...
        assert box[0] >= x1 - 1 and box[1] >= y1 - 1 and box[2] <= x2 + 1 and box[3] <= y2 + 1
        if place.shape != "crescent":  # (a circle minus another: inside the outer circle)
            # ... and touch its edges, within a pixel
            assert box == pytest.approx((x1, y1, x2, y2), abs=1.0), (i, place)
        assert object_box(spec, "train", i) == box
    assert partly_outside >= 2  # the generator puts some objects partly out of the frame


def test_make_synthetic_writes_the_boxes_next_to_the_images(data):
    spec = SyntheticSpec(seed=1, train_per_class=8, val_per_class=2, num_classes=3,
                         min_side=36, max_side=48)  # conftest's tiny dataset
    ds = open_dataset(data)
    for split, samples in (("train", ds.train.samples), ("val", ds.val.samples)):
        ann = read_box_csv(data / BOX_FILES[split])
        assert list(ann) == [image_id(spec, i) for i in range(spec.count(split))]
        for i in range(spec.count(split)):
            assert ann[image_id(spec, i)] == [LabelledBox(spec.classes[i % 3],
                                                          object_box(spec, split, i))]
        boxed, report = attach_boxes(samples, ann)
        assert report.boxed == len(samples) and not report.skipped and not report.clipped
        for s in boxed:
            assert s.box_labels == (ds.class_names[s.label],)
            w, h = Image.open(s.path).size
            x1, y1, x2, y2 = s.boxes[0].tolist()
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_csv_round_trip(tmp_path):
    ann = {"ILSVRC2012_val_00000001": [LabelledBox("n01751748", (10, 20, 30, 40)),
                                       LabelledBox("n01751748", (0.5, 1.25, 99, 100))],
           "n02017213_7894": [LabelledBox("n02017213", (122, 64, 473, 410))]}
    write_box_csv(tmp_path / "b.csv", ann)
    text = (tmp_path / "b.csv").read_text()
    assert text.splitlines()[:2] == [
        "ImageId,PredictionString",
        "ILSVRC2012_val_00000001,n01751748 10 20 30 40 n01751748 0.5 1.25 99 100"]
    assert read_box_csv(tmp_path / "b.csv") == ann
    assert read_boxes(tmp_path / "b.csv") == (ann, {})


@pytest.mark.parametrize("line,message", [
    ("img_2,n01 1 2 3", r"line 3: expected 'ImageId,wnid x1 y1 x2 y2"),
    ("img_2,", r"line 3: expected"),
    ("img_2,n01 1 2 x 4", r"line 3: box coordinates must be numbers, got '1 2 x 4'"),
    ("img_2,n01 5 2 3 4", r"line 3: box \(5, 2, 3, 4\) has x2 < x1"),
    ("img_1,n01 1 2 3 4", r"line 3: image 'img_1' is listed twice"),
])
def test_malformed_csv_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "LOC_val_solution.csv"
    p.write_text(f"ImageId,PredictionString\nimg_1,n01 1 2 3 4 \n{line}\n")
    with pytest.raises(ValueError, match=message) as e:
        read_box_csv(p)
    assert "LOC_val_solution.csv" in str(e.value)
    p.write_text("ImageId,Labels\nimg_1,n01 1 2 3 4\n")
    with pytest.raises(ValueError, match="line 1: expected the header"):
        read_box_csv(p)


def _xml(filename, size, objects) -> str:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return (f"<annotation><folder>x</folder><filename>{filename}</filename><size>"
            f"<width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{objs}"
            "</annotation>")


def test_xml_folder_with_clipping_and_skipping(tmp_path):
    folder = tmp_path / "val"
    (folder / "n01").mkdir(parents=True)
    (folder / "n01" / "a.xml").write_text(_xml("a", (100, 80), [
        ("n01", (10, 10, 50, 60)),
        ("n01", (-5, 70, 120, 90)),  # partly outside: clipped to (0, 70, 100, 80)
        ("n02", (100, 0, 140, 20))]))  # wholly outside (touches the right edge): left out
    (folder / "b.xml").write_text(_xml("b.JPEG", (64, 64), []))  # no box
    (folder / "c.xml").write_text(_xml("c", (50, 50), [("n02", (60, 60, 70, 70))]))
    ann, sizes = read_boxes(folder)
    assert sorted(ann) == ["a", "b", "c"] and sizes["a"] == (100, 80)
    assert ann["a"][1] == LabelledBox("n01", (-5, 70, 120, 90))
    samples = [("/d/a.JPEG", 0), ("/d/b.JPEG", 1), ("/d/c.JPEG", 1), ("/d/z.JPEG", 0)]
    boxed, report = attach_boxes(samples, ann, sizes)
    assert [s.path for s in boxed] == ["/d/a.JPEG"]
    assert boxed[0].boxes.tolist() == [[10, 10, 50, 60], [0, 70, 100, 80]]
    assert boxed[0].boxes_of("n01").shape == (2, 4) and boxed[0].boxes_of("n02").shape == (0, 4)
    assert (report.images, report.boxed, report.clipped, report.dropped) == (4, 1, 1, 2)
    assert [why for _, why in report.skipped] == [
        "no box in the box file", "every box lies outside the image", "no box in the box file"]
    assert report.summary().startswith("1 of 4 image(s) have boxes; 3 skipped, e.g. '/d/b.JPEG'")


def test_csv_boxes_are_clipped_to_the_image_files_size(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    boxed, report = attach_boxes([(str(tmp_path / "x.png"), 2)],
                                 {"x": [LabelledBox("cat", (30, 20, 45, 35))]})
    assert boxed[0].boxes.tolist() == [[30, 20, 40, 30]] and report.clipped == 1
    assert torch.is_floating_point(boxed[0].boxes)


@pytest.mark.parametrize("text,message", [
    ("<annotation><object>", r"a.xml' line 1: not well-formed XML"),
    (_xml("a", (10, 10), [("n01", (1, 2, 3, 4))]).replace("<ymax>4</ymax>", ""),
     r"a.xml' object 1: missing <ymax>"),
    (_xml("a", (10, 10), [("n01", (1, 2, 3, 4))]).replace("<name>n01</name>", ""),
     r"a.xml' object 1: missing <name>"),
    (_xml("a", (10, 10), [("n01", (3, 2, 1, 4))]), r"a.xml' object 1: box \(3, 2, 1, 4\)"),
])
def test_malformed_xml_names_the_file(tmp_path, text, message):
    (tmp_path / "a.xml").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_box_xml(tmp_path / "a.xml")
    with pytest.raises(ValueError, match=message):
        read_boxes(tmp_path)


def test_read_boxes_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="give a LOC_\\*_solution.csv or a folder"):
        read_boxes(tmp_path / "nope.csv")
