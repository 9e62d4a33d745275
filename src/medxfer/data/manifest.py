"""``medxfer manifest``: a CSV manifest whose labels come from the file names, or from a public
collection's own tables (``medxfer.data.collections``).

Kermany's PNEUMONIA folder mixes bacterial and viral pneumonia, said only in the names
(``person1_bacteria_1.jpeg``, ``person1_virus_6.jpeg``); relabelling by name turns the binary
set into NORMAL / BACTERIA / VIRUS without copying an image.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from medxfer.atomic import write_json, write_text
from medxfer.data.collections import read_collection
from medxfer.data.options import KERMANY_PATIENT_REGEX
from medxfer.data.sources import LABEL_SEP, open_dataset
from medxfer.errors import MedxferError, warn

KERMANY_SUBTYPE_REGEX = r"_(bacteria|virus)_"


def write_manifest(
    location: str | Path,
    out: str | Path,
    *,
    label_from_name: str,
    patient_regex: str | None = KERMANY_PATIENT_REGEX,
) -> dict[str, dict[str, int]]:
    """Write ``path,label,split,patient`` for every image of a folder or CSV dataset.

    The label is the first group (or whole match) of ``label_from_name`` on the file name,
    upper-cased; a name it does not match keeps its own class. Paths are written relative to
    the manifest's folder. Returns the image count per split and label.
    """
    try:
        pattern = re.compile(label_from_name)
    except re.error as exc:
        raise MedxferError(
            f"--label-from-name {label_from_name!r}: invalid regular expression ({exc})"
        ) from None
    imageset = open_dataset(location, patient_regex=patient_regex)
    if imageset.kind == "npz" or imageset.multilabel:
        raise MedxferError(f"{location}: a manifest from names needs image files with one label")
    rows = []
    for r in imageset.records:
        match = pattern.search(r.name)
        label = (match.group(1) if pattern.groups else match.group(0)).upper() if match else r.label
        rows.append((Path(r.source), label, r.split, r.patient or ""))
    return _write(out, "label", rows)


def write_collection_manifest(
    root: str | Path,
    out: str | Path,
    *,
    collection: str,
    view: str = "all",
    uncertain: str = "zeros",
    missing: str = "negative",
    skip_bad: bool = False,
) -> dict[str, dict[str, int]]:
    """Write ``path,labels,split,patient[,unknown]`` for a ChestX-ray14-, CheXpert- or
    MIMIC-CXR-shaped collection (a multi-label manifest: the findings of each image,
    ``|``-separated, empty for none; ``unknown``: the findings whose value is not known, under
    ``uncertain ignore`` or ``missing ignore``). Returns the image count per split and finding
    (``(none)``: images without a finding)."""
    collected = read_collection(
        root, collection, view=view, uncertain=uncertain, missing=missing, skip_bad=skip_bad
    )
    if not collected.rows:
        raise MedxferError(f"{root}: no image of the {collection} table is left (view {view})")
    join = LABEL_SEP.join
    rows = [
        (r.path, join(sorted(r.labels)), r.split, r.patient, join(sorted(r.unknown)))
        for r in collected.rows
    ]
    for image, problem in collected.skipped:
        warn(f"{image}: {problem}; skipped")
    about = {"collection": collection, "root": str(Path(root).resolve()), "view": view}
    if collection != "chestxray14":  # its labels have no uncertain or blank entries
        about |= {"uncertain": uncertain, "missing": missing}
    out = Path(out)
    write_json(out.with_name(out.name + ".json"), about)  # read back by sources.labelling
    return _write(out, "labels", rows)


def _write(out: str | Path, column: str, rows: list[tuple]) -> dict:
    """One manifest writer: ``(file, label, split, patient[, unknown])`` rows, paths relative
    to the manifest's folder, written atomically; the ``unknown`` column only when some row
    has unknown labels."""
    out = Path(out)
    base = out.resolve().parent
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_unknown = any(len(row) > 4 and row[4] for row in rows)
    writer.writerow(["path", column, "split", "patient"] + ["unknown"] * with_unknown)
    counts: dict[str, dict[str, int]] = {}
    for source, label, split, patient, *unknown in rows:
        path = Path(os.path.relpath(source.resolve(), base))
        extra = unknown[:1] if with_unknown else []
        writer.writerow([path.as_posix(), label, split, patient, *extra])
        split_counts = counts.setdefault(split, {})
        for name in label.split(LABEL_SEP) if column == "labels" else [label]:
            split_counts[name or "(none)"] = split_counts.get(name or "(none)", 0) + 1
    write_text(out, buffer.getvalue())
    return counts
