"""One results table for a study: a row per finished run, CSV and Parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medxfer.atomic import write_with
from medxfer.evaluation.metrics import SCALAR_METRICS
from medxfer.run.folder import RunFolder

TABLE = "results"


def collect(out: Path) -> pd.DataFrame:
    """A row per complete run under ``out/runs``: its options, test metrics with 95% intervals,
    selected epoch, wall time and device. Unfinished runs are not counted."""
    rows = []
    for run in sorted((Path(out) / "runs").glob("*")):
        folder = RunFolder(run)
        if not folder.is_complete():
            continue
        metrics = folder.read_metrics()
        row = {"cell": run.name, **folder.read_config().to_dict()}
        row["image_size"] = folder.read_resolved()["image_size"]
        test = metrics["test"]
        for key in SCALAR_METRICS:
            row[key] = test[key]
            interval = (test.get("ci95") or {}).get(key)
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = interval or (None, None)
        row.update(
            {
                "threshold": metrics["threshold"],
                "selected_epoch": metrics["selected_epoch"],
                "seconds": metrics["seconds"]["total"],
                "device": metrics["device"],
                "torch": folder.read_environment()["torch"],
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(out: Path, study=None) -> Path:
    frame = collect(out)
    csv = Path(out) / f"{TABLE}.csv"
    write_with(csv, lambda tmp: frame.to_csv(tmp, index=False))
    if not frame.empty:
        write_with(
            Path(out) / f"{TABLE}.parquet",
            lambda tmp: frame.astype({c: "string" for c in _mixed(frame)}).to_parquet(
                tmp, index=False
            ),
        )
    return csv


def _mixed(frame: pd.DataFrame) -> list[str]:
    """Object columns that Parquet cannot store as one type (None mixed with text)."""
    return [c for c in frame.columns if frame[c].dtype == object]
