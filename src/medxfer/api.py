"""The Python API: what the command line does, as functions a notebook calls.

    import medxfer
    run = medxfer.train(data="../shared/data/chest_xray", out="runs/quick", epochs=2)
    model = medxfer.load(run)
    model.predict(["scan.png"])

The command line calls these same functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medxfer.storage.folder import RunFolder
    from medxfer.tracking import Handler


def train(
    data: str | Path,
    out: str | Path,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    handlers: Sequence[Handler] = (),
    **options: Any,
) -> RunFolder:
    """Train (or resume, or find finished) one run; ``options`` are ``medxfer train``'s options
    with underscores (``arch``, ``mode``, ``epochs``, ``image_size``, ``track``, ...);
    ``task="segmentation"`` or ``"detection"`` takes ``medxfer segment|detect train``'s.
    ``handlers`` (``medxfer.tracking.Handler``) hear of the start, each epoch and the end."""
    from medxfer.families import build_options, family, family_of, run_training

    values = {**options, "data": str(data), "out": str(out)}
    return run_training(
        family(family_of(values)),
        build_options(values),
        log=(lambda _msg: None) if quiet else print,
        progress=not quiet,
        overwrite=overwrite,
        handlers=handlers,
    )


def load(run: str | Path, family: str | None = None) -> Any:
    """The trained model of a finished run folder (or a ``model.pt``) of any task: a
    ``TrainedModel`` (classification: ``predict``, ``cam``, ``export``), a
    ``TrainedSegmenter`` or a ``TrainedDetector`` (``predict``, ``export``, ``evaluate``).
    With ``family``, a model of another family is refused in one line."""
    from medxfer.families import load_trained

    return load_trained(run, family)


def evaluate(
    run: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    threshold: float | None = None,
    device: str = "auto",
    engine: str | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of a finished run's model on ``split`` of a dataset, for any task;
    ``threshold`` and ``engine`` (default: the run's own) apply to classification runs."""
    from medxfer.classification.run import evaluate as evaluate_classifier
    from medxfer.errors import MedxferError

    made_by = _family_of_run(run)
    if made_by == "classification":
        return evaluate_classifier(
            run,
            str(data),
            split=split,
            threshold=threshold,
            device_name=device,
            engine=engine,
            progress=progress,
        )
    if threshold is not None or engine is not None:
        raise MedxferError(f"{run}: --threshold and --engine apply to classification runs")
    return {"run": str(run), **load(run).evaluate(data, split, device=device)}


def ensemble(runs, out: str | Path, *, resamples: int = 1000, seed: int = 0) -> dict:
    """``medxfer ensemble``: the mean probability of classification runs scored on the same
    images, written to ``out`` with its comparison against the best member; its metrics."""
    from medxfer.classification.ensemble import ensemble as combine

    return combine(runs, out, resamples=resamples, seed=seed)


def load_classifier(run: str | Path) -> Any:
    """The ``TrainedModel`` of a classification run; a run of another family is refused with
    the command it takes (``medxfer segment predict|export``, ``medxfer detect ...``)."""
    return load(run, "classification")


def _family_of_run(run: str | Path) -> str:
    from medxfer.storage.folder import RunFolder
    from medxfer.storage.model_file import read_model_file

    path = Path(run)
    folder = RunFolder(path if path.is_dir() else path.parent)
    return folder.family() if folder.has_run() else read_model_file(path).family


def run_study(
    study: str | Path,
    out: str | Path,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    grid: Mapping[str, Sequence[Any]] | Sequence[str] = (),
    **execution: Any,
) -> Path:
    """Run a study (a TOML file or a preset) into ``out``; return its results table.
    ``overrides`` set base options ({"epochs": 5} or ["epochs=5"]), ``grid`` replaces axes
    ({"arch": ["resnet18"]} or ["arch=resnet18"]); ``execution``: ``executor``, ``workers``,
    ``address``, ``cpus_per_cell``, ``gpus_per_cell``."""
    from medxfer.study.execute import run_study as execute
    from medxfer.study.spec import load_study

    if isinstance(overrides, Mapping):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(grid, Mapping):
        grid = [f"{k}={','.join(json.dumps(v) for v in vs)}" for k, vs in grid.items()]
    loaded = load_study(str(study), list(overrides), list(grid))
    return execute(loaded, Path(out), **execution)


# -- the command line's other verbs, each a call of the module that owns it -----------------
def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    threshold: float | None = None,
    batch_size: int | None = None,
    max_pixels: int | None = None,
    device: str = "auto",
    engine: str | None = None,
    cam: str | Path | None = None,
    cam_class: str | None = None,
    progress: bool = True,
) -> Any:
    """``medxfer predict``: a classification run's rows for image files, folders or globs
    (``error`` set where an input could not be read), and a Grad-CAM PNG per readable image
    in ``cam``."""
    from medxfer.data.options import MAX_PIXELS
    from medxfer.device import select_device
    from medxfer.inference.cam import write_cams
    from medxfer.inference.predict import expand_inputs, predict_files

    model = load_classifier(run)
    files = expand_inputs([str(i) for i in inputs])
    model.to(select_device(device), engine)
    rows = predict_files(
        model,
        files,
        threshold=threshold,
        batch_size=batch_size,
        max_pixels=max_pixels or MAX_PIXELS,
        progress=progress,
    )
    if cam:
        readable = [f for f, e in zip(files, rows.error, strict=True) if e is None]
        write_cams(model, readable, Path(cam), cam_class)
    return rows


