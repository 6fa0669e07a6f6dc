import dataclasses
import subprocess
import sys

import pytest

from vggnet.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "vggnet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "info" in out.stdout


def test_info_d(capsys):
    assert main(["info", "D"]) == 0
    out = capsys.readouterr().out
    assert "conv5_3   conv3-512" in out
    assert "parameters: 138,357,544" in out
    assert "15.47 G" in out


def test_info_all_and_dense_size(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "143,667,240" in out and "A-LRN" in out
    assert main(["info", "vgg16", "--size", "256,320"]) == 0
    assert "4096x2x4" in capsys.readouterr().out


def test_info_bad_name_is_a_clear_error(capsys):
    assert main(["info", "Z"]) == 2
    err = capsys.readouterr().err
    assert "unknown VGG model 'Z'" in err and "vgg16" in err
    assert main(["info", "D", "--size", "100,100"]) == 2
    assert "at least the crop size 224x224, got 100x100" in capsys.readouterr().err


def _parsers():
    """(name, parser of that command) for every command, built as `vggnet NAME ...` builds it."""
    from vggnet.cli import COMMANDS, Group, build_parser

    for name, entry in COMMANDS.items():
        paths = [[name, a] for a in entry.actions] if isinstance(entry, Group) else [[name]]
        for path in paths:
            parser = build_parser(path)
            for _ in path:
                sub = next(a for a in parser._actions if a.dest.startswith("_"))
                parser = sub.choices[_]
            yield " ".join(path), parser


def test_integer_lists_have_one_syntax_everywhere():
    from vggnet.cli import int_list

    seen = set()
    for name, parser in _parsers():
        for a in parser._actions:
            flag = a.option_strings[0] if a.option_strings else ""
            if flag in ("--scales", "--scale", "--size") and a.type is not int:  # lists
                assert a.type is int_list and a.nargs is None, (name, flag)
                seen.add(name)
    assert {"evaluate", "predict", "features", "probe", "train", "demo", "info", "finetune",
            "retrieve", "localize evaluate", "localize predict"} <= seen
    assert int_list("256,384,512") == (256, 384, 512) and int_list("73") == (73,)


@pytest.mark.parametrize("argv", [["predict", "x.jpg", "--weights", "w", "--scales", "256",
                                   "384"],
                                  ["evaluate", "ck.pt", "--data", "d", "--scales", "73", "82"]])
def test_a_space_separated_list_is_the_commands_error_with_the_syntax(argv, capsys):
    """Issue 15 item 6: before, the top-level parser said only "unrecognized arguments: 82"."""
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert f"usage: vggnet {argv[0]}" in err
    assert (f"vggnet {argv[0]}: error: unrecognized arguments: {argv[-1]}; lists of numbers are "
            "comma-separated, e.g. --scales 256,384,512") in err


def test_every_long_command_has_the_same_progress_flag_on_by_default():
    for name, parser in _parsers():
        flags = {s for a in parser._actions for s in a.option_strings}
        if name in ("demo", "train", "evaluate", "reproduce", "features", "probe", "data make",
                    "data check", "predict", "convert", "export", "finetune", "explain",
                    "retrieve", "localize train", "localize evaluate"):
            assert {"--progress", "--no-progress"} <= flags, name
    from vggnet import settings as S

    for cls in (S.DemoSettings, S.TrainSettings, S.EvaluateCommand, S.StudySettings,
                S.FeaturesSettings, S.ProbeSettings, S.MakeDataSettings, S.CheckDataSettings):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["progress"] is True, cls


def test_help_imports_no_torch():
    code = ("import sys; from vggnet.cli import build_parser\n"
            "for argv in ([], ['train'], ['evaluate'], ['predict'], ['reproduce']):\n"
            "    build_parser(argv)\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_options_are_the_settings_fields_and_the_paper_preset_is_their_defaults():
    from vggnet.protocol import PRESETS
    from vggnet.settings import TrainSettings

    parser = dict(_parsers())["train"]
    dests = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(TrainSettings) if f.name != "preset"}
    assert {f"given.{n}" for n in fields} <= dests  # every field is an option
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    for key, value in PRESETS["paper"].items():  # "--preset paper: the defaults shown"
        assert defaults[key] == value, key


def test_bad_option_values_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "x.jpg", "--weights", "w", "--scales", "256 384"])
    assert e.value.code == 2
    assert "expected comma-separated integers like 256,384,512, got '256 384'" in \
        capsys.readouterr().err
    assert main(["info", "D", "--size", "224"]) == 2
    assert "--size takes H,W (two integers), got 224" in capsys.readouterr().err
