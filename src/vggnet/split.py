"""A validation split carved out of one folder of class folders (``--val-split 0.1``).

Deterministic and stratified: within each class, every file gets a key, the SHA-256 of
"<seed>:<path relative to the root>", and the files with the smallest keys go to validation,
round(n * fraction) of them (at least 1 and at most n - 1 for a class of n >= 2 files; a
class of one file stays in training). So the split depends only on the seed, the fraction
and the relative paths: not on the filesystem's listing order, nor on where the tree lives;
adding a file to a class moves at most one other file between the two sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePath

Sample = tuple[str, int]  # (path, class index), as data.Split holds them


def relative_key(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """The path relative to ``root`` (as given when root is None), with "/" separators."""
    p = PurePath(os.path.relpath(path, root)) if root is not None else PurePath(path)
    return p.as_posix()


def val_count(n: int, fraction: float) -> int:
    """How many of a class's n files go to validation (see the module docstring)."""
    if n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def split_samples(samples: Sequence[Sample], fraction: float, seed: int = 0,
                  root: str | os.PathLike | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples, each sorted by (class, relative path)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be a number between 0 and 1 (e.g. 0.1), "
                         f"got {fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"the split seed must be an int, got {seed!r}")
    keyed = [(relative_key(p, root), (str(p), int(c))) for p, c in samples]
    counts = Counter(k for k, _ in keyed)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"{len(twice)} file(s) listed more than once, e.g. {twice[0]!r}; each "
                         "file may appear once")
    by_class: dict[int, list[tuple[str, str, Sample]]] = defaultdict(list)
    for key, sample in keyed:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
        by_class[sample[1]].append((digest, key, sample))
    train, val = [], []
    for label, files in by_class.items():
        ranked = sorted(files)  # by key digest: a seeded order independent of the listing
        k = val_count(len(ranked), fraction)
        val += [(label, key, s) for _, key, s in ranked[:k]]
        train += [(label, key, s) for _, key, s in ranked[k:]]
    return [s for *_, s in sorted(train)], [s for *_, s in sorted(val)]


def split_record(val: Sequence[Sample], fraction: float, seed: int,
                 root: str | os.PathLike | None = None) -> dict:
    """What a run stores to check on resume that it sees the same split: the settings, the
    validation size and the SHA-256 of its sorted relative paths and labels."""
    lines = sorted(f"{relative_key(p, root)}\t{c}" for p, c in val)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"fraction": fraction, "seed": seed, "val_images": len(lines), "val_sha256": digest}


def check_split_record(stored: dict, val: Sequence[Sample], root: str | os.PathLike | None = None
                       ) -> None:
    """An error naming what changed if ``val`` is not the split ``stored`` describes."""
    now = split_record(val, stored["fraction"], stored["seed"], root)
    if now != stored:
        raise ValueError(f"the validation split differs from the one this run started with "
                         f"({json.dumps(stored)}; now {now['val_images']} images, "
                         f"sha256 {now['val_sha256'][:12]}): files were added, removed or renamed "
                         f"under {str(Path(root)) if root is not None else 'the data folder'}; "
                         "restore them or start a new run")
