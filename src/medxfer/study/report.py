"""``medxfer report DIR``: the paper's Tables 2-4 and Figures 3-4 from a finished study, with
the published values beside ours, the paired comparisons beside each table, as Markdown and as
one self-contained HTML file.

Rows are experiments (see ``medxfer.study.table``): runs that differ only in seed or fold are
averaged (mean ± sd, ``n`` replicates); runs that differ in any other option get rows of their
own, labelled by the options that vary across the study.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.atomic import write_text, write_with
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import HEADLINE
from medxfer.families import family_of, options_class
from medxfer.storage.folder import RunFolder
from medxfer.study.compare import POOLED, read_comparisons
from medxfer.study.paper_values import COLUMNS, paper_value
from medxfer.study.table import collect, experiment_of, label, summarize, varying

MODE_LABEL = {
    "scratch": "Scratch",
    "transfer": "Transfer learning",
    "finetune": "Fine-tuning",
    "partial": "Partial fine-tuning",
}
PERCENT = {"accuracy", "precision", "recall"}
TABLE_KEYS = ("arch", "mode", "lr")  # the tables' own structure; other varying options label rows
FIGURE4 = {
    "binary": ("accuracy", "f1"),
    "multiclass": ("accuracy", "macro_f1"),
    "multilabel": ("macro_roc_auc", "macro_f1"),
    "segmentation": ("dice", "iou"),
    "detection": ("map_50", "map"),
}
# Figure 3's two panels: per-epoch columns of history.csv
CURVES = {
    "segmentation": ("train_loss", "val_dice"),
    "detection": ("train_loss", "val_map_50"),
}
TASK_TITLE = {
    "segmentation": "Segmentation: test Dice, IoU, pixel accuracy, HD95 (pixels)",
    "detection": "Detection: test mAP@0.5 and mAP@[.5:.95]",
}


def write_report(study_dir: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` (figures embedded) of the finished runs in a study."""
    study_dir = Path(study_dir)
    frame = collect(study_dir)
    if frame.empty:
        raise MedxferError(f"{study_dir}: no finished runs to report")
    pairs = read_comparisons(study_dir)
    settings = [k for k in varying(frame) if k not in TABLE_KEYS]
    parts = _preamble(study_dir, frame, settings)
    tasks = list(dict.fromkeys(frame.task))
    for task in tasks:
        runs = frame[frame.task == task]
        suffix = f" ({task})" if len(tasks) > 1 else ""
        tables = _task_tables if task in TASK_TITLE else _tables
        parts += tables(runs, pairs, settings, suffix)
        parts += _figures(study_dir, runs, settings, suffix)
    parts += ["## Runs", "", _runs_table(frame), ""]
    markdown_text = "\n".join(parts)
    md_path, html_path = study_dir / "report.md", study_dir / "report.html"
    write_text(md_path, markdown_text)
    write_text(html_path, _html(markdown_text, study_dir))
    return md_path, html_path


def _preamble(study_dir: Path, frame: pd.DataFrame, settings: list[str]) -> list[str]:
    counts = summarize(frame).replicates
    replicates = (
        f"{counts.iloc[0]} replicates (seeds/folds) each"
        if counts.nunique() == 1
        else f"{counts.min()} to {counts.max()} replicates (seeds/folds) each"
    )
    tasks = set(frame.task)
    paper = (
        " For binary tasks the paper's value and our difference follow in parentheses; "
        "accuracy, precision and recall in %."
        if "binary" in tasks
        else ""
    )
    lines = [
        f"# Study report: {study_dir.name}",
        "",
        f"{len(frame)} finished runs in {len(counts)} experiments, {replicates}; devices: "
        f"{', '.join(sorted(frame.device.unique()))}. A row is one experiment: mean ± sd over "
        f"its `n` replicates (sd only where n > 1).{paper}",
        "",
        _comparisons_explained(tasks),
        "",
    ]
    if settings:
        lines += [
            "Options that vary besides architecture, mode and learning rate, shown per row: "
            f"{', '.join(settings)}. Runs that differ in them are never averaged together.",
            "",
        ]
    return lines


