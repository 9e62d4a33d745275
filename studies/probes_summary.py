"""The probes study's README table and its ensembles; every choice is made on validation data.

    python studies/probes_summary.py studies/out/probes

Per architecture, the frozen experiment (head x features x tta) with the lowest mean validation
loss over its seeds is that architecture's probe (the trainer's own selection rule; validation
ROC AUC, 0.984-0.996 for every run, is too close to tell them apart). Then, each with
``medxfer ensemble`` into ``STUDY/ensembles/NAME`` (test metrics with intervals, paired tests
against the best member):

- ``ARCH-seeds``: that probe's runs over the seeds;
- ``probes``: both architectures' probes, every seed;
- ``finetuned``: the fine-tuned runs of both architectures;
- ``all``: ``probes`` and ``finetuned`` together.

Prints a Markdown table (a row per experiment: mean validation loss, test accuracy and ROC AUC
as mean ± sd over seeds, and the paired difference against the study's baseline: seed 0's with
its interval and p-value over test patients, then the mean over seeds with the t-test across
them), how alike validation and test rank the runs, and a line per ensemble: validation
loss, test accuracy and ROC AUC, and its best member's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from medxfer.api import ensemble
from medxfer.study.compare import read_comparisons

SHOWN = ["arch", "mode", "head", "features", "tta"]


def main(study: Path) -> None:
    results = pd.read_csv(study / "results.csv")
    baseline = json.loads((study / "study.json").read_text())["baseline"]
    results["val_loss"] = [_val_loss(Path(out)) for out in results.out]
    print(_table(results, read_comparisons(study), baseline))
    print(_agreement(results))
    frozen = results[results["mode"] == "transfer"]
    groups, probe = {}, ["head", "features", "tta"]
    for arch, runs in frozen.groupby("arch"):
        best = runs.groupby(probe).val_loss.mean().idxmin()
        chosen = runs[[tuple(r) == best for r in runs[probe].itertuples(index=False)]]
        print(f"{arch}: probe " + ", ".join(f"{k}={v}" for k, v in zip(probe, best, strict=True)))
        groups[f"{arch.replace('/', '_')}-seeds"] = list(chosen.out)
    groups["probes"] = [out for key, outs in groups.items() for out in outs]
    groups["finetuned"] = list(results[results["mode"] == "finetune"].out)
    groups["all"] = groups["probes"] + groups["finetuned"]
    for name, members in groups.items():
        out = study / "ensembles" / name
        if len(members) < 2:
            print(f"{name}: fewer than two finished runs, skipped")
            continue
        shutil.rmtree(out, ignore_errors=True)  # rebuilt: the chosen members may have changed
        ensemble(members, out)
        _show(name, out)


def _table(results: pd.DataFrame, pairs: pd.DataFrame, baseline: dict) -> str:
    lines = [
        f"| {' | '.join(SHOWN)} | seeds | val loss | accuracy | ROC AUC | Δ accuracy (pts) "
        "| Δ AUC |",
        "|" + "---|" * (len(SHOWN) + 6),
    ]
    text = results.astype(str)
    for key, runs in results.groupby(SHOWN, sort=False):
        reference = {**dict(zip(SHOWN, key, strict=True)), **baseline}
        matches = (text[list(reference)] == pd.Series(reference).astype(str)).all(axis=1)
        base_cells = set(results[matches].cell)
        acc, auc = (_mean_sd(runs[m]) for m in ("accuracy", "roc_auc"))
        deltas = [_delta(pairs, set(runs.cell), base_cells, m) for m in ("accuracy", "roc_auc")]
        cells = " | ".join(str(v) for v in key)
        loss = f"{runs.val_loss.mean():.4f}"
        lines.append(
            f"| {cells} | {len(runs)} | {loss} | {acc} | {auc} | {deltas[0]} | {deltas[1]} |"
        )
    return "\n".join(lines)


def _agreement(results: pd.DataFrame) -> str:
    """How far validation ranks the runs as the test set does (Spearman, over runs)."""
    val = pd.DataFrame([_val(Path(out)) for out in results.out])
    pairs = {
        "val ROC AUC ~ test ROC AUC": (val.roc_auc, results.roc_auc),
        "val loss ~ test accuracy": (val.loss, results.accuracy),
        "val accuracy ~ test accuracy": (val.accuracy, results.accuracy),
    }
    return "Spearman over runs: " + "; ".join(
        f"{name} {spearmanr(a, b).statistic:+.2f}" for name, (a, b) in pairs.items()
    )


def _mean_sd(values: pd.Series) -> str:
    sd = f" ± {values.std():.4f}" if len(values) > 1 else ""
    return f"{values.mean():.4f}{sd}"


def _delta(pairs: pd.DataFrame, cells: set, base_cells: set, metric: str) -> str:
    """``cells`` − baseline: seed 0's difference with its paired test-set interval and p-value,
    then (with several seeds) the mean over seeds with its t-test p-value across them."""
    rows = pairs[pairs.metric == metric]
    a, b = (rows[f"cell_{side}"].astype(str).str.split().str[0] for side in "ab")
    for sign, mine in (
        (1, a.isin(base_cells) & b.isin(cells)),
        (-1, a.isin(cells) & b.isin(base_cells)),
    ):
        found = rows[mine].set_index("replicate")
        if found.empty:
            continue
        scale, digits = (100, 1) if metric == "accuracy" else (1, 4)
        first = found.loc["seed=0"]
        low, high = sorted((sign * first.ci_low * scale, sign * first.ci_high * scale))
        text = (
            f"{sign * first['diff'] * scale:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
            f" p {first.p_value:.2g}"
        )
        if "pooled" in found.index:
            pooled = found.loc["pooled"]
            p = "n/a" if pd.isna(pooled.p_value) else f"{pooled.p_value:.2g}"
            text += f"; mean {sign * pooled['diff'] * scale:+.{digits}f} p {p}"
        return text
    return ""


def _val(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["val"]


def _val_loss(run: Path) -> float:
    return _val(run)["loss"]


def _show(name: str, out: Path) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    comparison = pd.read_csv(out / "comparison.csv").set_index("metric")
    best = comparison.loc["accuracy"]
    print(
        f"{name}: val loss {metrics['val']['loss']:.4f}; test {test['accuracy']:.4f} / "
        f"{test['roc_auc']:.4f}; best member "
        f"{best.value_a:.4f} / {comparison.loc['roc_auc'].value_a:.4f} ({out})"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
