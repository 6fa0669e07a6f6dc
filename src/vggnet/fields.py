"""Settings dataclasses: the metadata their fields carry, and reading them back from files.

A field made with ``option`` carries what the command line shows and checks (help text,
choices, a metavar, positional or not); ``vggnet.cli`` turns every field of a settings class
into an option from that alone. ``nested`` makes a field hold another dataclass whose own
fields become options (e.g. the built-in dataset's spec inside the demo's settings).
``known_fields`` is the one check applied to every config read back from a file.

Imports nothing from vggnet, so that any module may use it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: tuple | None = None,
           metavar: str | None = None, positional: bool | str = False, cli: bool = True,
           group: str | None = None, flag: str | None = None) -> Any:
    """A dataclass field with command-line metadata.

    ``default`` omitted: the option is required. ``positional``: True for a positional
    argument, or its argparse nargs ("?", "+"). ``cli=False``: not an option (set by the
    program). ``group``: the heading it is listed under in ``--help``. ``flag``: the option's
    name where the field's cannot be it (``--from``: a Python keyword). Mutable defaults (a
    list, a dict) are not allowed: use a tuple.
    """
    meta = {"help": help, "choices": choices, "metavar": metavar, "positional": positional,
            "cli": cli, "group": group, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def nested(cls_path: str, *, rename: Mapping[str, str] | None = None,
           help: Mapping[str, str] | None = None, only: tuple[str, ...] | None = None,
           partial: bool = False) -> Any:
    """A field holding a dataclass given as "module:Class" (imported when first needed, so a
    settings module stays light); its fields (``only`` these, if given) become options,
    ``rename``d and with ``help`` where the class's own fields carry none. ``partial``: the
    field holds a dict of the options given instead (e.g. overrides of a preset)."""
    meta = {"nested": cls_path, "rename": dict(rename or {}), "help_of": dict(help or {}),
            "only": only, "partial": partial, "cli": True}
    factory = dict if partial else (lambda: resolve(cls_path)())
    return dataclasses.field(default_factory=factory, metadata=meta)


def resolve(path: str) -> Any:
    """"vggnet.synthetic:SyntheticSpec" -> the object it names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def known_fields(cls, d: dict, what: str) -> dict:
    """``d`` if every key is a field of dataclass ``cls``; else an error naming the strays.

    Shared by every config read back from a file (model, preprocessing, training settings),
    so a file from another version fails loudly instead of being half-applied."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {sorted(fields)}")
    return d
