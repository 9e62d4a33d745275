"""Experiment tracking as handlers the pipeline calls (MONAI-style): ``started`` once the run
folder holds its config, ``epoch_ended`` after each epoch's history row, ``finished`` after
every file is written. ``MlflowHandler`` logs a run to MLflow through its client library.

The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store
``mlflow.db`` in the run's folder (the study's folder for studies): MLflow's own local backend,
no server. A run's MLflow id is kept in the run folder (``tracking.json``) so that a resumed run
continues its MLflow run instead of opening a second one. Study cells become child runs of one
parent run per study (``study_tracking``).
"""

from __future__ import annotations

import math
import os
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from medxfer.errors import MedxferError

if TYPE_CHECKING:
    from medxfer.storage.folder import RunFolder

STORE = "mlflow.db"
ARTIFACTS = "mlartifacts"
PARENT_ENV = "MEDXFER_MLFLOW_PARENT_RUN"  # set by ``study_tracking`` for the cells it runs
DEFAULT_EXPERIMENT = "medxfer"
RUN_FILES = ("config.json", "metrics.json", "reliability.png", "predictions.csv", "model_card.md")


class Handler(Protocol):
    """What the pipeline tells an observer of a run."""

    def started(self, folder: RunFolder, options: dict[str, Any]) -> None: ...

    def epoch_ended(self, row: dict[str, Any]) -> None: ...

    def finished(self, folder: RunFolder, metrics: dict[str, Any]) -> None: ...

    def failed(self, folder: RunFolder, error: BaseException) -> None: ...


def configured_handlers(options: Any) -> list[Handler]:
    """The handlers a run's own options ask for (``--track``), for any task family."""
    if getattr(options, "track", "none") != "mlflow":
        return []
    return [MlflowHandler(getattr(options, "tracking_uri", None))]


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
SERVER_SCHEMES = ("http", "https")


def check_store(track: str, explicit: str | None) -> None:
    """Refuse, before anything is written, a tracking store MLflow would fail on mid-run:
    a file store (MLflow keeps it in maintenance mode and raises on new runs unless
    ``MLFLOW_ALLOW_FILE_STORE=true``), a server that does not answer, an unknown scheme."""
    if track != "mlflow":
        return
    _client_class()  # the MLflow client is installed
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return  # the SQLite store in the run (or study) folder
    scheme = urlparse(uri).scheme.lower().split("+")[0]
    if scheme in ("", "file") or len(scheme) == 1:  # a path, file:, or a Windows drive
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise MedxferError(
                f"{uri}: MLflow's file store is in maintenance mode and refuses new runs;"
                " use sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
            )
    elif scheme in SERVER_SCHEMES:
        _check_server(uri)
    elif scheme not in (*DATABASE_SCHEMES, "databricks"):
        known = ", ".join((*DATABASE_SCHEMES, *SERVER_SCHEMES, "databricks", "file"))
        raise MedxferError(f"{uri}: not an MLflow tracking URI (schemes: {known})")


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """An MLflow server answers ``GET /health``; anything else stops the run here."""
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            response.read(64)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
        raise MedxferError(f"{uri}: no MLflow server answers there ({reason})") from None


def store_uri(explicit: str | None, folder: Path) -> str:
    """The tracking URI: the given one, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``folder``."""
    chosen = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return chosen or f"sqlite:///{(Path(folder) / STORE).resolve()}"


class MlflowHandler:
    """Logs one run: options as params, each epoch's history row as metrics (step = epoch),
    the selected epoch's test metrics with their 95% interval bounds, tags, and the run's
    files as artifacts."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.run_id: str | None = None

    def started(self, folder: RunFolder, options: dict[str, Any]) -> None:
        uri = store_uri(self.tracking_uri, folder.path)
        self.client = _client(uri)
        record = folder.read_tracking()
        if record and record.get("tracking_uri") == uri and record.get("run_id"):
            self.run_id = record["run_id"]
            _retry(self.client.update_run, self.run_id, status="RUNNING")
            self._catch_up(folder)
        else:
            self.run_id = self._create_run(folder, uri)
            folder.write_tracking({"tracker": "mlflow", "tracking_uri": uri, "run_id": self.run_id})
        logged = _retry(self.client.get_run, self.run_id).data.params
        params = [(k, _param(v)) for k, v in sorted(options.items()) if k not in logged]
        _log_batch(self.client, self.run_id, params=params)

    def epoch_ended(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        values = {k: v for k, v in row.items() if k != "epoch"}
        _log_batch(self.client, self.run_id, metrics=_numbers(values), step=step)

    def finished(self, folder: RunFolder, metrics: dict[str, Any]) -> None:
        _log_batch(self.client, self.run_id, metrics=final_metrics(metrics))
        for name in RUN_FILES:
            if folder.file(name).exists():
                _retry(self.client.log_artifact, self.run_id, str(folder.file(name)))
        _retry(self.client.set_terminated, self.run_id, "FINISHED")

    def failed(self, folder: RunFolder, error: BaseException) -> None:
        """An interrupted run is KILLED, a crashed one FAILED; a rerun resumes the same run."""
        if self.run_id is None:
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        _retry(self.client.set_terminated, self.run_id, status)

    def _catch_up(self, folder: RunFolder) -> None:
        """A resumed run: log the finished epochs its MLflow run missed (interrupted between
        the checkpoint and the log)."""
        if not folder.file(folder.HISTORY).exists():
            return
        logged = {m.step for m in _retry(self.client.get_metric_history, self.run_id, "seconds")}
        for row in folder.read_history().to_dict("records"):
            if int(row["epoch"]) not in logged:
                self.epoch_ended(row)

    def _create_run(self, folder: RunFolder, uri: str) -> str:
        parent = os.environ.get(PARENT_ENV)
        tags = run_tags(folder)
        if parent:
            experiment_id = _retry(self.client.get_run, parent).info.experiment_id
            tags["mlflow.parentRunId"] = parent
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
            experiment_id = experiment(self.client, name, uri)
        run = _retry(self.client.create_run, experiment_id, tags=tags, run_name=folder.path.name)
        return run.info.run_id


def run_tags(folder: RunFolder) -> dict[str, str]:
    """What identifies a run at a glance in the MLflow UI."""
    options, resolved = folder.read_options(), folder.read_resolved()
    env = folder.read_environment()
    tags = {
        "arch": str(options.get("arch")),
        "mode": str(options.get("mode")),
        "task": str(resolved.get("task", folder.family())),
        "device": str(resolved.get("device")),
        "git_commit": str(env.get("git_commit")),
        "run_folder": str(folder.path.resolve()),
    }
    if env.get("git_commit"):
        tags["mlflow.source.git.commit"] = env["git_commit"]
    return tags


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``final_test_<name>`` (the selected epoch's; ``test_<name>`` is the per-epoch series) with
    ``final_test_<name>_ci_low/_ci_high``, the calibration numbers and the selected epoch."""
    test = metrics.get("test") or {}
    out = {f"final_test_{k}": v for k, v in _numbers(test).items()}
    for name, bounds in (test.get("ci95") or {}).items():
        if isinstance(bounds, list | tuple) and len(bounds) == 2:
            low, high = f"final_test_{name}_ci_low", f"final_test_{name}_ci_high"
            out.update(_numbers({low: bounds[0], high: bounds[1]}))
    calibration = metrics.get("calibration") or {}
    out.update(_numbers({f"calibration_{k}": v for k, v in calibration.items()}))
    out.update(_numbers({"selected_epoch": metrics.get("selected_epoch")}))
    return out


