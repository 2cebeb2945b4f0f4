"""MLflowLogger: training metrics and config to MLflow (``report_to="mlflow"``)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from kithara.callbacks.base import StepInfo
from kithara.callbacks.metric_logger import MetricLogger, import_module, require

logger = logging.getLogger(__name__)

_NOT_IN_A_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")  # what MLflow refuses in a metric name


class MLflowLogger(MetricLogger):
    """Logs train and eval metrics to an MLflow run, under the names TensorBoard gets
    (``train/loss``, ``eval/loss``, ...) with the optimizer step as MLflow's ``step``, and
    ``params`` as the run's parameters.

    The run is created when training begins and ended when it ends (``FINISHED``, or
    ``FAILED`` when training raised). It lives in ``experiment_name`` (created if new) at
    ``tracking_uri``. Like transformers' ``MLflowCallback`` it reads ``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID`` (log into that run, say when resuming) and
    ``MLFLOW_TAGS`` (a JSON object of tags); a run the caller started (``mlflow.start_run()``
    around ``train()``) is logged into and left open. Parameter values longer than MLflow's
    limit (6000 characters) are cut, ending in ``...``. Needs the ``mlflow`` extra
    (``pip install "kithara[mlflow]"``: mlflow-skinny, which tracks to a server or a local
    directory; a local directory store needs ``MLFLOW_ALLOW_FILE_STORE=true`` from MLflow 3.7,
    and ``sqlite:`` stores need the full ``mlflow`` package).

    Args:
        every: log train metrics every this many steps (and at the last step).
        experiment_name: ``None`` reads ``MLFLOW_EXPERIMENT_NAME``, else MLflow's default experiment.
        run_name: the run's name; ``None`` lets MLflow pick one.
        tracking_uri: ``None`` reads ``MLFLOW_TRACKING_URI``, else MLflow's default.
        params: the run's parameters (``report_to`` passes the ``TrainingConfig``'s fields).

    Example:
        >>> trainer = kithara.Trainer(..., callbacks=[MLflowLogger(tracking_uri="http://localhost:5000")])
        >>> # or: MLFLOW_TRACKING_URI=... with kithara.SFTConfig(report_to="mlflow", run_name="lr3e-4")
    """

    def __init__(
        self,
        every: int = 1,
        *,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(every)
        require("mlflow", "mlflow", "MLflowLogger (report_to='mlflow')")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.params = dict(params or {})
        self.run_id: str | None = None  # the MLflow run while training
        self._client: Any = None
        self._owns_run = False

    def start(self, info: StepInfo) -> None:
        mlflow = import_module("mlflow")
        active = mlflow.active_run()
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        if active is not None:
            uri = mlflow.get_tracking_uri()
        self._client = client = mlflow.MlflowClient(uri)
        tags = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
        if active is not None:
            self.run_id, self._owns_run = active.info.run_id, False
        elif os.environ.get("MLFLOW_RUN_ID"):
            self.run_id, self._owns_run = os.environ["MLFLOW_RUN_ID"], True
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(self._experiment_id(client), run_name=self.run_name)
            self.run_id, self._owns_run = run.info.run_id, True
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)
        self._log_params(mlflow)

    def _experiment_id(self, client: Any) -> str:
        name = self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return "0"  # MLflow's "Default" experiment
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else client.create_experiment(name)

    def _log_params(self, mlflow: Any) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self._client.get_run(self.run_id).data.params  # a resumed run keeps its values
        params = [Param(k, truncate(v, MAX_PARAM_VAL_LENGTH)) for k, v in self.params.items() if k not in logged]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_NOT_IN_A_NAME.sub("_", k), v, now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=rows)

    def finish(self, error: BaseException | None) -> None:
        if self._owns_run:
            self._client.set_terminated(self.run_id, "FINISHED" if error is None else "FAILED")
        self.run_id = None


def truncate(value: Any, limit: int) -> str:
    """``str(value)``, cut to ``limit`` characters (ending in ``...``) when longer."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
