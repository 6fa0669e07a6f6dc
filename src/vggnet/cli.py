"""The ``vggnet`` command: a table of commands, each a settings class and a library function.

Every option is generated from the fields of the command's settings dataclass (see
``vggnet.settings``): the field's name is the flag (``batch_size`` -> ``--batch-size``), its
metadata the help text and choices, its type the parsing. A bool is ``--x/--no-x``; a tuple
of ints is comma-separated (``--scales 256,384,512``) everywhere. Only the options given on
the command line reach the settings, so every default is the dataclass's own. The library
function gets the settings object and returns the exit code.

Adding a command is one entry in ``COMMANDS`` (a settings class and a function, named as
"module:name" and imported only when that command runs): nothing here imports torch, so
``vggnet --help`` and ``vggnet COMMAND --help`` are fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import types
import typing
from dataclasses import dataclass

from .fields import resolve

DESCRIPTION = ("Build, train, evaluate, import, inspect and deploy VGG networks "
               "(Simonyan & Zisserman, ICLR 2015).")
# errors that are the user's to fix: one line and exit code 2, no traceback. OSError: a file
# that cannot be read or written (checkpoint.WriteError: a full disk, saying what is intact)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


@dataclass(frozen=True)
class Command:
    settings: str  # "module:Class": a dataclass whose fields are the options
    run: str  # "module:function": takes the settings, returns the exit code (None: 0)
    help: str  # one line in `vggnet --help`


@dataclass(frozen=True)
class Group:
    """A command with actions of its own (``vggnet data make|check``)."""

    help: str
    description: str
    actions: dict[str, Command]


S = "vggnet.settings:"
COMMANDS: dict[str, Command | Group] = {
    "demo": Command(S + "DemoSettings", "vggnet.demo:demo_command",
                    "the main job: built-in data, train a reduced VGG, evaluate, report"),
    "info": Command(S + "InfoSettings", "vggnet.info:info_command",
                    "paper-style layer table, parameters, multiply-adds, memory"),
    "data": Group("make the built-in dataset, check a dataset for bad files",
                  "Datasets: the built-in synthetic one, and checks of any dataset.", {
                      "make": Command(S + "MakeDataSettings", "vggnet.data:make_data_command",
                                      "write the built-in synthetic dataset (JPEG folders)"),
                      "check": Command(S + "CheckDataSettings",
                                       "vggnet.data:check_data_command",
                                       "list a dataset and scan every file for decoding "
                                       "problems")}),
    "train": Command(S + "TrainCommand", "vggnet.train:train_command",
                     "train a VGG net with the paper's recipe"),
    "evaluate": Command(S + "EvaluateCommand", "vggnet.evaluate:evaluate_command",
                        "top-1/top-5 error with the paper's test protocol"),
    "reproduce": Command(S + "StudySettings", "vggnet.studies:reproduce_command",
                         "the paper's study: train, evaluate, Tables 3-6 and findings"),
    "convert": Command(S + "ConvertSettings", "vggnet.convert:convert_command",
                       "import torchvision, Keras or Caffe VGG weights"),
    "predict": Command(S + "PredictSettings", "vggnet.predict:predict_command",
                       "top-k classes of images"),
    "features": Command(S + "FeaturesSettings", "vggnet.features:features_command",
                        "layer taps or the paper's transfer descriptors"),
    "probe": Command(S + "ProbeSettings", "vggnet.probe:probe_command",
                     "linear classifier on transfer descriptors (Appendix B)"),
    "export": Command(S + "ExportSettings", "vggnet.export:export_command",
                      "ONNX or TorchScript graph, checked against PyTorch"),
    "bench": Command(S + "BenchSettings", "vggnet.bench:bench_command",
                     "benchmark suite: our defaults against plain PyTorch, same run"),
    "localize": Group("localisation (Appendix A): box regression, test protocols 1 and 2",
                      "Localisation nets made from trained classifiers (the paper's Appendix "
                      "A), their test protocols and their boxes drawn on images.", {
                          "train": Command(S + "LocalizeTrainCommand",
                                           "vggnet.localize_train:localize_train_command",
                                           "fine-tune a classifier into a box regressor"),
                          "evaluate": Command(S + "LocalizeEvaluateCommand",
                                              "vggnet.localize_eval:localize_evaluate_command",
                                              "localisation error, protocol 1 or 2, fusion"),
                          "predict": Command(S + "LocalizePredictCommand",
                                             "vggnet.localize_predict:localize_predict_command",
                                             "top-5 (class, box) guesses drawn on images")}),
}
# VGG as a backbone (issue 13)
COMMANDS["finetune"] = Command(S + "FinetuneSettings", "vggnet.finetune:finetune_command",
                               "fine-tune trained weights on your own folder of classes")
COMMANDS["stylize"] = Command(S + "StylizeCommand", "vggnet.stylize:stylize_command",
                              "neural style transfer (Gatys et al.) through a frozen VGG")
COMMANDS["explain"] = Command(S + "ExplainSettings", "vggnet.explain:explain_command",
                              "Grad-CAM and saliency maps of a classifier's decisions")
COMMANDS["retrieve"] = Command(S + "RetrieveSettings", "vggnet.retrieval:retrieve_command",
                               "rank database images by descriptor similarity to queries")


# --- options from dataclass fields ---------------------------------------------------------------
def int_list(text: str) -> tuple[int, ...]:
    """The one syntax of integer lists: "256,384,512" (or a single "256")."""
    try:
        return tuple(int(q) for q in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,384,512, "
                                         f"got {text!r}") from None


def name_list(text: str) -> tuple[str, ...]:
    """Names the same way: "relu1_1,relu2_1" (or a single "relu4_2")."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names like relu1_1,relu2_1, "
                                         f"got {text!r}")
    return names