def audit(data: str | Path, *, patient_regex: str | None = None, max_pixels: int | None = None):
    """``medxfer audit``: task, counts, sizes, unreadable files, duplicates, leaks."""
    from medxfer.data.audit import audit as audit_data
    from medxfer.data.options import KERMANY_PATIENT_REGEX, MAX_PIXELS

    regex = patient_regex or KERMANY_PATIENT_REGEX
    return audit_data(str(data), regex, max_pixels=max_pixels or MAX_PIXELS)


def format_audit(report: dict) -> str:
    from medxfer.data.audit import format_audit as text

    return text(report)


def manifest(
    data: str | Path,
    out: str | Path,
    *,
    label_from_name: str | None = None,
    patient_regex=None,
    collection: str | None = None,
    **collection_options,
):
    """``medxfer manifest``: a CSV manifest with labels from file names, or from a public
    collection's tables (``collection``: chestxray14, chexpert or mimic-cxr; options ``view``,
    ``uncertain``, ``missing``, ``skip_bad``); counts per split and label."""
    from medxfer.data.manifest import write_collection_manifest, write_manifest
    from medxfer.data.options import KERMANY_PATIENT_REGEX
    from medxfer.errors import MedxferError

    if (label_from_name is None) == (collection is None):
        raise MedxferError("manifest: give one of --label-from-name or --collection")
    if collection is not None:
        return write_collection_manifest(data, out, collection=collection, **collection_options)
    regex = patient_regex or KERMANY_PATIENT_REGEX
    return write_manifest(data, out, label_from_name=label_from_name, patient_regex=regex)


def models(every: bool = False) -> list[tuple[str, str | None, bool]]:
    """``medxfer models``: (architecture, ImageNet weights file or hub repository or None,
    whether it is here) for the paper's eight, or every torchvision classifier and the
    transformers of ``models.weights.TRANSFORMERS``."""
    from medxfer.models.factory import PAPER_ARCHS
    from medxfer.models.spec import torchvision_archs
    from medxfer.models.weights import torchvision_weights

    rows = []
    for name in torchvision_archs() if every else list(PAPER_ARCHS):
        found = torchvision_weights(name)
        rows.append((name, found and found.filename, bool(found and found.cached_path.exists())))
    if every:  # the transformers (DINOv2, DINO, ViT, DeiT), weights from the hub cache
        from medxfer.models.weights import TRANSFORMERS, hub_weights

        rows += [(name, *hub_weights(name)) for name in TRANSFORMERS]
    return rows


def install_weights(path: str | Path) -> Path:
    """``medxfer weights``: a torchvision weights file put where torch's hub cache looks."""
    from medxfer.models.weights import install_weights as install

    return install(Path(path))


def similarity(request: Any) -> dict:
    """``medxfer similarity``: feature distances natural vs medical images per stage
    (``request``: a ``medxfer.similarity.compare.Request``)."""
    from medxfer.similarity.compare import measure

    return measure(request)


def study_cells(study: str | Path, overrides=(), grid=()) -> Any:
    """``medxfer study show``: the study with its cells (``.cells()``) and skipped cells."""
    from medxfer.study.spec import load_study

    return load_study(str(study), list(overrides), list(grid))


def report(study_dir: str | Path) -> tuple[Path, Path]:
    """``medxfer report``: the study's Markdown and HTML report."""
    from medxfer.study.report import write_report

    return write_report(Path(study_dir))


def serve(run: str | Path, *, host: str, port: int, device: str = "auto") -> None:
    """``medxfer serve``: the web page of a trained classification run."""
    from medxfer.serve import serve as serve_page

    serve_page(run, host=host, port=port, device_name=device)


def cache_info(root: str | Path | None = None) -> tuple[Path, dict]:
    """``medxfer cache info``: the cache folder and, per kind, entries, bytes and folder."""
    from medxfer.cache import cache_info as info
    from medxfer.cache import default_cache_dir

    folder = Path(root) if root else default_cache_dir()
    return folder, info(folder)


def clear_cache(
    root: str | Path | None = None, kinds: Sequence[str] = ()
) -> tuple[Path, tuple, int]:
    """``medxfer cache clear``: empty the chosen kinds (default: all); bytes freed."""
    from medxfer.cache import KINDS, default_cache_dir
    from medxfer.cache import clear_cache as clear

    folder = Path(root) if root else default_cache_dir()
    chosen = tuple(kinds) or KINDS
    return folder, chosen, clear(folder, chosen)
