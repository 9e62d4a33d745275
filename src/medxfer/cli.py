"""The ``medxfer`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from medxfer.config import ENGINES
from medxfer.data import collections as tables
from medxfer.errors import MedxferError, MedxferWarning


def main(argv: list[str] | None = None) -> int:
    from medxfer.runtime import tune_allocator

    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(_task_family_alias(sys.argv[1:] if argv is None else argv))
    try:
        tune_allocator(args.allocator)
        return args.handler(args) or 0
    except MedxferError as exc:
        print(f"medxfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medxfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """medxfer's own warnings as one line, like its errors; others as Python prints them."""
    if issubclass(category, MedxferWarning):
        return f"medxfer: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medxfer",
        description="ImageNet feature transfer vs training from scratch on "
        "medical images (Gu & Lee, Bioengineering 2024).",
    )
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default=None,
        help="tuned: keep freed activation buffers in glibc's heap (faster on CPUs); default: "
        "leave malloc alone (default: $MEDXFER_ALLOCATOR, else tuned)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train_commands,
        _add_data_commands,
        _add_model_commands,
        _add_similarity_command,
        _add_study_commands,
        _add_service_commands,
        _add_cache_commands,
        _add_segment_parser,
        _add_detect_parser,
    ):
        add(sub)
    return parser


