"""``medxfer report DIR``: the paper's Tables 2-4 and Figures 3-4 from a finished study, with
the published values beside ours, as Markdown and as one self-contained HTML file."""

from __future__ import annotations

import base64
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.atomic import write_text, write_with
from medxfer.config import RunConfig
from medxfer.errors import MedxferError
from medxfer.run.folder import RunFolder
from medxfer.study.paper_values import COLUMNS, paper_value
from medxfer.study.table import collect

MODE_LABEL = {
    "scratch": "Scratch",
    "transfer": "Transfer learning",
    "finetune": "Fine-tuning",
    "partial": "Partial fine-tuning",
}
PERCENT = {"accuracy", "precision", "recall"}
LOWER_IS_BETTER = {"loss"}


def write_report(study_dir: Path) -> tuple[Path, Path]:
    study_dir = Path(study_dir)
    frame = collect(study_dir)
    if frame.empty:
        raise MedxferError(f"{study_dir}: no finished runs to report")
    figures = study_dir / "figures"
    base_lr = frame.lr.max()
    at_base, reduced = frame[frame.lr == base_lr], frame[np.isclose(frame.lr, base_lr / 10)]
    plain = at_base[at_base.arch != "inception_v3"]
    inception = at_base[at_base.arch == "inception_v3"]

    parts = [
        f"# Study report: {study_dir.name}",
        "",
        f"{len(frame)} finished runs; devices: {', '.join(sorted(frame.device.unique()))}. "
        f"Each cell shows ours (mean ± sd over seeds where several ran), then the paper's "
        f"value and our difference. Accuracy, precision and recall in %. Bold: the better "
        f"of each scratch/transfer pair.",
        "",
    ]
    if not plain.empty:
        parts += [f"## Table 2: learning rate {base_lr:g}", "", _table(plain), ""]
    if not reduced.empty:
        parts += [
            f"## Table 3: learning rate {base_lr / 10:g} (base / 10)",
            "",
            "The paper publishes only a few transfer accuracies for this setting.",
            "",
            _table(reduced[reduced.arch != "inception_v3"], reduced_lr=True),
            "",
        ]
    if not inception.empty:
        parts += ["## Table 4: Inception v3", "", _table(inception), ""]

    figures.mkdir(parents=True, exist_ok=True)
    images = {
        "figure3_training_curves.png": (
            "Figure 3: training loss and accuracy per epoch (transfer solid, scratch dashed)",
            lambda p: _figure3(study_dir, at_base, p),
        ),
        "figure4_test_accuracy_f1.png": (
            "Figure 4: test accuracy and F1 per model",
            lambda p: _figure4(at_base, p),
        ),
        "roc_curves.png": ("ROC curves on the test set", lambda p: _roc(study_dir, at_base, p)),
        "confusion_matrices.png": (
            "Confusion matrices on the test set",
            lambda p: _confusions(study_dir, at_base, p),
        ),
    }
    for name, (title, draw) in images.items():
        write_with(figures / name, draw)
        parts += [f"## {title}", "", f"![{title}](figures/{name})", ""]
    parts += ["## Runs", "", _runs_table(frame), ""]
    markdown_text = "\n".join(parts)
    md_path, html_path = study_dir / "report.md", study_dir / "report.html"
    write_text(md_path, markdown_text)
    write_text(html_path, _html(markdown_text, study_dir))
    return md_path, html_path


