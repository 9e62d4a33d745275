"""``medxfer audit``: what is in a dataset, and what is wrong with it."""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from medxfer.data.cache import content_hashes
from medxfer.data.images import DICOM_SUFFIXES, MAX_PIXELS, read_gray
from medxfer.data.options import KERMANY_PATIENT_REGEX
from medxfer.data.sources import ImageSet, Record, open_dataset
from medxfer.data.tasks import infer_task
from medxfer.errors import MedxferError


def audit(
    location: str, patient_regex: str = KERMANY_PATIENT_REGEX, *, max_pixels: int = MAX_PIXELS
) -> dict:
    """Task, label counts, sizes/modes, unreadable files, duplicates and patient overlap of a
    dataset (and the label co-occurrence matrix of a multi-label one)."""
    imageset = open_dataset(location, skip_bad=True, patient_regex=patient_regex)
    records = imageset.records
    try:
        task = infer_task(imageset)
    except MedxferError as exc:  # an audit reports what is wrong instead of stopping
        task = f"none ({str(exc).removeprefix(f'{imageset.location}: ')})"

    with ThreadPoolExecutor() as pool:
        headers = list(pool.map(lambda r: _header(imageset, r.source), records))
        problems = list(pool.map(lambda r: _problem(imageset, r.source, max_pixels), records))
    sizes = Counter(h[0] for h in headers if h)
    modes = Counter(h[1] for h in headers if h)
    unreadable = [
        {"file": r.source, "reason": p} for r, p in zip(records, problems, strict=True) if p
    ] + [{"file": f, "reason": why} for f, why in imageset.skipped]

    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(content_hashes(imageset)):
        by_hash[digest].append(i)
    groups = [[records[i] for i in idx] for idx in by_hash.values() if len(idx) > 1]
    within = [g for g in groups if len({r.split for r in g}) == 1]
    across = [g for g in groups if len({r.split for r in g}) > 1]
    conflicting = [g for g in groups if len({r.label for r in g}) > 1]

    shared = {}
    if imageset.kind != "npz":
        splits_of: dict[str, set[str]] = defaultdict(set)
        for r in records:
            if r.patient is not None:
                splits_of[r.patient].add(r.split)
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            ids = sorted(p for p, s in splits_of.items() if {a, b} <= s)
            shared[f"{a}/{b}"] = {"count": len(ids), "examples": ids[:10]}

    return {
        "dataset": str(location),
        "kind": imageset.kind,
        "task": task,
        "classes": imageset.classes,
        "counts": label_counts(records, multilabel=imageset.multilabel),
        **({"cooccurrence": cooccurrence(imageset)} if imageset.multilabel else {}),
        "total": len(records),
        "sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common()},
        "modes": dict(modes.most_common()),
        "unreadable": unreadable,
        "duplicates": {
            "groups": len(groups),
            "within_split": len(within),
            "across_splits": len(across),
            "conflicting_labels": len(conflicting),
            "examples": [[f"{r.split}/{r.label}/{r.name}" for r in g] for g in groups[:10]],
            "across_examples": [[f"{r.split}/{r.label}/{r.name}" for r in g] for g in across[:10]],
        },
        "patients_shared_between_splits": shared,
    }


def label_counts(records: list[Record], *, multilabel: bool) -> dict[str, dict[str, int]]:
    """Images per split and label (a multi-label image counts once for each of its labels)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        for name in sorted(r.label_set) if multilabel else [r.label]:
            counts[r.split][name] += 1
    return {s: dict(c) for s, c in counts.items()}


def cooccurrence(imageset: ImageSet) -> dict:
    """How many images carry both labels i and j (diagonal: images with label i), all splits."""
    index = {name: j for j, name in enumerate(imageset.classes)}
    matrix = [[0] * len(index) for _ in index]
    for r in imageset.records:
        present = [index[n] for n in r.label_set]
        for i in present:
            for j in present:
                matrix[i][j] += 1
    return {"labels": imageset.classes, "matrix": matrix}


def format_audit(report: dict) -> str:
    lines = [
        f"dataset {report['dataset']} ({report['kind']}), task {report['task']}, "
        f"classes {report['classes']}",
        f"{'split':<8}" + "".join(f"{c:>12}" for c in report["classes"]) + f"{'total':>8}",
    ]
    for split, c in report["counts"].items():
        row = [c.get(k, 0) for k in report["classes"]]
        lines.append(f"{split:<8}" + "".join(f"{n:>12}" for n in row) + f"{sum(row):>8}")
    if "cooccurrence" in report:
        co = report["cooccurrence"]
        lines.append("label co-occurrence (images with both):")
        lines.append(" " * 12 + "".join(f"{c:>12}" for c in co["labels"]))
        lines += [
            f"{name:<12}" + "".join(f"{n:>12}" for n in row)
            for name, row in zip(co["labels"], co["matrix"], strict=True)
        ]
    lines.append(f"sizes: {report['sizes']}")
    lines.append(f"modes: {report['modes']}")
    lines.append(f"unreadable: {len(report['unreadable'])}")
    lines += [f"  {u['file']}: {u['reason']}" for u in report["unreadable"][:20]]
    d = report["duplicates"]
    lines.append(
        f"exact duplicates: {d['groups']} groups ({d['within_split']} within a split, "
        f"{d['across_splits']} across splits, {d['conflicting_labels']} with "
        f"conflicting labels)"
    )
    lines += [f"  {' = '.join(g)}" for g in d["examples"][:5]]
    for pair, info in report["patients_shared_between_splits"].items():
        lines.append(f"patients in both {pair}: {info['count']} {info['examples'][:5]}")
    return "\n".join(lines)


def _header(imageset: ImageSet, source: str) -> tuple[tuple[int, int], str] | None:
    if imageset.kind == "npz":
        from medxfer.data.cache import npz_image

        image = npz_image(imageset, source)
        return (image.shape[1], image.shape[0]), "L" if image.ndim == 2 else "RGB"
    try:
        if Path(source).suffix.lower() in DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(source, stop_before_pixels=True)
            return (int(ds.Columns), int(ds.Rows)), f"DICOM {ds.PhotometricInterpretation}"
        with Image.open(source) as img:
            return img.size, img.mode
    except Exception:
        return None


def _problem(imageset: ImageSet, source: str, max_pixels: int) -> str | None:
    if imageset.kind == "npz":
        return None
    try:
        read_gray(source, max_pixels=max_pixels)
    except MedxferError as exc:
        return str(exc).removeprefix(f"{source}: ")
    return None
