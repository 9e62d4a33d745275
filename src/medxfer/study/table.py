"""One results table for a study: a row per finished run, CSV and Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medxfer import rundir
from medxfer.atomic import write_with
from medxfer.evaluation.metrics import SCALAR_METRICS

TABLE = "results"


def collect(out: Path) -> pd.DataFrame:
    """A row per complete run under ``out/runs``: its options, test metrics with 95% intervals,
    selected epoch, wall time and device. Unfinished runs are not counted."""
    rows = []
    for run in sorted((Path(out) / "runs").glob("*")):
        if not rundir.is_complete(run):
            continue
        config = json.loads((run / rundir.CONFIG).read_text())
        metrics = json.loads((run / rundir.METRICS).read_text())
        row = {"cell": run.name, **config["run"]}
        row["image_size"] = config["resolved"]["image_size"]
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
                "torch": config["environment"]["torch"],
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
