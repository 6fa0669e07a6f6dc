"""The ``vggnet`` command: a thin layer mapping subcommands to the package's functions."""

from __future__ import annotations

import argparse
import os
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
                                   ("scale", args.scale and (args.scale[0], args.scale[-1])))
                 if v is not None}
    result = run_demo(DemoSettings(data_dir=args.data_dir, out=args.out, dataset=spec, model=args.model,
                                   epochs=args.epochs, batch_size=args.batch_size, precision=args.precision, workers=args.workers,
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
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch (default {d.batch_size}: see vggnet.demo)")
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
            "save_every_min", "progress", "dist_timeout_s", "bucket_mb", "grad_compression", "sync_bn",
            "max_skips")
    d = {k: getattr(args, k) for k in keys}
    if d["scale"] is not None:
        d["scale"] = (d["scale"][0], d["scale"][-1])
    return d


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")  # each takes a value


def _without_launch_options(argv: list[str]) -> list[str]:
    """``vggnet train`` arguments minus the ones that only tell how to launch torchrun."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif a.split("=")[0] not in LAUNCH_OPTIONS:
            out.append(a)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .train import make_settings, train

    if args.nproc and "RANK" not in os.environ:  # launch torchrun, which runs this command N times
        import subprocess

        from .distributed import torchrun_command

        argv = _without_launch_options(args.argv[args.argv.index("train") + 1:])
        cmd = torchrun_command(argv, args.nproc, args.nnodes, args.rdzv_endpoint, args.max_restarts)
        print("launching:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)
    if args.resume:
        runtime_keys = ("workers", "progress", "device", "precision", "channels_last", "compile", "epochs",
                        "dist_timeout_s", "bucket_mb")
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
    from .distributed import env_info

    if env_info().is_main:
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
    g = p.add_argument_group("data parallel (torchrun)", "`vggnet train --nproc N ...` runs torchrun; "
                             "or run `torchrun --nproc-per-node N -m vggnet train ...` yourself. "
                             "--batch-size stays the global batch.")
    g.add_argument("--nproc", type=int, help="processes (GPUs) per node; launches torchrun")
    g.add_argument("--nnodes", default="1", help="nodes (or MIN:MAX), with --rdzv-endpoint")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous of a multi-node run")
    g.add_argument("--max-restarts", type=int, default=0,
                   help="restarts of the group after a failed process; it resumes from last.pt")
    g.add_argument("--dist-timeout-s", type=float, help="a collective waiting longer fails (600)")
    g.add_argument("--bucket-mb", type=float, help="DDP gradient bucket size in MiB (25)")
    g.add_argument("--grad-compression", choices=("none", "bf16", "fp16"),
                   help="all-reduce gradients in half precision (halves the traffic)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm (GPUs)")
    g.add_argument("--max-skips", type=int,
                   help="consecutive non-finite steps, skipped on every process, before halting (3)")
    p.set_defaults(func=cmd_train)


# --- convert -------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .imagenet import describe

    loaded = convert(args.input, args.output, model=args.model, sha256=args.sha256,
                     prototxt=args.prototxt)
    c, p = loaded.model.config, loaded.preprocessing
    prov = loaded.meta.get("provenance", {})
    print(f"{args.input}: {prov.get('source_format', 'vggnet')} weights, sha256 {prov.get('sha256', '-')}")
    print(f"  model: VGG {c.name}, width {c.width:g}, {c.num_classes} classes, crop {c.crop_size}")
    print(f"  input: {p.channel_order}, white = {p.scale:g}, mean {list(p.mean)}, std {list(p.std)}")
    names = loaded.class_names
    print(f"  class names: {f'{len(names)} ({describe(names[0])}, ...)' if names else 'none'}")
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


# --- evaluate ------------------------------------------------------------------------------
def _scales_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(q) for q in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,384,512, got {text!r}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalSettings, evaluate, format_report, list_eval_data, write_report

    settings = EvalSettings(method=args.method, scales=args.scales, multi_scale=args.multi_scale,
                            flip=not args.no_flip, grid=args.grid, batch_size=args.batch_size,
                            workers=args.workers)
    samples, classes = list_eval_data(args.data, args.split, args.val_labels)
    report = evaluate(args.checkpoints, samples, classes, settings, device=args.device,
                      precision=args.precision)
    print(format_report(report))
    files = write_report(report, args.out)
    print(f"wrote {files['json']}, {files['csv']}, {files['png']}")
    return 0


def _add_evaluate(sub) -> None:
    from .evaluate import METHODS

    p = sub.add_parser("evaluate", help="top-1/top-5 error with the paper's test protocol",
                       description="Evaluate a checkpoint or weights file, or an ensemble of several "
                       "(soft-max posteriors averaged), with the paper's protocol: images rescaled "
                       "to each test scale Q, dense or multi-crop evaluation, horizontal flips.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("--data", required=True, help="dataset folder: train/ and val/ (any layout "
                   "`vggnet data check` reads), or one folder per class")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--val-labels", default=None, help="labels of a flat ImageNet val folder")
    p.add_argument("--method", choices=METHODS, default="dense",
                   help="center: one centre crop; dense: the fully convolutional net on the whole "
                   "image; multicrop: a grid of crops; dense+multicrop: both, averaged")
    p.add_argument("--scales", type=_scales_arg, default=None, metavar="Q1,Q2,...",
                   help="test scales (smaller image side); default: from training, as the paper")
    p.add_argument("--multi-scale", action="store_true", help="default scales {S-32,S,S+32} "
                   "(fixed S) or {Smin,mid,Smax} (jittered S) instead of one")
    p.add_argument("--no-flip", action="store_true", help="do not average with horizontal flips")
    p.add_argument("--grid", type=int, default=5, help="multicrop: GRID x GRID crops per scale")
    p.add_argument("--batch-size", type=int, default=32, help="crop-sized inputs per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: 0 on the CPU, up to 8 with a GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--out", default="evaluation", help="folder for results.json, per_class.csv, "
                   "confusion.png (default: ./evaluation)")
    p.set_defaults(func=cmd_evaluate)


# --- reproduce -----------------------------------------------------------------------------
def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import Study, StudySettings, findings, load_cells

    settings = StudySettings(preset=args.preset, data=args.data, out=args.out, epochs=args.epochs,
                             finetune_epochs=args.finetune_epochs, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, width=args.width, batch_size=args.batch_size,
                             threads=args.threads,
                             device=args.device, precision=args.precision, workers=args.workers,
                             progress=args.progress)
    report = Study(settings).run()
    for f in findings(load_cells(args.out)):
        print(f"{f.verdict:>16}: {f.claim}")
    print(f"wrote {report}")
    return 0


def _add_reproduce(sub) -> None:
    from .reproduce import STUDY_PRESETS

    p = sub.add_parser("reproduce", help="the paper's study: train, evaluate, Tables 3-6 and findings",
                       description="Train what Tables 3-6 need (A, A-LRN, B, C, D, E at S=256; C, D, E "
                       "at S=384 from their S=256 nets and at S=[256;512] from their S=384 nets; B-E "
                       "start from A), evaluate every cell, and write OUT/report.md with each number "
                       "beside the paper's and a verdict on each finding. Rerunning resumes: finished "
                       "trainings and cells are kept.")
    p.add_argument("--data", help="dataset with train/ and val/ (default: the built-in dataset, "
                   "written to OUT/data; the paper preset needs ImageNet here)")
    p.add_argument("--out", default="reproduce", help="study folder (default: ./reproduce)")
    p.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="reduced",
                   help="reduced: 64-pixel crops on 2 CPU cores; paper: the full protocol")
    p.add_argument("--epochs", type=int, help="epochs of each S=256 stage")
    p.add_argument("--finetune-epochs", type=int, help="epochs of each S=384 and jittered stage")
    p.add_argument("--train-per-class", type=int, help="built-in dataset: training images per class")
    p.add_argument("--val-per-class", type=int, help="built-in dataset: validation images per class")
    p.add_argument("--width", type=float, help="width multiplier of every net")
    p.add_argument("--batch-size", type=int, help="global batch of every training (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--workers", type=int, help="training loader processes")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    p.set_defaults(func=cmd_reproduce)


# --- predict, features, probe, export --------------------------------------------------------
def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="vggnet weights file or training checkpoint "
                   "(import others with `vggnet convert`)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPUs and on CPUs with native bf16 (docs/benchmarks.md), "
                   "else fp32; fp32 for full float32 numbers")


def _load(args: argparse.Namespace):
    from .runtime import make_runtime
    from .weights import load_model

    return load_model(args.weights), make_runtime(args.device, args.precision)


def cmd_predict(args: argparse.Namespace) -> int:
    from .features import list_images
    from .imagenet import describe
    from .predict import predict

    loaded, rt = _load(args)
    calibration = list_images([args.int8]) if args.int8 else None
    failed = 0
    for pred in predict(loaded, args.images, top=args.top, dense=args.dense, scales=args.scales, runtime=rt,
                        int8_calibration=calibration):
        if pred.error:
            failed += 1
            print(f"vggnet predict: error: {pred.error}", file=sys.stderr)
            continue
        print(pred.path)
        for rank, (index, name, prob) in enumerate(pred.top, 1):
            print(f"  {rank}. {prob:7.2%}  {describe(name)} [{index}]")
    return 1 if failed else 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of images",
                       description="Classify images with a weights file, applying its preprocessing "
                       "and class names. Default: centre crop of the image rescaled to 256/224 of the "
                       "crop size; --dense: the fully convolutional net on whole images at each scale, "
                       "averaged with the mirror image (the paper's dense evaluation).")
    p.add_argument("images", nargs="+", help="image files")
    _add_weights_args(p)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--dense", action="store_true", help="dense evaluation instead of a centre crop")
    p.add_argument("--scales", type=int, nargs="+", metavar="Q",
                   help="shorter side(s) the image is rescaled to: every Q with --dense, the first for "
                   "the centre crop (default: 256/224 of the crop size, i.e. 256 for 224)")
    p.add_argument("--int8", metavar="DIR",
                   help="run an int8 copy of the model, calibrated on up to 256 images under DIR "
                   "(representative ones, e.g. training images): CPU, centre crop only; about 2x the "
                   "bf16 speed, less exact (docs/benchmarks.md)")
    p.set_defaults(func=cmd_predict)


def cmd_features(args: argparse.Namespace) -> int:
    from .features import (
        TRANSFER_LAYER,
        default_transfer_scales,
        extract_files,
        list_images,
        save_features,
    )

    loaded, rt = _load(args)
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else None
    paths = list_images(args.inputs)
    tensors = extract_files(loaded, paths, layers=layers, size=args.size, scales=args.scales,
                            batch_size=args.batch_size, runtime=rt)
    meta = {"weights": str(args.weights), "paths": [str(p) for p in paths]}
    if layers:
        meta |= {"layers": layers, "size": args.size or loaded.model.config.crop_size}
    else:
        meta |= {"transfer": TRANSFER_LAYER, "l2_normalised": True,
                 "scales": args.scales or default_transfer_scales(loaded.model.config.crop_size)}
    save_features(args.out, tensors, meta)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"{len(paths)} images: {shapes} -> {args.out}")
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="layer taps or the paper's transfer descriptors",
                       description="Save layer outputs (--layers relu1_2,relu2_2,... on centre crops) or, "
                       "without --layers, the paper's transfer descriptor (Appendix B): dense relu7 "
                       "averaged over locations, flips and scales, L2-normalised.")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    _add_weights_args(p)
    p.add_argument("--layers", help="comma-separated layer names, e.g. relu1_2,relu2_2,relu3_3,relu4_3")
    p.add_argument("--size", type=int, help="crop size for --layers (default: the model's crop size)")
    p.add_argument("--scales", type=int, nargs="+", metavar="Q",
                   help="scales of the transfer descriptor (default: 256 384 512 for a 224 crop)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output .safetensors or .npz")
    p.set_defaults(func=cmd_features)


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run_probe

    loaded, rt = _load(args)
    r = run_probe(loaded, args.data, scales=args.scales, weight_decay=args.weight_decay, runtime=rt)
    print(f"linear probe on {args.data}: {len(r.classes)} classes, {r.n_train} train / {r.n_val} val images")
    print(f"  train accuracy {r.train_accuracy:.2%}, val accuracy {r.val_accuracy:.2%}")
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear classifier on transfer descriptors (Appendix B)",
                       description="Train a linear classifier (L2-regularised logistic regression) on the "
                       "transfer descriptors of DIR/train/<class>/* and report its accuracy on DIR/val/<class>/*.")
    _add_weights_args(p)
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--scales", type=int, nargs="+", metavar="Q")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the classifier")
    p.set_defaults(func=cmd_probe)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .weights import load_model

    report = export(load_model(args.weights), args.out, fmt=args.format, dense=args.dense)
    print(f"wrote {report.path} ({args.format}, {'dense' if args.dense else 'classifier'} graph)")
    for shape, diff in report.max_abs_diff.items():
        print(f"  checked on {shape}: max |{args.format} - PyTorch| = {diff:.2e}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX or TorchScript graph, checked against PyTorch",
                       description="Export the classifier (crop-size input, dynamic batch) or with --dense "
                       "the fully convolutional net (dynamic batch, height and width), then check it "
                       "against PyTorch (onnxruntime for ONNX).")
    p.add_argument("--weights", required=True)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--dense", action="store_true", help="fully convolutional graph for any image size")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
# --- bench ---------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from .bench import ITEMS, Settings, run
    from .runtime import make_runtime

    rt = make_runtime(args.device)
    s = Settings.quick() if args.quick else Settings.for_device(rt.device)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        s.repeats = args.repeats
    s.compile = args.compile
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    items = args.items.split(",") if args.items else ITEMS
    report = run(s, rt, items, trained=args.trained, data=args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0


def _add_bench(sub) -> None:
    from .bench import ITEMS

    p = sub.add_parser("bench", help="benchmark suite: our defaults against plain PyTorch, same run",
                       description="Time inference, training and memory with the default runtime "
                       "against plain float32 NCHW eager PyTorch, in the same run, with the "
                       "machine's matmul peak. See docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    p.add_argument("--items", help=f"comma-separated subset of {','.join(ITEMS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed repetitions per candidate (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="also time inference through torch.compile (reports the compile time)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--trained", metavar="CHECKPOINT", help="trained model for the top-1 agreement "
                   "item (default: the newest runs/demo-*/best.pt of `make demo`)")
    p.add_argument("--data", metavar="DIR", help="its dataset (default: the one it was trained on)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vggnet", description="Build, train, evaluate, import, inspect and deploy VGG networks "
        "(Simonyan & Zisserman, ICLR 2015).")
    parser.add_argument("--version", action="version", version=f"vggnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_info, _add_data, _add_train, _add_evaluate, _add_reproduce, _add_convert,
                _add_predict, _add_features, _add_probe, _add_export, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError) as e:
        print(f"vggnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vggnet {args.command}: interrupted", file=sys.stderr)
        return 130
