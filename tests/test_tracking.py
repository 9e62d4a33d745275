"""MLflow tracking: a run's params, per-epoch metrics, final metrics, tags and files, read back
through MLflow's own client; a resumed run continues its MLflow run; a study is a parent run with
one child per cell, logged by two worker processes into one SQLite store."""

import json

import pandas as pd
import pytest

import medxfer
from medxfer.storage.folder import RunFolder
from medxfer.study.execute import run_study
from medxfer.study.spec import load_study

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

TINY = dict(image_size=32, epochs=2, bootstrap=50, quiet=True)


class StopAfterFirstEpoch:
    """An injected handler that interrupts training after epoch 1, as a kill would."""

    def started(self, folder, cfg):
        pass

    def epoch_ended(self, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    def finished(self, folder, metrics):
        pass

    def failed(self, folder, error):
        pass


def test_tracked_run_is_logged_and_a_resumed_run_continues_it(small_kermany, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        medxfer.train(small_kermany, out, track="mlflow", handlers=[StopAfterFirstEpoch()], **TINY)
    first = RunFolder(out).read_tracking()
    assert first["tracking_uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    interrupted = MlflowClient(first["tracking_uri"]).get_run(first["run_id"])
    assert interrupted.info.status == "KILLED"  # not left RUNNING
    folder = medxfer.train(small_kermany, out, track="mlflow", **TINY)  # resumes
    record = folder.read_tracking()
    assert record["run_id"] == first["run_id"]

    client = MlflowClient(record["tracking_uri"])
    experiment = client.get_experiment_by_name("medxfer")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [record["run_id"]]  # one MLflow run, not two
    run = runs[0]
    assert run.info.status == "FINISHED"
    cfg = folder.read_config()
    assert run.data.params == {k: str(v) for k, v in cfg.to_dict().items()}
    assert run.data.tags["arch"] == "mobilenet_v2" and run.data.tags["mode"] == "transfer"
    assert run.data.tags["task"] == "binary" and run.data.tags["device"] == "cpu"
    # every epoch of history.csv, once, at its step
    history = folder.read_history()
    for column in ("train_loss", "val_loss", "test_accuracy"):
        logged = client.get_metric_history(run.info.run_id, column)
        steps = sorted((m.step, m.value) for m in logged)
        assert [s for s, _ in steps] == list(history.epoch)
        assert [v for _, v in steps] == pytest.approx(list(history[column]))
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    test = metrics["test"]
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(test["accuracy"])
    assert run.data.metrics["final_test_roc_auc"] == pytest.approx(test["roc_auc"])
    low, high = test["ci95"]["f1"]
    assert run.data.metrics["final_test_f1_ci_low"] == pytest.approx(low)
    assert run.data.metrics["final_test_f1_ci_high"] == pytest.approx(high)
    assert run.data.metrics["selected_epoch"] == metrics["selected_epoch"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {
        "config.json",
        "metrics.json",
        "reliability.png",
        "predictions.csv",
        "model_card.md",
    }
    local = client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_csv(local), folder.read_predictions(None))
    # an export afterwards joins the same MLflow run
    medxfer.load(out).export(out / "model.onnx")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.onnx", "model.onnx.json"} <= artifacts


def test_study_is_a_parent_run_with_one_child_per_cell(small_kermany, tmp_path):
    spec = tmp_path / "study.toml"
    spec.write_text(
        f"""
[study]
name = "tracked"
track = "mlflow"

[base]
data = "{small_kermany}"
epochs = 1
image_size = 32
bootstrap = 0

[grid]
mode = ["scratch", "transfer"]
"""
    )
    out = tmp_path / "study"
    # two worker processes log their cells into the study's one SQLite store at once
    run_study(load_study(str(spec)), out, workers=2, log=lambda _: None)
    record = RunFolder(out).read_tracking()
    assert record["tracking_uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    client = MlflowClient(record["tracking_uri"])
    parent = client.get_run(record["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracked"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.params["mode"] for r in children) == ["scratch", "transfer"]
    for child in children:
        assert child.info.status == "FINISHED"
        cell = RunFolder(out / "runs" / child.info.run_name)
        assert cell.read_tracking()["run_id"] == child.info.run_id
        [epoch] = client.get_metric_history(child.info.run_id, "train_loss")
        assert epoch.step == 1 and epoch.value == pytest.approx(cell.read_history().train_loss[0])
    assert "results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


WRITER = """
import sys
from mlflow.tracking import MlflowClient
from medxfer.tracking import _log_batch, _retry
client = _retry(MlflowClient, sys.argv[1])
run = _retry(client.create_run, sys.argv[2], run_name=sys.argv[3])
for step in range(1, 41):
    _log_batch(client, run.info.run_id, metrics={"x": step / 40, "y": step}, step=step)
_retry(client.set_terminated, run.info.run_id, "FINISHED")
"""


def test_two_processes_write_one_sqlite_store(tmp_path):
    """Parallel writers: SQLite takes one at a time; every row of both arrives."""
    import subprocess
    import sys

    from medxfer.tracking import _client, experiment, store_uri

    uri = store_uri(None, tmp_path)
    experiment_id = experiment(_client(uri), "parallel", uri)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, experiment_id, f"w{i}"])
        for i in range(2)
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "x"))
        assert history == [(s, s / 40) for s in range(1, 41)]


# -- stores MLflow would fail on mid-run are refused before anything is written --------------
def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///tmp/medxfer-x/mlruns", "MLflow's file store is in maintenance mode"),
        ("./mlruns", "MLflow's file store is in maintenance mode"),
        ("ftp://example.invalid/store", "not an MLflow tracking URI"),
        (f"http://127.0.0.1:{_closed_port()}", "no MLflow server answers there"),
    ],
)
def test_a_store_mlflow_would_fail_on_is_refused_in_one_line(
    small_kermany, tmp_path, capsys, monkeypatch, uri, expected
):
    from medxfer.cli import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(out), "--track", "mlflow"]
    assert main([*args, "--tracking-uri", uri, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medxfer: error: {uri}: {expected}")
    assert list(tmp_path.iterdir()) == []  # no run folder, no lock file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same store from the environment
    assert main([*args, "--quiet"]) == 2
    assert uri in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_study_refuses_a_file_store_before_its_folder_exists(tmp_path, monkeypatch):
    from medxfer.errors import MedxferError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    study_file = tmp_path / "s.toml"
    study_file.write_text(
        f'[study]\ntrack = "mlflow"\ntracking_uri = "file://{tmp_path}/mlruns"\n'
        '[base]\ndata = "d"\n[grid]\nmode = ["scratch", "transfer"]\n'
    )
    with pytest.raises(MedxferError, match=r"use sqlite:///PATH/mlflow\.db"):
        run_study(load_study(str(study_file)), tmp_path / "study", log=lambda _: None)
    assert not (tmp_path / "study").exists()


def test_file_store_runs_with_mlflows_own_opt_out(small_kermany, tmp_path, monkeypatch):
    """``MLFLOW_ALLOW_FILE_STORE=true`` is MLflow's documented opt-out: then a file store works."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    folder = medxfer.train(small_kermany, out, track="mlflow", tracking_uri=uri, **TINY)
    record = folder.read_tracking()
    run = MlflowClient(uri).get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(
        folder.read_metrics()["test"]["accuracy"]
    )