def _comparisons_explained(tasks: set[str]) -> str:
    """How the comparisons under the tables were made, for the tasks this study has."""
    text = [
        "Under each table, the paired comparisons of its runs on the same test images "
        "(difference B − A; fractions are fractions, 0.010 = one percentage point): a 95% "
        "bootstrap interval that resamples whole patients where the data name them and images "
        "otherwise, and a p-value."
    ]
    if tasks & {"binary", "multiclass", "multilabel"}:
        text.append(
            "Classification: DeLong's test for binary ROC AUC, exact McNemar for accuracy, "
            "the paired bootstrap otherwise; ROC AUC (macro ROC AUC beyond binary) is primary."
        )
    if "segmentation" in tasks:
        text.append(
            "Segmentation: the mean of per-image differences; Dice is primary (Wilcoxon "
            "signed-rank test), the others by the paired bootstrap; HD95 in pixels."
        )
    if "detection" in tasks:
        text.append(
            "Detection: COCO mAP recomputed on each resample of the test images; mAP@0.5 is "
            "primary."
        )
    text.append(
        "`p (Holm)` corrects the other metrics for their number; a bootstrap p-value is never "
        "below 2 / (B + 1) for B resamples. With several seeds/folds the pooled row "
        "is shown (mean difference, t-interval over replicates); `comparisons.csv` has every "
        "seed/fold."
    )
    return " ".join(text)


def _tables(runs: pd.DataFrame, pairs: pd.DataFrame, settings: list[str], suffix: str) -> list:
    """Table 2 (the largest learning rate), Table 3 (a tenth of it), Table 4 (Inception v3),
    and any other learning rate, each followed by its paired comparisons."""
    base_lr = runs.lr.max()
    at_base, reduced = np.isclose(runs.lr, base_lr), np.isclose(runs.lr, base_lr / 10)
    inception = runs.arch == "inception_v3"
    sections = [
        (f"Table 2: learning rate {base_lr:g}", runs[at_base & ~inception], False),
        (f"Table 3: learning rate {base_lr / 10:g} (base / 10)", runs[reduced], True),
        (f"Table 4: Inception v3, learning rate {base_lr:g}", runs[at_base & inception], False),
    ]
    for lr in sorted(runs.lr[~at_base & ~reduced].unique(), reverse=True):
        sections.append((f"Learning rate {lr:g}", runs[np.isclose(runs.lr, lr)], False))
    parts = []
    for title, frame, is_reduced in sections:
        if frame.empty:
            continue
        parts += [f"## {title}{suffix}", ""]
        if is_reduced and runs.task.iloc[0] == "binary":
            parts += ["The paper publishes only a few transfer accuracies for this setting.", ""]
        parts += [_table(frame, settings, is_reduced), ""]
        compared = _comparisons_table(pairs, set(frame.cell))
        if compared:
            parts += [f"Paired comparisons ({title.split(':')[0]}):", "", compared, ""]
    return parts


def _task_tables(runs: pd.DataFrame, pairs: pd.DataFrame, settings: list[str], suffix: str):
    """Segmentation or detection: one table per learning rate, each with its comparisons
    (there are no published values: the paper argues Section 3.4 without running it)."""
    task = runs.task.iloc[0]
    parts = []
    for lr in sorted(runs.lr.unique(), reverse=True):
        frame = runs[np.isclose(runs.lr, lr)]
        title = f"{TASK_TITLE[task]}, learning rate {lr:g}"
        parts += [f"## {title}{suffix}", "", _table(frame, settings, False), ""]
        per_class = [c for c in frame.columns if c.startswith("ap50_")]
        if per_class:
            parts += ["Test AP@0.5 per class (one row per run):", "", _per_class(frame), ""]
        compared = _comparisons_table(pairs, set(frame.cell))
        if compared:
            parts += ["Paired comparisons:", "", compared, ""]
    return parts


