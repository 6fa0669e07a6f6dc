"""The ``vggnet`` command: a thin layer mapping subcommands to the package's functions."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .model import VGGConfig, list_models, resolve_name


def _config_from_args(args: argparse.Namespace) -> VGGConfig:
    arch, bn = resolve_name(args.model)
    return VGGConfig(arch=arch, batch_norm=bn or args.batch_norm, num_classes=args.num_classes,
                     width=args.width, crop_size=args.crop_size, in_channels=args.in_channels)


def _add_model_args(p: argparse.ArgumentParser, model_default: str | None = "D") -> None:
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-norm", action="store_true", help="add batch norm after every conv")
    p.add_argument("--width", type=float, default=1.0, help="multiplies every conv and FC width")
    p.add_argument("--crop-size", type=int, default=224, help="training crop (fc6 kernel = crop/32)")
    p.add_argument("--in-channels", type=int, default=3)


# --- info ----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_table, summarize

    size = tuple(args.size) if args.size else None
    if args.model:
        print(format_table(_config_from_args(args), size))
        return 0
    # Table 2 of the paper, plus cost: every column at this size
    print(f"{'config':<8} {'weight layers':>13} {'parameters':>14} {'mult-adds':>10} {'act. mem':>10}")
    for arch in ("A", "A-LRN", "B", "C", "D", "E"):
        args.model = arch
        cfg = _config_from_args(args)
        s = summarize(cfg, size)
        layers = sum(1 for r in s["rows"] if r.kind.startswith(("conv", "FC")))
        print(f"{cfg.name:<8} {layers:>13} {s['params']:>14,} {s['macs'] / 1e9:>9.2f}G "
              f"{s['activation_bytes'] / 2**20:>8.1f}Mi")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="paper-style layer table, parameters, multiply-adds, memory",
                       description="Print the layer table of a configuration (or a summary of all).")
    p.add_argument("model", nargs="?", help=f"one of {', '.join(list_models())}; omit for all")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the crop size); larger sizes run the head densely")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)


# --- demo ----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo
    from .synthetic import SyntheticSpec

    spec = SyntheticSpec(seed=args.seed, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, num_classes=args.classes)
    overrides = {k: v for k, v in (("width", args.width), ("crop_size", args.crop_size),
                                   ("scale", args.scale and (args.scale[0], args.scale[-1])),
                                   ("batch_size", args.batch_size)) if v is not None}
    result = run_demo(DemoSettings(data_dir=args.data_dir, out=args.out, dataset=spec, model=args.model,
                                   epochs=args.epochs, precision=args.precision, workers=args.workers,
                                   progress=args.progress, overrides=overrides))
    return 130 if result.status == "interrupted" else 0


def _add_demo(sub) -> None:
    from .demo import DemoSettings
    from .synthetic import SyntheticSpec

    d, spec = DemoSettings(), SyntheticSpec()
    p = sub.add_parser("demo", help="the main job: built-in data, train a reduced VGG, evaluate, report",
                       description="The main job: write the built-in synthetic dataset (reused when "
                       "there), train VGG A (with batch norm) with the paper's recipe at reduced size (preset "
                       "'reduced'), "
                       "evaluate best.pt on the validation split and write a run folder with "
                       "checkpoints, metrics, plots and report.md.")
    p.add_argument("--data-dir", default=d.data_dir, help=f"where the dataset goes (default {d.data_dir})")
    p.add_argument("--out", help="run folder (default runs/demo-DATE)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=spec.seed, help="dataset seed")
    p.add_argument("--train-per-class", type=int, default=spec.train_per_class)
    p.add_argument("--val-per-class", type=int, default=spec.val_per_class)
    p.add_argument("--classes", type=int, default=spec.num_classes)
    p.add_argument("--width", type=float, help="override the reduced preset's width")
    p.add_argument("--crop-size", type=int, help="override the reduced preset's crop")
    p.add_argument("--scale", type=int, nargs="+", metavar="S", help="override the training scale")
    p.add_argument("--batch-size", type=int, help="override the reduced preset's batch")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="default: bf16 on a CPU with native bf16, else the runtime's choice")
    p.add_argument("--workers", type=int, help="loader processes")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_demo)


# --- data ----------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


def cmd_data_make(args: argparse.Namespace) -> int:
    from .synthetic import SyntheticSpec, is_made, make_synthetic

    spec = SyntheticSpec(seed=args.seed, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, num_classes=args.classes,
                         min_side=args.min_side, max_side=args.max_side)
    cached = is_made(args.dir, spec) and not args.force
    if not cached:
        with _progress(spec.count("train") + spec.count("val"), "writing") as bar:
            make_synthetic(args.dir, spec, workers=args.workers, progress=bar.update, force=args.force)
    print(f"{'already there (cached):' if cached else 'wrote'} {args.dir}: {spec.count('train')} train / "
          f"{spec.count('val')} val JPEGs in {spec.num_classes} classes ({', '.join(spec.classes)})")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import check_dataset, open_dataset

    d = open_dataset(args.dir, args.val_labels)  # layout errors first, before the scan
    with _progress(len(d.train) + len(d.val), "scanning") as bar:
        report = check_dataset(d, workers=args.workers, progress=bar.update)
    print(report.format())
    return 1 if report.bad else 0


def _add_data(sub) -> None:
    from .synthetic import SyntheticSpec

    p = sub.add_parser("data", help="make the built-in dataset, check a dataset for bad files",
                       description="Datasets: the built-in synthetic one, and checks of any dataset.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = SyntheticSpec()
    m = dsub.add_parser("make", help="write the built-in synthetic dataset (JPEG image folders)",
                        description="Write the built-in dataset: synthetic shapes on cluttered "
                        "backgrounds, deterministic from --seed, as DIR/train/<class>/*.jpg and "
                        "DIR/val/<class>/*.jpg. A complete copy with the same settings is reused.")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=d.seed)
    m.add_argument("--train-per-class", type=int, default=d.train_per_class)
    m.add_argument("--val-per-class", type=int, default=d.val_per_class)
    m.add_argument("--classes", type=int, default=d.num_classes, help="number of classes (2-10)")
    m.add_argument("--min-side", type=int, default=d.min_side, help="smallest shorter image side")
    m.add_argument("--max-side", type=int, default=d.max_side, help="largest shorter image side")
    m.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    m.add_argument("--force", action="store_true", help="regenerate even if a copy is there")
    m.set_defaults(func=cmd_data_make)
    c = dsub.add_parser("check", help="list a dataset and scan every file for decoding problems",
                        description="List a dataset (train/ and val/ class folders, or ImageNet "
                        "layouts) and decode every file inside a guard; print each bad file with "
                        "its reason. Exit code 1 if any file is bad.")
    c.add_argument("dir")
    c.add_argument("--val-labels", default=None,
                   help="labels of a flat val folder (LOC_val_solution.csv or the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt next to meta.mat)")
    c.add_argument("--workers", type=int, default=None, help="decoding threads")
    c.set_defaults(func=cmd_data_check)


# --- train ---------------------------------------------------------------------------------
def _train_overrides(args: argparse.Namespace) -> dict:
    keys = ("data", "out", "val_labels", "model", "batch_norm", "width", "crop_size", "dropout", "init",
            "init_from", "scale", "flip", "pca_std", "stats_images", "batch_size", "micro_batch", "lr",
            "momentum", "weight_decay", "lr_factor", "lr_patience", "lr_drops", "epochs", "seed",
            "device", "precision", "channels_last", "compile", "workers", "skip_bad", "scan",
            "save_every_min", "progress")
    d = {k: getattr(args, k) for k in keys}
    if d["scale"] is not None:
        d["scale"] = (d["scale"][0], d["scale"][-1])
    return d


def cmd_train(args: argparse.Namespace) -> int:
    from .train import make_settings, train

    if args.resume:
        runtime_keys = ("workers", "progress", "device", "precision", "channels_last", "compile", "epochs")
        given = {k: v for k, v in _train_overrides(args).items() if v is not None}
        other = sorted(set(given) - set(runtime_keys))
        if other:
            raise ValueError(f"--resume continues a run with its own settings; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in runtime_keys)} may be "
                             f"given with it, got {', '.join('--' + k.replace('_', '-') for k in other)}")
        result = train(resume=args.resume, **given)
    else:
        if not args.data:
            raise ValueError("--data DIR is required (a folder with train/ and val/; "
                             "`vggnet data make DIR` writes the built-in dataset)")
        result = train(make_settings(args.preset, **_train_overrides(args)))
    if result.status == "interrupted":
        return 130
    print(f"{result.status} after {result.epochs} epoch(s), {result.seconds / 60:.1f} min: best val "
          f"top-1 error {100 * result.best_top1_err:.2f}%, top-5 {100 * result.best_top5_err:.2f}%; "
          f"run folder {result.folder} (report.md)")
    return 0


def _add_train(sub) -> None:
    from .train import PRESETS

    p = sub.add_parser("train", help="train a VGG net with the paper's recipe",
                       description="Train with the paper's recipe (SGD momentum 0.9, weight decay 5e-4, "
                       "dropout 0.5, batch 256, lr 1e-2 divided by 10 on validation plateaus, scale "
                       "augmentation, flips, PCA colour shift). Options not given come from --preset. "
                       "Ctrl-C or SIGTERM finishes the step, saves last.pt and says how to resume.")
    p.add_argument("--data", help="dataset folder with train/ and val/ (see `vggnet data check`)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: 224 crops, S=256, full width; reduced: the same ratios at 64 crops, "
                   "width 1/8 (default: paper)")
    p.add_argument("--out", help="run folder (default runs/MODEL-PRESET-DATE)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or its last.pt) exactly")
    p.add_argument("--val-labels", help="labels file of a flat ImageNet val folder")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="A, A-LRN, B, C, D, E or vgg11..vgg19[_bn] (default A)")
    g.add_argument("--batch-norm", action="store_true", default=None)
    g.add_argument("--width", type=float, help="multiplies every conv and FC width")
    g.add_argument("--crop-size", type=int, help="training crop (224 in the paper)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--init", choices=("glorot", "paper", "kaiming"),
                   help="glorot (default) or paper (N(0, 0.01)) for layers not initialised from --init-from")
    g.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="stage chaining: net A into a deeper net (conv1_1, conv2_1, conv3_1, conv3_2, "
                   "fc6-8), otherwise every layer whose name and shape match")
    g = p.add_argument_group("input")
    g.add_argument("--scale", type=int, nargs="+", metavar="S",
                   help="training scale: S (fixed), or SMIN SMAX (jittered per image)")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=None)
    g.add_argument("--pca-std", type=float, help="std of the PCA colour shift (0.1; 0 turns it off)")
    g.add_argument("--stats-images", type=int, help="training images read for mean RGB and colour PCA")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch (256 in the paper)")
    g.add_argument("--micro-batch", type=int,
                   help="images per forward pass; the step accumulates gradients exactly")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lr-factor", type=float, help="lr multiplier at a plateau (0.1)")
    g.add_argument("--lr-patience", type=int, help="epochs without a better val top-1 before a drop")
    g.add_argument("--lr-drops", type=int, help="drops allowed; the next plateau stops training (3)")
    g.add_argument("--epochs", type=int, help="at most this many epochs")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--workers", type=int, help="loader processes (default: cores - 1)")
    g.add_argument("--skip-bad", action="store_true", default=None,
                   help="train without the files that fail to decode (default: refuse to start)")
    g.add_argument("--no-scan", dest="scan", action="store_false", default=None,
                   help="skip the decode check before training (bad files are then skipped as met)")
    g.add_argument("--save-every-min", type=float, help="also save last.pt mid-epoch this often (30)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_train)


# --- convert -------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    loaded = convert(args.input, args.output, model=args.model, sha256=args.sha256,
                     prototxt=args.prototxt)
    c, p = loaded.model.config, loaded.preprocessing
    prov = loaded.meta.get("provenance", {})
    print(f"{args.input}: {prov.get('source_format', 'vggnet')} weights, sha256 {prov.get('sha256', '-')}")
    print(f"  model: VGG {c.name}, width {c.width:g}, {c.num_classes} classes, crop {c.crop_size}")
    print(f"  input: {p.channel_order}, white = {p.scale:g}, mean {list(p.mean)}, std {list(p.std)}")
    names = loaded.class_names
    print(f"  class names: {f'{len(names)} ({names[0]}, {names[1]}, ...)' if names else 'none'}")
    print(f"wrote {args.output}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import torchvision, Keras or Caffe VGG weights",
                       description="Convert a torchvision state dict (.pth), Keras VGG16/VGG19 weights "
                       "(.h5, .weights.h5) or the authors' Caffe release (.caffemodel) into vggnet's "
                       "safetensors format, with its preprocessing and class names. The format is "
                       "detected from the file; the model column, width, classes and crop from the shapes.")
    p.add_argument("input", help="weights file to import")
    p.add_argument("output", help="safetensors file to write")
    p.add_argument("--model", help="column to load into (e.g. D, vgg19, C); default: inferred")
    p.add_argument("--sha256", help="expected SHA-256 of the input (full, or a prefix of >= 8 hex digits)")
    p.add_argument("--prototxt", help="Caffe deploy .prototxt defining the net (optional)")
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vggnet", description="Build, train, evaluate, import, inspect and deploy VGG networks "
        "(Simonyan & Zisserman, ICLR 2015).")
    parser.add_argument("--version", action="version", version=f"vggnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_info, _add_data, _add_train, _add_convert):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"vggnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vggnet {args.command}: interrupted", file=sys.stderr)
        return 130
