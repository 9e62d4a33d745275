"""``medxfer manifest``: a CSV manifest whose labels come from the file names.

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

from medxfer.atomic import write_text
from medxfer.data.options import KERMANY_PATIENT_REGEX
from medxfer.data.sources import open_dataset
from medxfer.errors import MedxferError

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
    out = Path(out)
    base = out.resolve().parent
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split", "patient"])
    counts: dict[str, dict[str, int]] = {}
    for r in imageset.records:
        match = pattern.search(r.name)
        label = (match.group(1) if pattern.groups else match.group(0)).upper() if match else r.label
        path = Path(os.path.relpath(Path(r.source).resolve(), base))
        writer.writerow([path.as_posix(), label, r.split, r.patient or ""])
        split_counts = counts.setdefault(r.split, {})
        split_counts[label] = split_counts.get(label, 0) + 1
    write_text(out, buffer.getvalue())
    return counts