def _value_type(hint, positional: bool = False):
    """How an option's text becomes the field's value: None for a bool (a flag), ``int_list``
    for a tuple of ints, ``name_list`` for a tuple of strings (str, one per argument, when
    positional), else the type itself (``int | None`` -> int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return None
    if typing.get_origin(hint) is tuple:
        if typing.get_args(hint)[0] is int:
            return int_list
        return str if positional else name_list
    return hint


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _argument(parser, groups: dict, f: dataclasses.Field, hint, dest: str, flag: str,
              help: str) -> None:
    """One option (or positional argument) for field ``f``; not given: absent."""
    m, parse = f.metadata, _value_type(hint, bool(f.metadata.get("positional")))
    if f.default not in (dataclasses.MISSING, None, "") and parse is not None:
        help += f" (default: {_shown(f.default)})"
    kw: dict = {"help": help or None, "default": argparse.SUPPRESS}
    if parse is None:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"], kw["choices"] = parse, m.get("choices")
        kw["metavar"] = m.get("metavar") or (None if kw["choices"] else flag.upper())
    target = parser
    if m.get("group"):
        if m["group"] not in groups:
            groups[m["group"]] = parser.add_argument_group(m["group"])
        target = groups[m["group"]]
    if m.get("positional"):
        nargs = None if m["positional"] is True else m["positional"]
        target.add_argument(dest, nargs=nargs, **kw)
    else:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        target.add_argument("--" + flag.replace("_", "-"), dest=dest, required=required, **kw)


def add_options(parser: argparse.ArgumentParser, cls, groups: dict | None = None,
                prefix: str = "", meta: dict | None = None) -> None:
    """An option for every field of dataclass ``cls`` meant for the command line; a
    ``fields.nested`` field adds the options of its class (dests "field.name")."""
    groups = {} if groups is None else groups
    meta = meta or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True) or (meta.get("only") and f.name not in meta["only"]):
            continue
        if "nested" in m:
            add_options(parser, resolve(m["nested"]), groups, f"{f.name}.", m)
            continue
        flag = m.get("flag") or meta.get("rename", {}).get(f.name, f.name)
        help = m.get("help") or meta.get("help_of", {}).get(f.name, "")
        _argument(parser, groups, f, hints[f.name], prefix + f.name, flag, help)


def settings_from_options(cls, values: dict, argv: list[str]):
    """The settings object from the options given (dest -> value); nested classes are built
    from theirs, a partial one is the dict of what was given."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "nested" in m:
            given = {k.split(".", 1)[1]: v for k, v in values.items()
                     if k.startswith(f.name + ".")}
            kwargs[f.name] = given if m["partial"] else resolve(m["nested"])(**given)
        elif f.name in values:
            v = values[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if "argv" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["argv"] = tuple(argv)
    return cls(**kwargs)


# --- the parser and main --------------------------------------------------------------------
def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every command's name and one-line help; options only for the command ``argv`` names
    (so that nothing else is imported)."""
    parser = argparse.ArgumentParser(prog="vggnet", description=DESCRIPTION)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vggnet {__version__}")
    _add_commands(parser, COMMANDS, argv, "_command", "COMMAND")
    return parser


def _add_commands(parser, table: dict, argv: list[str], dest: str, metavar: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, entry in table.items():
        p = sub.add_parser(name, help=entry.help)
        if not argv or argv[0] != name:
            continue
        if isinstance(entry, Group):
            p.description = entry.description
            _add_commands(p, entry.actions, argv[1:], "_action", "ACTION")
            continue
        cls = resolve(entry.settings)
        p.description = " ".join(cls.__doc__.split())
        add_options(p, cls)
        p.set_defaults(_run=entry, _parser=p)


def parse(argv: list[str]) -> dict:
    """The options of ``vggnet ARGV`` (dest -> value). An argument no option takes is an
    error of the command's own parser (its usage line), with the list syntax when it is a
    number: ``--scales 256 384`` says that lists are comma-separated."""
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = ""
        if any(x.lstrip("-").replace(".", "", 1).isdigit() for x in extra):
            hint = "; lists of numbers are comma-separated, e.g. --scales 256,384,512"
        vars(args).get("_parser", parser).error(
            f"unrecognized arguments: {' '.join(extra)}{hint}")
    return vars(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    command, entry = args["_command"], args["_run"]
    values = {k: v for k, v in args.items() if not k.startswith("_")}
    rest = argv[argv.index(command) + 1:]  # the command's own arguments (torchrun relaunches)
    try:
        settings = settings_from_options(resolve(entry.settings), values, rest)
        return resolve(entry.run)(settings) or 0
    except USER_ERRORS as e:
        print(f"vggnet {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vggnet {command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The program (``vggnet``, ``python -m vggnet``): ``main``, then exit with its code. A
    Ctrl-C from then on (while the interpreter shuts down: loader workers, torch's finalizers)
    exits at once with 130, instead of a traceback from an atexit callback."""
    code = 130
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C between main's own handling and here
        pass
    finally:
        signal.signal(signal.SIGINT, lambda signum, frame: _exit_now(130))
    sys.exit(code)


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
