"""``medxfer similarity``: how close an ImageNet backbone maps medical images to natural ones,
per stage, before and after fine-tuning (Proposition 4, Conjecture 1 and Proposition 5)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from medxfer.atomic import write_json, write_with
from medxfer.config import RunConfig
from medxfer.data.prepared import DataOptions, PreparedData, prepare_data
from medxfer.device import inference_batch_size, select_device
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import ModelSpec, create_model, default_image_size
from medxfer.similarity.features import (
    gray_batches,
    load_photos,
    photo_files,
    rgb_batches,
    stage_features,
    stage_names,
)
from medxfer.similarity.measures import (
    frechet_distance,
    linear_cka,
    mean_pairwise_cosine,
    mean_pairwise_euclidean,
)
from medxfer.similarity.sampling import METHOD, stratified_sample


def domain_measures(natural: torch.Tensor, medical: torch.Tensor) -> dict:
    """Eq. 9 across and within the domains (Euclidean, cosine), and FID across them."""
    euclid = {
        "cross": mean_pairwise_euclidean(natural, medical),
        "natural": mean_pairwise_euclidean(natural),
        "medical": mean_pairwise_euclidean(medical),
    }
    euclid["ratio"] = euclid["cross"] / ((euclid["natural"] + euclid["medical"]) / 2)
    cosine = {
        "cross": mean_pairwise_cosine(natural, medical),
        "natural": mean_pairwise_cosine(natural),
        "medical": mean_pairwise_cosine(medical),
    }
    return {"euclidean": euclid, "cosine": cosine, "fid": frechet_distance(natural, medical)}


SPEC_FIELDS = {"normalize": "normalization", "weights": "weights", "weights_tag": "weights_tag"}


@dataclass(frozen=True)
class Request:
    """What ``medxfer similarity`` measures: ``arch``'s pretrained backbone (or a trained
    ``run``'s, before and after) on natural photos and a medical dataset's ``split``.
    ``max_images`` caps each domain by a random sample drawn with ``seed`` (the medical one
    stratified by class)."""

    arch: str | None
    natural: str
    medical: str
    out: Path
    run: Path | None = None
    layers: list[str] | None = None
    split: str = "test"
    image_size: int | None = None
    max_images: int | None = None
    natural_gray: bool = False
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"
    progress: bool = True


def measure(request: Request) -> dict:
    """Compute every measure per stage and write ``similarity.json`` (with the files used)
    and ``similarity.png``."""
    from medxfer.classification.trained import TrainedModel

    device = select_device(request.device)
    trained = TrainedModel.load(request.run) if request.run else None
    spec = _backbone(request.arch, trained, request.run)
    size = request.image_size or (
        trained.config.resolution if trained else default_image_size(spec.arch)
    )
    pretrained = create_model(spec)
    names = stage_names(pretrained, request.layers)
    positive = trained.classes[1] if trained and trained.task.name == "binary" else None
    options = DataOptions(positive=positive, val_fraction=0, color="gray")
    data = prepare_data(request.medical, size, options, progress=request.progress)
    if request.split not in data.splits:
        raise MedxferError(f"{request.medical}: no {request.split!r} split")
    chosen = _medical_sample(data, request.split, request.max_images, request.seed)
    medical = data.pixels[chosen]
    natural_files = _natural_sample(request.natural, request.max_images, request.seed)
    photos = load_photos(natural_files, size, gray=request.natural_gray)
    _check_sizes(medical, photos)
    batch = inference_batch_size(None, device)

    def features(model: XrayClassifier) -> tuple[dict, dict]:
        both = (rgb_batches(model, photos, batch), gray_batches(model, medical, batch))
        nat, med = (
            stage_features(model, b, names, device, request.progress, engine=request.engine)
            for b in both
        )
        return nat, med

    post = features(trained.network) if trained is not None else None
    stages = _stages(names, features(pretrained), post)
    result = {
        "arch": spec.arch,
        "run": str(request.run) if request.run else None,
        "image_size": size,
        **{k: getattr(spec, a) for k, a in SPEC_FIELDS.items()},
        "natural": str(request.natural),
        "medical": str(request.medical),
        "split": request.split,
        "n_natural": len(photos),
        "n_medical": len(medical),
        "natural_gray": request.natural_gray,
        "sampling": _sampling(data, chosen, natural_files, request.seed, request.max_images),
        "stages": stages,
    }
    if post:
        result["proposition_5"] = _proposition_5(stages[-1])
    write_json(Path(request.out) / "similarity.json", result)
    write_with(Path(request.out) / "similarity.png", lambda tmp: _plot(result, tmp))
    return result


def _check_sizes(medical, photos) -> None:
    if len(medical) < 2 or len(photos) < 2:
        raise MedxferError("need at least 2 images in each domain")


def _backbone(arch: str | None, trained, run: Path | None) -> ModelSpec:
    """The pretrained backbone measured: ``arch``'s, or the trained run's own before training."""
    cfg = trained.config if trained else None
    arch = arch or (cfg.arch if cfg else None)
    if arch is None:
        raise MedxferError("--arch is required without --run")
    if cfg and cfg.arch != arch:
        raise MedxferError(f"--arch {arch} but run {run} trained {cfg.arch}")
    return baseline_spec(cfg, run) if cfg else ModelSpec(arch, mode="transfer")


def _sampling(data, chosen, natural_files: list[Path], seed: int, max_images) -> dict:
    """Which images were measured, and how they were drawn."""
    return {
        "method": METHOD,
        "seed": seed,
        "max_images": max_images,
        "medical_per_class": dict(
            sorted(Counter(data.records[i].label for i in chosen.tolist()).items())
        ),
        "medical_files": [data.records[i].source for i in chosen.tolist()],
        "natural_files": [str(f) for f in natural_files],
    }


def _stages(names: list[str], pre: tuple[dict, dict], post: tuple[dict, dict] | None) -> list:
    """Per stage: the natural-vs-medical measures of the pretrained backbone, and with a
    trained run those of its fine-tuned backbone and the CKA between the two."""
    stages = []
    for name in names:
        entry = {
            "stage": name,
            "dim": int(pre[0][name].shape[1]),
            "pretrained": domain_measures(pre[0][name], pre[1][name]),
        }
        if post:
            entry["finetuned"] = domain_measures(post[0][name], post[1][name])
            entry["cka_pretrained_vs_finetuned"] = {
                "natural": linear_cka(pre[0][name], post[0][name]),
                "medical": linear_cka(pre[1][name], post[1][name]),
            }
        stages.append(entry)
    return stages


def _proposition_5(final: dict) -> dict:
    """Whether fine-tuning brought the two domains' last-stage features closer (Prop. 5)."""
    tuned, before = final["finetuned"], final["pretrained"]
    return {
        "stage": final["stage"],
        "euclidean_cross_pretrained": before["euclidean"]["cross"],
        "euclidean_cross_finetuned": tuned["euclidean"]["cross"],
        "holds_raw": tuned["euclidean"]["cross"] < before["euclidean"]["cross"],
        "holds_relative": tuned["euclidean"]["ratio"] < before["euclidean"]["ratio"],
        "holds_fid": tuned["fid"] < before["fid"],
    }


def baseline_spec(cfg: RunConfig, run: Path) -> ModelSpec:
    """The run's own pretrained backbone before training: its spec (architecture,
    normalisation, weights file or tag) in transfer mode. Scratch runs have none."""
    if not cfg.model_spec.pretrained:
        raise MedxferError(
            f"run {run} was trained from scratch: it has no pretrained backbone to compare against"
        )
    return replace(cfg.model_spec, mode="transfer")


def _medical_sample(data: PreparedData, split: str, n: int | None, seed: int) -> torch.Tensor:
    """Record indices of a class-stratified random sample of ``split``."""
    in_split = data.splits[split]
    classes = [data.records[i].label for i in in_split.tolist()]
    return in_split[torch.from_numpy(stratified_sample(classes, n, seed))]


def _natural_sample(folder: str, n: int | None, seed: int) -> list[Path]:
    files = photo_files(folder)
    return [files[i] for i in stratified_sample([""] * len(files), n, seed)]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["stages"]
    x = range(len(stages))
    panels = [
        ("Eq. 9 Euclidean, cross / within", lambda m: m["euclidean"]["ratio"], False),
        ("Eq. 9 cosine distance, cross", lambda m: m["cosine"]["cross"], False),
        ("FID", lambda m: m["fid"], True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, value, log) in zip(axes, panels, strict=True):
        ax.plot(x, [value(s["pretrained"]) for s in stages], "o-", label="ImageNet pretrained")
        if "finetuned" in stages[0]:
            ax.plot(x, [value(s["finetuned"]) for s in stages], "s--", label="fine-tuned")
        ax.set_title(title)
        ax.set_xticks(list(x), [s["stage"] for s in stages], rotation=70, fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"{result['arch']}: natural photos (n={result['n_natural']}) vs medical "
        f"images (n={result['n_medical']}) per backbone stage"
    )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)
