"""The ``medxfer`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from medxfer.errors import MedxferError

TRAIN_HELP = {
    "arch": "torchvision classifier name (e.g. resnet18) or timm/NAME",
    "mode": "transfer (frozen ImageNet backbone, new head), scratch, finetune, or partial",
    "bn": "BatchNorm of frozen layers: frozen (eval statistics), adapt (re-estimated once on "
    "the training X-rays), train (batch statistics)",
    "trainable_stages": "partial mode: how many of the last backbone stages train",
    "normalize": "paper (mean 0.5, std 0.5) or imagenet (the weights' own mean/std)",
    "weights": "a local weights file instead of the standard download",
    "weights_tag": "torchvision weights enum member",
    "image_size": "working resolution (default: 224, 299 for inception_v3)",
    "augment": "augmentation preset: paper or none",
    "feature_cache": "frozen backbones: compute features once per view, train the head on them",
    "views": "augmented views per training image kept in the feature cache",
    "eval_batch_size": "batch size for evaluation and feature extraction",
    "optimizer": "adam, adamw or sgd",
    "val_fraction": "carve this fraction of train (by patient, stratified) into validation",
    "patient_regex": "regex whose first group is the patient id in a file name",
    "positive": "positive class (default: PNEUMONIA, else the second class in sorted order)",
    "select": "best-epoch rule on validation data: val_loss, val_auc or last",
    "threshold": "operating point chosen on validation: 0.5, youden, or sens=0.95",
    "device": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps",
    "amp": "mixed precision on CUDA (bf16 where supported)",
    "skip_bad": "leave unreadable images out (listed in metrics.json) instead of stopping",
    "bootstrap": "bootstrap resamples for the 95%% intervals of test metrics (0: none)",
    "limit_per_class": "use at most N images per class in each split (quick looks, tests)",
    "cache_dir": "cache of decoded images and features (default: $MEDXFER_CACHE or "
    "~/.cache/medxfer)",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except MedxferError as exc:
        print(f"medxfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medxfer: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medxfer",
        description="ImageNet feature transfer vs training from scratch on "
        "medical images (Gu & Lee, Bioengineering 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (resumes an interrupted one)")
    p.add_argument("--data", required=True, help="folder tree, .npz or .csv manifest")
    p.add_argument("--out", required=True, help="run folder to write")
    _add_config_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.set_defaults(handler=_train)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a dataset")
    p.add_argument("run", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--threshold", type=float, default=None, help="default: the run's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the metrics to this file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("audit", help="counts, sizes, unreadable files, duplicates, leaks")
    p.add_argument("data")
    p.add_argument("--patient-regex", default=None)
    p.add_argument("--json", type=Path, help="also write the full report to this file")
    p.set_defaults(handler=_audit)

    p = sub.add_parser("models", help="architectures and whether their weights are here")
    p.add_argument("--all", action="store_true", help="every torchvision classifier")
    p.set_defaults(handler=_models)

    p = sub.add_parser("weights", help="put weight files where torch's hub cache looks")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(handler=_weights)
    return parser


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from medxfer.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    group = parser.add_argument_group("run options (all saved in config.json)")
    for f in fields(RunConfig):
        if f.name in ("data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kind = _base_type(hints[f.name])
        help_text = TRAIN_HELP.get(f.name, "") + f" (default: {default})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(flag, type=kind, default=default, help=help_text)


def _base_type(hint) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def config_from_args(args: argparse.Namespace):
    from medxfer.config import RunConfig

    return RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})


def _train(args: argparse.Namespace) -> int:
    from medxfer.runner import read_metrics, train

    cfg = config_from_args(args)
    log = (lambda _msg: None) if args.quiet else print
    run = train(cfg, progress=not args.quiet, overwrite=args.overwrite, log=log)
    test = read_metrics(run)["test"]
    print(
        f"{run}: test accuracy {test['accuracy']:.4f} precision {test['precision']:.4f} "
        f"recall {test['recall']:.4f} f1 {test['f1']:.4f} auc {test['roc_auc']:.4f}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medxfer.atomic import write_json
    from medxfer.runner import evaluate

    result = evaluate(
        args.run,
        args.data,
        split=args.split,
        threshold=args.threshold,
        device_name=args.device,
        progress=not args.quiet,
    )
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from medxfer.atomic import write_json
    from medxfer.data.audit import audit, format_audit
    from medxfer.data.splits import KERMANY_PATIENT_REGEX

    report = audit(args.data, args.patient_regex or KERMANY_PATIENT_REGEX)
    if args.json:
        write_json(args.json, report)
    print(format_audit(report))
    return 0


def _models(args: argparse.Namespace) -> int:
    from medxfer.models.factory import PAPER_ARCHS
    from medxfer.models.weights import torchvision_archs, torchvision_weights

    names = torchvision_archs() if args.all else list(PAPER_ARCHS)
    print(f"{'architecture':<28}{'weights file':<40}available here")
    for name in names:
        w = torchvision_weights(name)
        if w is None:
            print(f"{name:<28}{'-':<40}no pretrained weights")
            continue
        print(f"{name:<28}{w.filename:<40}{'yes' if w.cached_path.exists() else 'no'}")
    print(
        "\nAlso: any timm model as timm/NAME (weights through timm's pretrained config, or "
        "--weights PATH)."
    )
    if not args.all:
        print("`medxfer models --all` lists every torchvision classifier.")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from medxfer.models.weights import install_weights

    for path in args.files:
        print(f"{path} -> {install_weights(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