def _per_class(frame: pd.DataFrame) -> str:
    columns = [c for c in frame.columns if c.startswith("ap50_") and frame[c].notna().any()]
    names = [c.removeprefix("ap50_") for c in columns]
    lines = ["| Run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for _, row in frame.iterrows():
        values = ["n/a" if pd.isna(row[c]) else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {row.cell} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _table(frame: pd.DataFrame, settings: list[str], reduced_lr: bool) -> str:
    task = frame.task.iloc[0]
    columns = COLUMNS if task == "binary" else HEADLINE[task]
    names = [{"gmean": "G-mean"}.get(c, c) for c in columns]
    header = ["Model", *(["Setting"] if settings else []), "Method", "n", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summarize(frame).iterrows():
        cells = [row.arch, *([label(row, settings)] if settings else [])]
        cells += [MODE_LABEL.get(row["mode"], row["mode"]), str(row.replicates)]
        for col in columns:
            text = _value(row, col)
            paper = (
                paper_value(row.arch, row["mode"], col, reduced_lr) if task == "binary" else None
            )
            if paper is not None:
                digits = 1 if col in PERCENT else 3
                ours = row[f"{col}_mean"] * (100 if col in PERCENT else 1)
                text += f" ({paper:.{digits}f}, {ours - paper:+.{digits}f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value(row: pd.Series, col: str) -> str:
    """``mean ± sd`` of one experiment's metric (sd where there are several replicates)."""
    scale, digits = (100, 1) if col in PERCENT and row.task == "binary" else (1, 3)
    mean, sd = row[f"{col}_mean"], row[f"{col}_sd"]
    if pd.isna(mean):
        return "n/a"
    if pd.isna(sd):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def _comparisons_table(pairs: pd.DataFrame, cells: set[str]) -> str:
    """The comparisons of the runs in ``cells``: pooled rows where there are several
    replicates, else the one replicate's rows; a refused pair shows its note."""
    if pairs.empty:
        return ""
    pairs = pairs.assign(shared=pairs.shared.astype("string").fillna(""), a=pairs.a.astype(str))
    pairs = pairs.assign(b=pairs.b.astype(str))
    first_a = pairs.cell_a.fillna("").astype(str).str.split().str[0]
    chosen = pairs[first_a.isin(cells)]
    if chosen.empty:
        return ""
    header = (
        "| B − A | Given | Replicate | Metric | Difference | 95% interval | p | p (Holm) | Test |"
    )
    lines = [header, "|" + "---|" * 9]
    for _, group in chosen.groupby(["option", "a", "b", "shared"], sort=False):
        pooled = group[group.replicate == POOLED]
        for _, row in (pooled if not pooled.empty else group).iterrows():
            lines.append(_comparison_line(row))
    return "\n".join(lines)


def _comparison_line(row: pd.Series) -> str:
    if row.option == "mode":
        between = f"{MODE_LABEL.get(row.b, row.b)} − {MODE_LABEL.get(row.a, row.a)}"
    elif row.option == "baseline":  # a and b name every option they differ in
        between = f"{row.b} − baseline {row.a}"
    else:
        between = f"{row.option}={row.b} − {row.option}={row.a}"
    if pd.isna(row.metric):
        return f"| {between} | {row.shared} | {row.replicate} | — | {row.note} | | | | |"
    metric = f"{row.metric} (primary)" if bool(row.primary) else row.metric
    interval = f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}]" if not pd.isna(row.ci_low) else "n/a"
    diff = "n/a" if pd.isna(row["diff"]) else f"{row['diff']:+.3f}"
    test = row.test if not pd.isna(row.test) else ""
    return (
        f"| {between} | {row.shared} | {row.replicate} | {metric} | {diff} | {interval} | "
        f"{_p(row.p_value)} | {_p(row.p_adjusted)} | {test} |"
    )


def _p(value) -> str:
    if pd.isna(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _runs_table(frame: pd.DataFrame) -> str:
    lines = ["| Run | Device | Wall time (s) | Selected epoch | Rerun |", "|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        family = family_of({"task": row.task})
        defaults = {f.name: f.default for f in fields(options_class(family))}
        options = " ".join(
            _flag(k, row[k])
            for k in defaults
            if k not in ("data", "out") and _differs(row.get(k), defaults[k])
        )
        verb = {"segmentation": "segment train", "detection": "detect train"}.get(family, "train")
        command = f"`medxfer {verb} --data {row.data} --out {row.out} {options}`"
        lines.append(
            f"| {row.cell} | {row.device} | {row.seconds:.0f} | {row.selected_epoch} | {command} |"
        )
    return "\n".join(lines)


def _flag(name: str, value) -> str:
    """One option as the command line takes it (``--no-NAME`` for off, lists with commas)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool | np.bool_):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, list | tuple | np.ndarray):
        return f"{flag} {','.join(str(v) for v in value)}"
    return f"{flag} {value}"


def _differs(value, default) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return default is not None
    if isinstance(default, bool) or isinstance(value, bool | np.bool_):
        return bool(value) != bool(default)
    return value != default


# -- figures ---------------------------------------------------------------------------
def _figures(study_dir: Path, runs: pd.DataFrame, settings: list[str], suffix: str) -> list:
    """Figures 3-4 and the per-task test figures at the largest learning rate; one run per
    experiment (its first seed/fold) where a figure shows single runs."""
    task = runs.task.iloc[0]
    at_base = runs[np.isclose(runs.lr, runs.lr.max())]
    shown = at_base[~at_base.apply(experiment_of, axis=1).duplicated()]
    keys = ["arch", "mode", *settings]
    first, second = FIGURE4[task]
    one = "one run per experiment, its first seed/fold"
    curves = CURVES.get(task, ("train_loss", "train_accuracy"))
    draws: list[tuple[str, str, Callable[[Path], None] | None]] = [
        (
            "figure3_training_curves",
            f"Figure 3: {curves[0]} and {curves[1]} per epoch (transfer solid; {one})",
            lambda p: _figure3(study_dir, shown, keys, (curves, p)),
        ),
        (
            "figure4_test_metrics",
            f"Figure 4: test {first} and {second} per model (mean ± sd over replicates)",
            lambda p: _figure4(at_base, keys, (first, second), p),
        ),
    ]
    if task in TASK_TITLE:
        pass  # no ROC curves or confusion matrices: the tables carry the test metrics
    elif task == "binary":
        draws.append(
            (
                "roc_curves",
                f"ROC curves on the test set ({one})",
                lambda p: _roc(study_dir, shown, keys, p),
            )
        )
    else:
        draws.append(
            (
                "roc_curves",
                "ROC curves: drawn for binary tasks only; macro ROC AUC is in the tables",
                None,
            )
        )
    if task in TASK_TITLE:
        pass
    elif task == "multilabel":
        draws.append(
            (
                "per_label_auc",
                f"Test ROC AUC per label ({one})",
                lambda p: _label_aucs(study_dir, shown, keys, p),
            )
        )
        draws.append(
            (
                "confusion_matrices",
                "Confusion matrices: not drawn for multi-label tasks; see the per-label AUC",
                None,
            )
        )
    else:
        draws.append(
            (
                "confusion_matrices",
                f"Confusion matrices on the test set ({one})",
                lambda p: _confusions(study_dir, shown, keys, p),
            )
        )
    figures = study_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    name_suffix = f"-{task}" if suffix else ""
    parts = []
    for name, title, draw in draws:
        if draw is None:
            parts += [f"*{title}{suffix}.*", ""]
            continue
        file = f"{name}{name_suffix}.png"
        write_with(figures / file, draw)
        parts += [f"## {title}{suffix}", "", f"![{title}](figures/{file})", ""]
    return parts


def _short(row: pd.Series, keys: list[str]) -> str:
    return " ".join(str(row[k]) for k in keys)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=200)
    plt.close(fig)


def _figure3(study_dir: Path, shown: pd.DataFrame, keys: list[str], target: tuple) -> None:
    """Two per-epoch columns of each run's history (``target``: the columns, the file)."""
    columns, path = target
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (_, row) in enumerate(shown.iterrows()):
        history = RunFolder(study_dir / "runs" / row.cell).read_history()
        style = "-" if row["mode"] == "transfer" else "--"
        for ax, col in zip(axes, columns, strict=True):
            colour = plt.cm.tab10.colors[i % 10]
            ax.plot(history.epoch, history[col], style, color=colour, label=_short(row, keys))
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, [c.replace("_", " ") for c in columns], strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    _save(fig, path)


def _figure4(frame: pd.DataFrame, keys: list[str], metrics: tuple[str, str], path: Path) -> None:
    plt = _plt()
    summary = summarize(frame)
    names = [_short(row, keys) for _, row in summary.iterrows()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col in zip(axes, metrics, strict=True):
        means, sds = summary[f"{col}_mean"], summary[f"{col}_sd"].fillna(0)
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"test {col}")
        ax.set_ylim(max(0, float(np.nanmin(means - sds)) - 0.1), 1)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def _roc(study_dir: Path, shown: pd.DataFrame, keys: list[str], path: Path) -> None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    for _, row in shown.iterrows():
        folder = RunFolder(study_dir / "runs" / row.cell)
        predictions = folder.read_predictions("test")
        positive = folder.read_metrics()["positive"]
        fpr, tpr, _ = roc_curve(
            predictions.label.astype(str) == str(positive), predictions.probability
        )
        style = "-" if row["mode"] == "transfer" else "--"
        ax.plot(fpr, tpr, style, label=f"{_short(row, keys)} (AUC {row.roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.legend(fontsize=7)
    _save(fig, path)


def _confusions(study_dir: Path, shown: pd.DataFrame, keys: list[str], path: Path) -> None:
    """K x K test confusion matrices (rows true, columns predicted), binary K = 2."""
    plt = _plt()
    cols = min(4, len(shown))
    n_rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.4 * cols, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, shown.iterrows(), strict=False):
        metrics = RunFolder(study_dir / "runs" / row.cell).read_metrics()
        matrix = np.array(metrics["test"]["confusion_matrix"])
        names = metrics.get("classes") or [metrics["negative"], metrics["positive"]]
        ax.axis("on")
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            colour = "white" if v > matrix.max() / 2 else "black"
            ax.text(j, i, str(v), ha="center", va="center", color=colour, fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=6, rotation=30)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(_short(row, keys), fontsize=7)
    _save(fig, path)


def _label_aucs(study_dir: Path, shown: pd.DataFrame, keys: list[str], path: Path) -> None:
    """Grouped bars: each label's test ROC AUC, one bar per experiment."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(shown))
    for i, (_, row) in enumerate(shown.iterrows()):
        per_label = RunFolder(study_dir / "runs" / row.cell).read_metrics()["test"]["per_label"]
        aucs = [np.nan if m["roc_auc"] is None else m["roc_auc"] for m in per_label.values()]
        ax.bar(np.arange(len(aucs)) + i * width, aucs, width, label=_short(row, keys))
        ax.set_xticks(np.arange(len(aucs)) + 0.4 - width / 2, list(per_label), fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test ROC AUC")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    _save(fig, path)


def _html(markdown_text: str, study_dir: Path) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        data = base64.b64encode((study_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px}img{max-width:100%}code{font-size:11px}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>medxfer report</title>"
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )
