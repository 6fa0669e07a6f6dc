"""Progress bars for long work: tqdm on stderr (count, rate, elapsed and time left), or none.

Every command that can take more than a few seconds shows one, and ``--no-progress`` turns
them all off; results never depend on it.
"""

from __future__ import annotations

import sys


class _NoBar:
    """What ``progress_bar`` returns when disabled: the same methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True,
                 initial: int = 0):
    """A bar over ``total`` units (a context manager; ``update(n)`` as work is done)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                leave=False, file=sys.stderr)