def _table(frame: pd.DataFrame, reduced_lr: bool = False) -> str:
    header = ["Model", "Method", *[c if c != "gmean" else "G-mean" for c in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch, group in frame.groupby("arch", sort=False):
        stats = {mode: g for mode, g in group.groupby("mode")}
        best = {}
        for col in COLUMNS:
            means = {m: g[col].mean() for m, g in stats.items()}
            pick = min if col in LOWER_IS_BETTER else max
            best[col] = pick(means, key=means.get) if len(means) > 1 else None
        for mode, g in stats.items():
            cells = [arch, MODE_LABEL.get(mode, mode)]
            for col in COLUMNS:
                text = _value(g[col], col)
                if best[col] == mode:
                    text = f"**{text}**"
                paper = paper_value(arch, mode, col, reduced_lr)
                if paper is not None:
                    digits = 1 if col in PERCENT else 3
                    ours = g[col].mean() * (100 if col in PERCENT else 1)
                    text += f" ({paper:.{digits}f}, {ours - paper:+.{digits}f})"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value(values: pd.Series, col: str) -> str:
    scale, digits = (100, 1) if col in PERCENT else (1, 3)
    mean = values.mean() * scale
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {values.std() * scale:.{digits}f}"
    return f"{mean:.{digits}f}"


def _runs_table(frame: pd.DataFrame) -> str:
    lines = ["| Run | Device | Wall time (s) | Selected epoch | Rerun |", "|---|---|---|---|---|"]
    defaults = {f.name: f.default for f in fields(RunConfig)}
    for _, row in frame.iterrows():
        options = " ".join(
            f"--{k.replace('_', '-')} {row[k]}"
            for k in defaults
            if k not in ("data", "out") and _differs(row.get(k), defaults[k])
        )
        command = f"`medxfer train --data {row.data} --out {row.out} {options}`"
        lines.append(
            f"| {row.cell} | {row.device} | {row.seconds:.0f} | {row.selected_epoch} | {command} |"
        )
    return "\n".join(lines)


def _differs(value, default) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return default is not None
    if isinstance(default, bool) or isinstance(value, bool | np.bool_):
        return bool(value) != bool(default)
    return value != default


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure3(study_dir: Path, frame: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(sorted(frame.arch.unique()), plt.cm.tab10.colors, strict=False))
    for _, row in frame.drop_duplicates(["arch", "mode"]).iterrows():
        history = RunFolder(study_dir / "runs" / row.cell).read_history()
        style = "-" if row["mode"] == "transfer" else "--"
        for ax, col in zip(axes, ("train_loss", "train_accuracy"), strict=True):
            ax.plot(
                history.epoch,
                history[col],
                style,
                color=colours[row.arch],
                label=f"{row.arch} {row['mode']}",
            )
    for ax, title in zip(axes, ("training loss", "training accuracy"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=200)
    plt.close(fig)


def _figure4(frame: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    means = frame.groupby(["arch", "mode"])[["accuracy", "f1"]].mean().unstack("mode")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col in zip(axes, ("accuracy", "f1"), strict=True):
        means[col].plot.bar(ax=ax, rot=30)
        ax.set_title(f"test {col}")
        ax.set_ylim(max(0, means[col].min().min() - 0.1), 1)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=200)
    plt.close(fig)


def _roc(study_dir: Path, frame: pd.DataFrame, path: Path) -> None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    for _, row in frame.drop_duplicates(["arch", "mode"]).iterrows():
        run = study_dir / "runs" / row.cell
        predictions = RunFolder(run).read_predictions("test")
        positive = RunFolder(run).read_metrics()["positive"]
        fpr, tpr, _ = roc_curve(
            predictions.label.astype(str) == str(positive), predictions.probability
        )
        ax.plot(
            fpr,
            tpr,
            "-" if row["mode"] == "transfer" else "--",
            label=f"{row.arch} {row['mode']} (AUC {row.roc_auc:.3f})",
        )
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=200)
    plt.close(fig)


def _confusions(study_dir: Path, frame: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    rows = frame.drop_duplicates(["arch", "mode"])
    cols = min(4, len(rows))
    n_rows = -(-len(rows) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 3 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, rows.iterrows(), strict=False):
        metrics = RunFolder(study_dir / "runs" / row.cell).read_metrics()
        matrix = np.array(metrics["test"]["confusion_matrix"])
        ax.axis("on")
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if v > matrix.max() / 2 else "black",
            )
        labels = [metrics["negative"], metrics["positive"]]
        ax.set_xticks([0, 1], labels, fontsize=7)
        ax.set_yticks([0, 1], labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{row.arch}\n{row['mode']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=200)
    plt.close(fig)


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
