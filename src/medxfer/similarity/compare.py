"""``medxfer similarity``: how close an ImageNet backbone maps medical images to natural ones,
per stage, before and after fine-tuning (Proposition 4, Conjecture 1 and Proposition 5)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
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


def measure(
    arch: str | None,
    natural_dir: str,
    medical_data: str,
    out: Path,
    *,
    run: Path | None = None,
    layers: list[str] | None = None,
    split: str = "test",
    image_size: int | None = None,
    max_images: int | None = None,
    natural_gray: bool = False,
    seed: int = 0,
    device_name: str = "auto",
    engine: str = "auto",
    progress: bool = True,
) -> dict:
    """Compute every measure per stage and write ``similarity.json`` and ``similarity.png``.

    ``max_images`` caps each domain by a random sample drawn with ``seed`` (the medical one
    stratified by class); ``similarity.json`` lists the files used.
    """
    device = select_device(device_name)
    from medxfer.classification.trained import TrainedModel

    trained = TrainedModel.load(run) if run else None
    cfg = trained.config if trained else None
    arch = arch or (cfg.arch if cfg else None)
    if arch is None:
        raise MedxferError("--arch is required without --run")
    if cfg and cfg.arch != arch:
        raise MedxferError(f"--arch {arch} but run {run} trained {cfg.arch}")
    spec = baseline_spec(cfg, run) if cfg else ModelSpec(arch, mode="transfer")
    finetuned = trained.network if trained else None
    size = image_size or (cfg.resolution if cfg else default_image_size(arch))
    pretrained = create_model(spec)
    names = stage_names(pretrained, layers)
    options = DataOptions(
        positive=trained.classes[1] if trained and trained.task.name == "binary" else None,
        val_fraction=0,
        color="gray",
    )
    data = prepare_data(medical_data, size, options, progress=progress)
    if split not in data.splits:
        raise MedxferError(f"{medical_data}: no {split!r} split")
    chosen = _medical_sample(data, split, max_images, seed)
    medical = data.pixels[chosen]
    natural_files = _natural_sample(natural_dir, max_images, seed)
    photos = load_photos(natural_files, size, gray=natural_gray)
    if len(medical) < 2 or len(photos) < 2:
        raise MedxferError("need at least 2 images in each domain")
    batch = inference_batch_size(None, device)

    def features(model: XrayClassifier) -> tuple[dict, dict]:
        nat, med = (
            stage_features(model, batches, names, device, progress, engine=engine)
            for batches in (rgb_batches(model, photos, batch), gray_batches(model, medical, batch))
        )
        return nat, med

    pre_nat, pre_med = features(pretrained)
    post = features(finetuned) if finetuned is not None else None
    stages = []
    for name in names:
        entry = {
            "stage": name,
            "dim": int(pre_nat[name].shape[1]),
            "pretrained": domain_measures(pre_nat[name], pre_med[name]),
        }
        if post:
            entry["finetuned"] = domain_measures(post[0][name], post[1][name])
            entry["cka_pretrained_vs_finetuned"] = {
                "natural": linear_cka(pre_nat[name], post[0][name]),
                "medical": linear_cka(pre_med[name], post[1][name]),
            }
        stages.append(entry)
    result = {
        "arch": arch,
        "run": str(run) if run else None,
        "image_size": size,
        "normalize": spec.normalization,
        "weights": spec.weights,
        "weights_tag": spec.weights_tag,
        "natural": str(natural_dir),
        "medical": str(medical_data),
        "split": split,
        "n_natural": len(photos),
        "n_medical": len(medical),
        "natural_gray": natural_gray,
        "sampling": {
            "method": METHOD,
            "seed": seed,
            "max_images": max_images,
            "medical_per_class": dict(
                sorted(Counter(data.records[i].label for i in chosen.tolist()).items())
            ),
            "medical_files": [data.records[i].source for i in chosen.tolist()],
            "natural_files": [str(f) for f in natural_files],
        },
        "stages": stages,
    }
    if post:
        final = stages[-1]
        result["proposition_5"] = {
            "stage": final["stage"],
            "euclidean_cross_pretrained": final["pretrained"]["euclidean"]["cross"],
            "euclidean_cross_finetuned": final["finetuned"]["euclidean"]["cross"],
            "holds_raw": final["finetuned"]["euclidean"]["cross"]
            < final["pretrained"]["euclidean"]["cross"],
            "holds_relative": final["finetuned"]["euclidean"]["ratio"]
            < final["pretrained"]["euclidean"]["ratio"],
            "holds_fid": final["finetuned"]["fid"] < final["pretrained"]["fid"],
        }
    out = Path(out)
    write_json(out / "similarity.json", result)
    write_with(out / "similarity.png", lambda tmp: _plot(result, tmp))
    return result


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