def log_files(folder: RunFolder, paths: list[Path]) -> bool:
    """Add files made after training (an export) to the run's MLflow run, if it was tracked."""
    record = folder.read_tracking()
    if not record:
        return False
    client = _client(record["tracking_uri"])
    for path in paths:
        _retry(client.log_artifact, record["run_id"], str(path))
    return True


@contextmanager
def study_tracking(name: str, out: Path, base: dict[str, Any]) -> Iterator[str | None]:
    """A parent MLflow run around a study whose cells track (``[study] track = "mlflow"``):
    the cells, in this process or in worker processes started inside the block, log child runs
    into the same store. A rerun of the study continues its parent run."""
    if base.get("track", "none") != "mlflow":
        yield None
        return
    from medxfer.storage.folder import RunFolder

    folder = RunFolder(out)
    uri = store_uri(base.get("tracking_uri"), out)
    client = _client(uri)
    record = folder.read_tracking()
    if record and record.get("tracking_uri") == uri:
        run_id = record["run_id"]
        _retry(client.update_run, run_id, status="RUNNING")
    else:
        experiment_id = experiment(client, name, uri)
        run = _retry(client.create_run, experiment_id, tags={"study": name}, run_name=name)
        run_id = run.info.run_id
        folder.write_tracking({"tracker": "mlflow", "tracking_uri": uri, "run_id": run_id})
    saved = {k: os.environ.get(k) for k in (PARENT_ENV, "MLFLOW_TRACKING_URI")}
    os.environ[PARENT_ENV], os.environ["MLFLOW_TRACKING_URI"] = run_id, uri
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for table in ("results.csv",):
            if (out / table).exists():
                _retry(client.log_artifact, run_id, str(out / table))
        _retry(client.set_terminated, run_id, status)


def experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing; a local SQLite store keeps its
    artifacts beside itself (``mlartifacts/``; MLflow's default is ``./mlruns`` of whatever
    folder the command was started from), a server decides for itself."""
    found = _retry(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[10:]).resolve().parent / ARTIFACTS).as_uri()
    try:
        return _retry(client.create_experiment, name, artifact_location=location)
    except Exception:  # created meanwhile by another process
        found = _retry(client.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


# -- the MLflow client, with retries for a store shared by parallel processes ----------------
def _client_class() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MedxferError(
            "--track mlflow needs the MLflow client: pip install 'medxfer[track]'"
        ) from None
    return MlflowClient


def _client(uri: str) -> Any:
    client_class = _client_class()
    if uri.startswith("sqlite:///"):
        Path(uri[10:]).parent.mkdir(parents=True, exist_ok=True)
    return _retry(client_class, uri)


def _retry(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call`` again (up to about a minute, jittered) while SQLite says another process holds
    the database: SQLite allows one writer at a time and MLflow does not wait for the lock."""
    delay = 0.05
    for _ in range(40):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                raise
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 2.0)
    return call(*args, **kwargs)


def _log_batch(client: Any, run_id: str | None, *, params=(), metrics=None, step: int = 0) -> None:
    from mlflow.entities import Metric, Param

    stamp = int(time.time() * 1000)
    metric_list = [Metric(k, float(v), stamp, step) for k, v in (metrics or {}).items()]
    param_list = [Param(k, v) for k, v in params]
    for start in range(0, max(len(metric_list), len(param_list), 1), 100):  # MLflow's batch limit
        _retry(
            client.log_batch,
            run_id,
            metrics=metric_list[start : start + 100],
            params=param_list[start : start + 100],
        )


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite real numbers of ``values`` (bools and None left out)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _param(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a parameter value
