"""The seeded, stratified train/val split of one folder of class folders."""

import hashlib
import random

import pytest

from vggnet.split import check_split_record, split_record, split_samples, val_count


def tree(root, counts):
    """(path, class) samples: class c has counts[c] files root/c<c>/img<i>.jpg."""
    return [(f"{root}/c{c}/img{i:02d}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def test_val_counts_per_class():
    assert [val_count(n, 0.1) for n in (1, 2, 3, 10, 14, 15, 100)] == [0, 1, 1, 1, 1, 2, 10]
    assert [val_count(n, 0.5) for n in (1, 2, 3, 10)] == [0, 1, 2, 5]
    assert val_count(10, 0.99) == 9  # a class keeps at least one training file


def test_stratified_counts_and_partition():
    samples = tree("/data", [20, 3, 2, 1])
    train, val = split_samples(samples, 0.1, seed=0, root="/data")
    assert [sum(c == k for _, c in val) for k in range(4)] == [2, 1, 1, 0]
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert train == sorted(train, key=lambda s: (s[1], s[0]))  # sorted by (class, path)


def test_val_files_are_the_smallest_seeded_digests():
    samples = tree("/data", [6])
    _, val = split_samples(samples, 0.5, seed=7, root="/data")
    digest = {p: hashlib.sha256(f"7:{p[len('/data/'):]}".encode()).hexdigest() for p, _ in samples}
    assert [p for p, _ in val] == sorted(sorted(digest, key=digest.get)[:3])


def test_same_seed_same_split_whatever_the_order_or_location():
    samples = tree("/data", [12, 9, 5])
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert split_samples(samples, 0.25, 1, "/data") == split_samples(shuffled, 0.25, 1, "/data")
    moved = [(p.replace("/data", "/elsewhere/copy"), c) for p, c in shuffled]
    _, val_moved = split_samples(moved, 0.25, 1, "/elsewhere/copy")
    _, val = split_samples(samples, 0.25, 1, "/data")
    assert [p.replace("/elsewhere/copy", "/data") for p, _ in val_moved] == [p for p, _ in val]
    # another seed draws another validation set
    assert split_samples(samples, 0.25, 2, "/data")[1] != val


def test_adding_a_file_moves_at_most_one():
    samples = tree("/data", [30])
    _, before = split_samples(samples, 0.2, 0, "/data")
    _, after = split_samples(samples + [("/data/c0/new.jpg", 0)], 0.2, 0, "/data")
    assert len(before) == len(after) == 6
    assert len(set(before) - set(after)) <= 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"between 0 and 1 \(e.g. 0.1\), got 1.5"):
        split_samples(tree("/d", [3]), 1.5)
    with pytest.raises(ValueError, match=r"got '0.1'"):
        split_samples(tree("/d", [3]), "0.1")
    with pytest.raises(ValueError, match=r"1 file\(s\) listed more than once, e.g. 'c0/img00.jpg'"):
        split_samples(tree("/d", [3]) + [("/d/c0/img00.jpg", 0)], 0.5, root="/d")


def test_split_record_detects_a_changed_tree():
    samples = tree("/data", [10, 10])
    _, val = split_samples(samples, 0.2, 5, "/data")
    record = split_record(val, 0.2, 5, "/data")
    assert record["val_images"] == 4 and len(record["val_sha256"]) == 64
    check_split_record(record, val, "/data")  # the same split: no error
    moved = [(p.replace("/data", "/mnt/data"), c) for p, c in val]
    check_split_record(record, moved, "/mnt/data")  # the same tree elsewhere: no error
    renamed = [(p.replace("img", "IMG", 1) if i == 0 else p, c) for i, (p, c) in enumerate(val)]
    with pytest.raises(ValueError, match="validation split differs .* added, removed or renamed"):
        check_split_record(record, renamed, "/data")
    with pytest.raises(ValueError, match=r"now 3 images"):
        check_split_record(record, val[1:], "/data")