def _add_train_commands(sub) -> None:
    """``train``, ``evaluate`` and ``ensemble``."""
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
    p.add_argument("--engine", choices=ENGINES, help="default: the run's own")
    p.add_argument("--json", type=Path, help="also write the metrics to this file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("ensemble", help="mean probability of runs scored on the same images")
    p.add_argument("runs", nargs="+", type=Path, help="finished classification run folders")
    p.add_argument("--out", type=Path, required=True, help="the ensemble's folder (new)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_ensemble)


def _add_data_commands(sub) -> None:
    """``audit``, ``manifest`` and ``models``."""
    p = sub.add_parser("audit", help="counts, sizes, unreadable files, duplicates, leaks")
    p.add_argument("data")
    p.add_argument("--patient-regex", default=None)
    p.add_argument("--json", type=Path, help="also write the full report to this file")
    _add_max_pixels(p)
    p.set_defaults(handler=_audit)

    p = sub.add_parser(
        "manifest", help="CSV manifest with labels from file names or a collection's tables"
    )
    p.add_argument("data")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--label-from-name", metavar="REGEX")
    source.add_argument(
        "--collection",
        choices=tables.COLLECTIONS,
        help="read a ChestX-ray14-, CheXpert- or MIMIC-CXR-JPG-shaped root",
    )
    p.add_argument("--patient-regex", default=None)
    p.add_argument(
        "--view", choices=tables.VIEWS, default="all", help="collection: keep these views"
    )
    p.add_argument(
        "--uncertain",
        choices=tables.UNCERTAIN,
        default="zeros",
        help="CheXpert's -1 (uncertain): ones (U-Ones), zeros (U-Zeros, default) or ignore "
        "(U-Ignore: unknown, masked out of loss, class weights, metrics and thresholds)",
    )
    p.add_argument(
        "--missing",
        choices=tables.MISSING,
        default="negative",
        help="CheXpert's blank (not mentioned): negative (the convention, default) or ignore",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out rows whose image is missing")
    p.add_argument("--out", type=Path, required=True, help="the manifest to write (.csv)")
    p.set_defaults(handler=_manifest)

    p = sub.add_parser("models", help="architectures and whether their weights are here")
    p.add_argument("--all", action="store_true", help="every torchvision classifier")
    p.set_defaults(handler=_models)


def _add_model_commands(sub) -> None:
    """``predict`` and ``export`` of a trained classification run."""
    p = sub.add_parser("predict", help="probabilities for new images (files, folders, globs)")
    p.add_argument("run", type=Path)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", type=Path, help="write .csv or .json here (default: CSV on stdout)")
    p.add_argument("--threshold", type=float, help="default: the run's own operating point")
    p.add_argument("--cam", type=Path, help="write a Grad-CAM overlay PNG per image here")
    p.add_argument(
        "--cam-class",
        help="class or label the Grad-CAM explains (default: the positive class for binary "
        "models, else the most probable class or label)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=ENGINES, help="default: the run's own")
    p.add_argument("--quiet", action="store_true")
    _add_max_pixels(p)
    p.set_defaults(handler=_predict)

    p = sub.add_parser("export", help="ONNX or TorchScript with preprocessing inside")
    p.add_argument("run", type=Path)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", type=Path, help="default: RUN/model.onnx or RUN/model.ts")
    p.add_argument(
        "--dynamic-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="any batch size (ONNX; TorchScript traces are batch-agnostic)",
    )
    p.set_defaults(handler=_export)


def _add_similarity_command(sub) -> None:
    p = sub.add_parser("similarity", help="feature distance between natural and medical images")
    p.add_argument("--arch", help="architecture (default: the run's)")
    p.add_argument("--natural", required=True, help="folder of natural photos")
    p.add_argument("--medical", required=True, help="medical dataset (folder, .npz or .csv)")
    p.add_argument("--run", type=Path, help="a trained run: also measure its fine-tuned backbone")
    p.add_argument("--layers", nargs="+", help="backbone stages to measure (default: all)")
    p.add_argument("--split", default="test", help="split of the medical dataset")
    p.add_argument("--image-size", type=int, help="default: the run's, else the arch's")
    p.add_argument(
        "--max-images",
        type=int,
        help="at most N images per domain: a random sample, the medical one stratified by class",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that sample (default: 0)")
    p.add_argument("--natural-gray", action="store_true", help="convert photos to gray too")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="see train --engine")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_similarity)


def _add_study_commands(sub) -> None:
    """``study run|show``."""
    p = sub.add_parser("study", help="run a grid of experiments (locally or on Ray)")
    study = p.add_subparsers(dest="study_command", required=True)
    for name in ("run", "show"):
        q = study.add_parser(name, help="run every cell" if name == "run" else "list the cells")
        q.add_argument(
            "study",
            help="a study TOML file or preset: paper, paper-offline, quick, segmentation, "
            "detection",
        )
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a base run option, e.g. --set image_size=96",
        )
        q.add_argument(
            "--grid",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="replace a grid axis, e.g. --grid arch=mobilenet_v2,resnet18",
        )
        if name == "run":
            q.add_argument("--out", required=True, type=Path)
            q.add_argument("--executor", choices=["local", "ray"], default="local")
            q.add_argument("--workers", type=int, default=1, help="local: parallel cells")
            q.add_argument("--address", help="ray: join this cluster (default: start one here)")
            q.add_argument("--cpus-per-cell", type=float, help="ray: CPUs per cell (default 1)")
            q.add_argument("--gpus-per-cell", type=float, default=0, help="ray: GPUs per cell")
        q.set_defaults(handler=_study_run if name == "run" else _study_show)


def _add_service_commands(sub) -> None:
    """``report``, ``serve`` and ``weights``."""
    p = sub.add_parser("report", help="Markdown + HTML report of a study's results")
    p.add_argument("study_dir", type=Path)
    p.set_defaults(handler=_report)

    p = sub.add_parser("serve", help="a web page that runs a trained model on uploaded images")
    p.add_argument("run", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("weights", help="put weight files where torch's hub cache looks")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(handler=_weights)


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    from medxfer.data.images import MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels than this (default: {MAX_PIXELS:,})",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from medxfer.config import RunConfig

    _add_options(parser, RunConfig)


def _add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """A flag per field of the options dataclass ``options`` (but ``data`` and ``out``), its
    type, default and help from the field and its metadata: one rule for every ``train``."""
    hints = typing.get_type_hints(options)
    group = parser.add_argument_group("run options (all saved in config.json)")
    for f in fields(options):
        if f.name in ("data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kind = _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, type=_names, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, help=help_text)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _base_type(hint) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def config_from_args(args: argparse.Namespace):
    from medxfer.config import RunConfig

    return RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})


def _train(args: argparse.Namespace) -> int:
    from medxfer.api import train
    from medxfer.evaluation.metrics import HEADLINE

    cfg = config_from_args(args)  # every value checked before anything runs
    folder = train(quiet=args.quiet, overwrite=args.overwrite, **cfg.to_dict())
    metrics = folder.read_metrics()
    test = metrics["test"]
    shown = " ".join(
        f"{k} {test[k]:.4f}"
        for k in HEADLINE[metrics.get("task", "binary")]
        if test.get(k) is not None
    )
    print(f"{folder.path}: test {shown}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from medxfer.api import ensemble

    metrics = ensemble(args.runs, args.out, resamples=args.bootstrap, seed=args.seed)
    print((args.out / "model_card.md").read_text(), end="")
    print(f"wrote {args.out} (best member: {Path(metrics['best_member']).name})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medxfer.api import evaluate
    from medxfer.atomic import write_json

    result = evaluate(
        args.run,
        args.data,
        split=args.split,
        threshold=args.threshold,
        device=args.device,
        engine=args.engine,
        progress=not args.quiet,
    )
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from medxfer.api import audit, format_audit
    from medxfer.atomic import write_json

    report = audit(args.data, patient_regex=args.patient_regex, max_pixels=args.max_pixels)
    if args.json:
        write_json(args.json, report)
    print(format_audit(report))
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from medxfer.api import manifest

    if args.collection:
        how = dict(
            view=args.view,
            uncertain=args.uncertain,
            missing=args.missing,
            skip_bad=args.skip_bad,
        )
        counts = manifest(args.data, args.out, collection=args.collection, **how)
    else:
        counts = manifest(
            args.data,
            args.out,
            label_from_name=args.label_from_name,
            patient_regex=args.patient_regex,
        )
    for split, per_label in counts.items():
        print(f"{split}: " + ", ".join(f"{k} {n}" for k, n in sorted(per_label.items())))
    print(f"wrote {args.out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from medxfer.api import models

    print(f"{'architecture':<52}{'weights file or hub repository':<52}available here")
    for name, filename, here in models(args.all):
        if filename is None:
            print(f"{name:<52}{'-':<52}no pretrained weights")
            continue
        print(f"{name:<52}{filename:<52}{'yes' if here else 'no'}")
    print(
        "\nAlso: any timm model as timm/NAME (weights through timm's pretrained config and the "
        "hub cache, or --weights PATH)."
    )
    if not args.all:
        print("`medxfer models --all` lists every torchvision classifier and the transformers.")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from medxfer.api import predict
    from medxfer.atomic import write_json, write_with

    rows = predict(
        args.run,
        args.inputs,
        threshold=args.threshold,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        device=args.device,
        engine=args.engine,
        cam=args.cam,
        cam_class=args.cam_class,
        progress=not args.quiet,
    )
    if args.out and args.out.suffix.lower() == ".json":
        write_json(args.out, rows.astype(object).where(rows.notna(), None).to_dict("records"))
    elif args.out:
        write_with(args.out, lambda tmp: rows.to_csv(tmp, index=False))
    else:
        rows.to_csv(sys.stdout, index=False)
    failed = rows[rows.error.notna()]
    for _, r in failed.iterrows():
        print(f"medxfer: {r.file}: {r.error}", file=sys.stderr)
    return 1 if len(failed) else 0


def _export(args: argparse.Namespace) -> int:
    from medxfer.api import load_classifier

    model = load_classifier(args.run)
    default = args.run / ("model.onnx" if args.format == "onnx" else "model.ts")
    path = model.export(args.out or default, args.format, dynamic_batch=args.dynamic_batch)
    print(f"wrote {path} and {path}.json")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    from medxfer.api import similarity
    from medxfer.similarity.compare import Request

    asked = {f.name: getattr(args, f.name) for f in fields(Request) if f.name != "progress"}
    result = similarity(Request(**asked, progress=not args.quiet))
    print(
        f"{'stage':<18}{'dim':>6}{'D(C,M)':>10}{'D(C,C)':>10}{'D(M,M)':>10}{'ratio':>7}"
        f"{'cos':>7}{'FID':>10}" + ("   fine-tuned: ratio   cos     FID" if args.run else "")
    )
    for s in result["stages"]:
        p = s["pretrained"]
        line = (
            f"{s['stage']:<18}{s['dim']:>6}{p['euclidean']['cross']:>10.3f}"
            f"{p['euclidean']['natural']:>10.3f}{p['euclidean']['medical']:>10.3f}"
            f"{p['euclidean']['ratio']:>7.3f}{p['cosine']['cross']:>7.3f}{p['fid']:>10.2f}"
        )
        if "finetuned" in s:
            f = s["finetuned"]
            line += f"{f['euclidean']['ratio']:>19.3f}{f['cosine']['cross']:>7.3f}{f['fid']:>8.2f}"
        print(line)
    if "proposition_5" in result:
        print(f"Proposition 5 (final features): {result['proposition_5']}")
    print(f"wrote {args.out / 'similarity.json'} and {args.out / 'similarity.png'}")
    return 0


def _study_run(args: argparse.Namespace) -> int:
    from medxfer.api import run_study

    run_study(
        args.study,
        args.out,
        overrides=args.set,
        grid=args.grid,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        cpus_per_cell=args.cpus_per_cell,
        gpus_per_cell=args.gpus_per_cell,
    )
    return 0


def _study_show(args: argparse.Namespace) -> int:
    from medxfer.api import study_cells

    study = study_cells(args.study, args.set or (), args.grid or ())
    cells = study.cells()
    print(f"study {study.name}: {len(cells)} cells; base {study.base}")
    if study.baseline:
        print(f"  every experiment paired against the baseline {study.baseline}")
    for cell in cells:
        print(f"  {cell.name}")
    for name in study.skipped:
        print(f"  (skipped, no weights here) {name}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from medxfer.api import report

    md, html = report(args.study_dir)
    print(f"wrote {md} and {html}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from medxfer.api import serve

    serve(args.run, host=args.host, port=args.port, device=args.device)
    return 0


def _weights(args: argparse.Namespace) -> int:
    from medxfer.api import install_weights

    for path in args.files:
        print(f"{path} -> {install_weights(path)}")
    return 0


# ``medxfer cache``: what the caches of decoded images and features hold, and emptying them.


def _add_cache_commands(sub) -> None:
    p = sub.add_parser("cache", help="size of the image, feature and graph caches, or clear them")
    cache = p.add_subparsers(dest="cache_command", required=True)
    for name in ("info", "clear"):
        q = cache.add_parser(
            name, help="entries and size per kind" if name == "info" else "delete entries"
        )
        q.add_argument("--cache-dir", type=Path, help="default: $MEDXFER_CACHE or ~/.cache/medxfer")
        if name == "clear":
            q.add_argument("--images", action="store_true", help="only the decoded images")
            q.add_argument("--features", action="store_true", help="only the features")
            q.add_argument("--engines", action="store_true", help="only the onnxruntime graphs")
        q.set_defaults(handler=_cache_info if name == "info" else _cache_clear)


def _cache_info(args: argparse.Namespace) -> int:
    from medxfer.api import cache_info

    root, kinds = cache_info(args.cache_dir)
    print(f"cache {root}")
    for kind, info in kinds.items():
        print(
            f"{kind:<10}{info['entries']:>8} entries {_size(info['bytes']):>10}  {info['folder']}"
        )
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    from medxfer.api import clear_cache

    asked = [k for k in ("images", "features", "engines") if getattr(args, k)]
    root, chosen, freed = clear_cache(args.cache_dir, asked)
    print(f"cleared {', '.join(chosen)} in {root}: {_size(freed)} freed")
    return 0


def _size(n: float) -> str:
    """Bytes in decimal units, as ``du --si`` shows them."""
    units = ("B", "KB", "MB", "GB", "TB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n, step = n / 1000, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


# --- segmentation and detection: medxfer segment|detect train|predict|export ----------------
# ``medxfer train --task segmentation|detection ...`` is the same command as
# ``medxfer segment|detect train ...`` (see ``_task_family_alias``).

FAMILY_COMMAND = {"segmentation": "segment", "detection": "detect"}


def _task_family_alias(argv: list[str]) -> list[str]:
    """``train --task segmentation ...`` -> ``segment train ...`` (and detection likewise);
    global options before the command (``--allocator X``) stay where they are."""
    start = 0
    while start < len(argv) and argv[start].startswith("-"):
        start += 1 if "=" in argv[start] or argv[start] in ("-h", "--help") else 2
    head, argv = argv[:start], argv[start:]
    if not argv or argv[0] != "train":
        return head + argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--task" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--task" or arg.startswith("--task=")) and value in FAMILY_COMMAND:
            rest = argv[1:i] + argv[i + (2 if arg == "--task" else 1) :]
            return [*head, FAMILY_COMMAND[value], "train", *rest]
    return head + argv


def _add_family_parser(sub, command: str, options: type) -> None:
    """``medxfer segment|detect``: train (the options of ``options``), predict, export."""
    what = {"segment": "segmentation (masks)", "detect": "object detection (boxes)"}[command]
    p = sub.add_parser(command, help=f"{what} on an ImageNet backbone")
    verbs = p.add_subparsers(dest=f"{command}_command", required=True)
    q = verbs.add_parser("train", help="train one run (resumes an interrupted one)")
    data_help = {"segment": "folder with split.csv, or a CSV manifest"}
    q.add_argument("--data", required=True, help=data_help.get(command, "VOC folder or CSV"))
    q.add_argument("--out", required=True, help="run folder to write")
    _add_options(q, options)
    q.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    q.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    family = next(f for f, c in FAMILY_COMMAND.items() if c == command)
    q.set_defaults(handler=_family_train, options_class=options, family=family)

    outputs = {"segment": "NAME_mask.png, NAME_overlay.png", "detect": "NAME.png, detections"}
    q = verbs.add_parser("predict", help=f"for new images: {outputs[command]}")
    q.add_argument("run", type=Path)
    q.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    q.add_argument("--out", required=True, type=Path, help="folder for the outputs")
    q.add_argument("--device", default="auto")
    if command == "detect":
        q.add_argument("--min-score", type=float, default=0.5, help="drop weaker detections")
    q.set_defaults(handler=_segment_predict if command == "segment" else _detect_predict)
    returns = {"segment": "per-pixel probabilities", "detect": "boxes, labels and scores"}
    q = verbs.add_parser("export", help=f"ONNX model returning {returns[command]}")
    q.add_argument("run", type=Path)
    q.add_argument("--out", type=Path, help="default: RUN/model.onnx")
    q.set_defaults(handler=_family_export, family=family)


def _add_segment_parser(sub) -> None:
    from medxfer.segmentation.options import SegmentationOptions

    _add_family_parser(sub, "segment", SegmentationOptions)


def _add_detect_parser(sub) -> None:
    from medxfer.detection.options import DetectionOptions

    _add_family_parser(sub, "detect", DetectionOptions)


def _family_train(args: argparse.Namespace) -> int:
    from medxfer.api import train

    options = {f.name: getattr(args, f.name) for f in fields(args.options_class)}
    run = train(task=args.family, quiet=args.quiet, overwrite=args.overwrite, **options)
    test = run.read_metrics().get("test") or {}
    shown = " ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
    print(f"{run}: test {shown}")
    return 0


def _segment_predict(args: argparse.Namespace) -> int:
    from medxfer.api import load
    from medxfer.segmentation.inference import MASKS_CSV

    rows = load(args.run, "segmentation").predict(args.inputs, args.out, device=args.device)
    failed = rows[rows.error.notna()]
    print(
        f"wrote {len(rows) - len(failed)} masks and overlays to {args.out}"
        f" ({MASKS_CSV} lists every input; {len(failed)} failed)"
    )
    return _failures(failed)


def _failures(failed) -> int:
    """Each input that could not be read, one line on stderr; exit status 1 if any."""
    for _, row in failed.drop_duplicates("file").iterrows():
        print(f"medxfer: {row.file}: {row.error}", file=sys.stderr)
    return 1 if len(failed) else 0


def _family_export(args: argparse.Namespace) -> int:
    from medxfer.api import load

    path = load(args.run, args.family).export(args.out)
    print(f"wrote {path} and {path}.json (checked in onnxruntime against PyTorch)")
    return 0


def _detect_predict(args: argparse.Namespace) -> int:
    from medxfer.api import load

    frame = load(args.run, "detection").predict(
        args.inputs, args.out, min_score=args.min_score, device=args.device
    )
    failed = frame[frame["error"].notna()]
    read = frame[frame["error"].isna()]
    print(
        f"{read['label'].notna().sum()} boxes in {read['file'].nunique()} images -> {args.out}"
        f" (detections.csv lists every input; {failed['file'].nunique()} failed)"
    )
    return _failures(failed)


if __name__ == "__main__":
    sys.exit(main())
