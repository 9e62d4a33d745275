"""Studies: grid expansion, resumable execution (kill -9 included), Ray, the report."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.study.execute import run_study
from medxfer.study.spec import load_study

pytestmark = pytest.mark.integration


def write_study(
    path, data, archs=("mobilenet_v2",), modes=("transfer", "scratch"), lrs=(1e-3,), epochs=1
):
    path.write_text(
        f"""
[study]
name = "tiny"
skip_unavailable_weights = true

[base]
data = "{data}"
epochs = {epochs}
image_size = 64
bootstrap = 20
limit_per_class = 16

[grid]
arch = {list(archs)!r}
mode = {list(modes)!r}
lr = {list(lrs)!r}
seed = [0]
""".replace("'", '"')
    )
    return path


def test_presets_and_weight_filter():
    paper = load_study("paper")
    assert len(paper.cells()) == 8 * 2 * 2
    offline = load_study("paper-offline")
    names = [c.name for c in offline.cells()]
    # only MobileNet v2's ImageNet file is in the (test) hub cache
    assert "mobilenet_v2-transfer-lr0.001-s0" in names
    assert "resnet18-transfer-lr0.001-s0" not in names and "resnet18-scratch-lr0.001-s0" in names
    assert len(names) == 8 * 2 + 1 * 2
    assert load_study("quick", ["epochs=1"]).base["epochs"] == 1
    narrowed = load_study("paper", grid_overrides=["arch=resnet18,mobilenet_v2", "lr=1e-3"])
    assert [c.name for c in narrowed.cells()][:2] == [
        "resnet18-scratch-lr0.001-s0",
        "resnet18-transfer-lr0.001-s0",
    ]
    assert len(narrowed.cells()) == 4


def test_bad_study_file(tmp_path):
    (tmp_path / "s.toml").write_text('[base]\ndata = "x"\n[grid]\ncolour = ["red"]\n')
    with pytest.raises(MedxferError, match="'colour' is not a classification run option"):
        load_study(str(tmp_path / "s.toml"))


def test_study_runs_skips_finished_and_reports(small_kermany, tmp_path, capsys):
    study = write_study(
        tmp_path / "s.toml", small_kermany, archs=("mobilenet_v2", "resnet18"), lrs=(1e-3, 1e-4)
    )
    out = tmp_path / "study"
    assert main(["study", "run", str(study), "--out", str(out)]) == 0
    table = pd.read_csv(out / "results.csv")
    # resnet18 transfer has no weights here: 2 lrs x (mobilenet x 2 modes + resnet18 scratch)
    assert len(table) == 6 and table.cell.is_unique
    assert set(table.columns) >= {
        "arch",
        "mode",
        "lr",
        "accuracy",
        "accuracy_ci_low",
        "seconds",
        "device",
    }
    assert len(pd.read_parquet(out / "results.parquet")) == 6
    capsys.readouterr()
    assert main(["study", "run", str(study), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": done") == 6  # nothing trained twice
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Table 2: learning rate 0.001" in report and "## Table 3" in report
    assert "(90.9, " in report  # the paper's MobileNet v2 transfer accuracy beside ours
    # each learning rate's table has both modes of mobilenet_v2 and its paired comparison
    assert report.count("| mobilenet_v2 | Transfer learning | 1 | ") == 2
    for lr in ("0.001", "0.0001"):
        given = f"| Transfer learning − Scratch | arch=mobilenet_v2, lr={lr} | seed=0 | "
        assert report.count(given) == 9
    assert report.count("roc_auc (primary)") == 2 and "| DeLong |" in report
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert len(comparisons) == 2 * 9 and set(comparisons.option) == {"mode"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html


def test_study_survives_kill_9(small_kermany, tmp_path):
    study = write_study(
        tmp_path / "s.toml", small_kermany, modes=("scratch",), lrs=(1e-3, 1e-4), epochs=3
    )
    out = tmp_path / "study"
    command = [sys.executable, "-m", "medxfer.cli", "study", "run", str(study), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    first = out / "runs" / "mobilenet_v2-scratch-lr0.001-s0"
    deadline = time.time() + 300
    while not (first / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: an epoch finished, the run is not
    process.wait()
    assert not (first / "metrics.json").exists()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    table = pd.read_csv(out / "results.csv")
    assert sorted(table.cell) == [
        "mobilenet_v2-scratch-lr0.0001-s0",
        "mobilenet_v2-scratch-lr0.001-s0",
    ]
    history = pd.read_csv(first / "history.csv")
    assert list(history.epoch) == [1, 2, 3]  # resumed, not restarted or duplicated
    assert not list((out / "runs").glob("*/checkpoint.pt"))


def test_ray_executor_on_a_local_instance(small_kermany, tmp_path):
    ray = pytest.importorskip("ray")
    study = load_study(str(write_study(tmp_path / "s.toml", small_kermany)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = run_study(
            study,
            tmp_path / "study",
            executor="ray",
            cpus_per_cell=1,
            address="auto",
            log=lambda _: None,
        )
    finally:
        ray.shutdown()
    table = pd.read_csv(path)
    assert sorted(table["mode"]) == ["scratch", "transfer"]


def test_study_show_with_overrides(capsys):
    assert (
        main(
            [
                "study",
                "show",
                "paper",
                "--grid",
                "arch=resnet18",
                "--grid",
                "lr=1e-3",
                "--set",
                "epochs=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "study paper: 2 cells" in out and "'epochs': 2" in out
    assert "resnet18-scratch-lr0.001-s0" in out and "resnet18-transfer-lr0.001-s0" in out


def test_local_process_pool(small_kermany, tmp_path):
    study = load_study(str(write_study(tmp_path / "s.toml", small_kermany)))
    path = run_study(study, tmp_path / "study", workers=2, log=lambda _: None)
    table = pd.read_csv(path)
    assert sorted(table["mode"]) == ["scratch", "transfer"] and table.cell.is_unique


def test_grids_are_joined_and_overridden_in_each(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[base]\ndata = "x"\nepochs = 20\n'
        '[[grid]]\nmode = ["transfer"]\nhead = ["paper", "logreg"]\nseed = [0, 1]\n'
        '[[grid]]\nmode = ["finetune"]\nhead = ["paper"]\nepochs = [3]\nseed = [0, 1]\n'
    )
    study = load_study(str(path))
    cells = {c.name: c.options for c in study.cells()}
    assert list(cells) == [
        "transfer-head=paper-s0",
        "transfer-head=paper-s1",
        "transfer-head=logreg-s0",
        "transfer-head=logreg-s1",
        "finetune-head=paper-epochs=3-s0",
        "finetune-head=paper-epochs=3-s1",
    ]
    # base epochs stays for the grid that does not set it
    assert cells["transfer-head=logreg-s1"]["epochs"] == 20
    assert cells["finetune-head=paper-epochs=3-s0"]["epochs"] == 3
    assert study.base["epochs"] == 20 and "mode" not in study.base
    one_seed = load_study(str(path), grid_overrides=["seed=5"]).cells()
    assert [c.options["seed"] for c in one_seed] == [5, 5, 5]
    path.write_text('[base]\ndata = "x"\n[[grid]]\nseed = [0]\n[[grid]]\nseed = [0, 1]\n')
    with pytest.raises(MedxferError, match="the grids make the cell 's0' twice"):
        load_study(str(path))
    # the same options under other names: one experiment would count as two replicates
    path.write_text(
        '[base]\ndata = "x"\nhead = "paper"\n[[grid]]\nhead = ["paper"]\n[[grid]]\ntta = [1]\n'
    )
    with pytest.raises(MedxferError, match="cells 'head=paper' and 'tta=1' run the same options"):
        load_study(str(path))
    for grid in ("grid = 5", "grid = [1, 2]", 'grid = "x"', "[[grid]]", "[grid]"):
        path.write_text(f'[base]\ndata = "x"\n{grid}\n')
        with pytest.raises(MedxferError, match=r"grid must be a table \(\[grid\]\) or tables"):
            load_study(str(path))
    path.write_text('[base]\ndata = "x"\n[[grid]]\nseed = [0]\n[[grid]]\nhead = ["lasso"]\n')
    with pytest.raises(MedxferError, match="lasso"):  # every cell of every grid is checked
        load_study(str(path))


def test_baseline_names_experiment_options_with_single_values(tmp_path):
    path = tmp_path / "s.toml"
    grid = '[grid]\nhead = ["paper", "logreg"]\n'
    for baseline, error in [
        ("seed = 0", "study.baseline 'seed': not an experiment option"),
        ('head = ["paper"]', "study.baseline must map run options to single values"),
        ('colour = "red"', "study.baseline 'colour': not an experiment option"),
    ]:
        path.write_text(f'[study.baseline]\n{baseline}\n[base]\ndata = "x"\n{grid}')
        with pytest.raises(MedxferError, match=re.escape(error)):
            load_study(str(path))
    for baseline, error in [
        ('head = "lasso"', "lasso"),  # checked as a run option
        ('head = "mlp"', "study.baseline (head=mlp) is none of the study's cells"),
        ("lr = 1e-4", "study.baseline (lr=0.0001) is none of the study's cells"),
    ]:
        path.write_text(f'[study.baseline]\n{baseline}\n[base]\ndata = "x"\n{grid}')
        with pytest.raises(MedxferError, match=re.escape(error)):
            load_study(str(path))
    path.write_text(
        '[study.baseline]\nhead = "paper"\nthreshold = 0.5\nlr = 1e-3\ndata = "x"\n'
        f'[base]\ndata = "x"\n{grid}'
    )
    assert load_study(str(path)).baseline == {
        "head": "paper",
        "threshold_rule": 0.5,
        "lr": 1e-3,
        "data": str((Path.cwd() / "x").resolve()),  # as the cells run it
    }
