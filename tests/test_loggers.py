"""report_to loggers: one tiny run writes TensorBoard, an offline wandb run and an MLflow file
store; each is read back with its own reader and must hold exactly the trainer's history."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model

import kithara
from kithara.callbacks.base import StepInfo
from kithara.callbacks.loggers import config_values, reporting_callbacks
from kithara.callbacks.metric_logger import MetricLogger
from kithara.callbacks.mlflow_logger import MLflowLogger, truncate
from kithara.callbacks.tensorboard import TensorBoardLogger
from kithara.callbacks.wandb_logger import WandbLogger


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline (no network) and MLflow in a local directory store, both under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 asks for it with a directory store
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    import wandb

    wandb.teardown()  # wandb reads its environment once per setup: start afresh, with this test's
    yield tmp_path
    wandb.teardown()


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``.wandb`` file, read independently of the wandb SDK's
    writer: a 7-byte header (``:W&B``, magic, version), then LevelDB log framing (32 KiB
    blocks; each chunk a 4-byte checksum, 2-byte length, 1-byte type: 1 full, 2 first,
    3 middle, 4 last) around serialized ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(records) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from the history records."""
    history: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return history


def expected_series(trainer, every: int) -> dict[str, list[tuple[int, float]]]:
    """What every logger must hold: train metrics of the logged steps, eval metrics of every
    evaluation, under ``train/`` and ``eval/``, from the trainer's own history."""
    series: dict[str, list[tuple[int, float]]] = {}
    for prefix, rows in (("train", trainer.history), ("eval", trainer.eval_history)):
        for row in rows:
            step = int(row["step"])
            if prefix == "train" and step % every and step != trainer.total_steps:
                continue
            for name, value in row.items():
                if name != "step":
                    series.setdefault(f"{prefix}/{name}", []).append((step, float(value)))
    return series


def test_one_run_writes_the_same_metrics_to_tensorboard_wandb_and_mlflow(examples, offline):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = kithara.Trainer(
        tiny_model(),
        train_dataloader=kithara.Dataloader(examples[:32], 1, seed=0),
        eval_dataloader=kithara.Dataloader(examples[:8], 1, shuffle=False, drop_remainder=False),
        max_steps=4,
        logging_steps=2,
        eval_steps=2,
        learning_rate=1e-2,
        report_to=["tensorboard", "wandb", "mlflow"],
        logging_dir=str(offline / "tb"),
        run_name="tiny",
        project="kithara-tests",
        disable_tqdm=True,
    )
    assert [type(cb) for cb in trainer.callbacks] == [TensorBoardLogger, WandbLogger, MLflowLogger]
    trainer.train()
    expected = expected_series(trainer, every=2)
    assert {"train/loss", "train/learning_rate", "train/tokens", "eval/loss", "eval/perplexity"} <= set(expected)
    assert [s for s, _ in expected["train/loss"]] == [2, 4] and [s for s, _ in expected["eval/loss"]] == [2, 4]

    # Weights & Biases: the offline run file, exactly (JSON floats round-trip), and its config and exit code.
    (run_dir,) = (offline / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    assert wandb_history(records) == expected
    kinds = {r.WhichOneof("record_type"): r for r in records}
    assert kinds["run"].run.project == "kithara-tests" and kinds["run"].run.display_name == "tiny"
    config = {i.key: json.loads(i.value_json) for i in kinds["run"].run.config.update}
    assert config["learning_rate"] == 1e-2 and config["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert config["config_class"] == "TrainingConfig"
    assert kinds["exit"].exit.exit_code == 0

    # MLflow: the file store through MlflowClient, exactly (float64), and the params and status.
    client = MlflowClient(offline.joinpath("mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("kithara-tests").experiment_id])
    assert (run.info.run_name, run.info.status) == ("tiny", "FINISHED")
    logged = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in run.data.metrics
    }
    assert logged == expected
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["run_name"] == "tiny"

    # TensorBoard: the same tags and steps, values as float32.
    events = EventAccumulator(str(offline / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in series], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in series], rtol=1e-6, err_msg=tag)


def info(step: int = 1, metrics=None, error: BaseException | None = None) -> StepInfo:
    return StepInfo(step, 0, 3, 0, None, dict(metrics or {}), None, error, lambda: None, dict)


def test_a_failed_run_is_closed_as_failed(offline):
    """Training that raised ends the wandb run with exit code 1 and the MLflow run FAILED."""
    from mlflow import MlflowClient

    error = RuntimeError("boom")
    loggers = [WandbLogger(project="p"), MLflowLogger(run_name="failing")]
    for logger in loggers:
        logger.on_train_begin(info(0))
        logger.on_step_end(info(1, {"loss": 2.5}))
        logger.on_train_end(info(1, error=error))
    (run_dir,) = (offline / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    assert wandb_history(records) == {"train/loss": [(1, 2.5)]}
    assert next(r for r in records if r.HasField("exit")).exit.exit_code == 1
    client = MlflowClient(offline.joinpath("mlruns").as_uri())
    (run,) = client.search_runs(["0"])
    assert (run.info.status, run.data.metrics) == ("FAILED", {"train/loss": 2.5})


def test_runs_opened_by_the_caller_or_named_by_environment(offline, monkeypatch):
    """A run the caller opened is logged into and left open; MLFLOW_RUN_ID reattaches to a run
    (resuming), keeping the parameters it already has."""
    import mlflow
    import wandb
    from mlflow import MlflowClient

    run = wandb.init(project="mine")
    logger = WandbLogger(config={"learning_rate": 0.5})
    logger.on_train_begin(info(0))
    logger.on_step_end(info(3, {"loss": 1.5}))
    logger.on_train_end(info(3))
    assert wandb.run is run and run.config["learning_rate"] == 0.5
    run.finish()

    with mlflow.start_run(run_name="outer") as outer:
        logger = MLflowLogger(params={"learning_rate": 0.5})
        logger.on_train_begin(info(0))
        logger.on_step_end(info(3, {"loss": 1.5}))
        logger.on_train_end(info(3))
        client = MlflowClient()
        assert client.get_run(outer.info.run_id).info.status == "RUNNING"
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    resumed = MLflowLogger(params={"learning_rate": 0.25, "seed": 1})
    resumed.on_train_begin(info(3))
    resumed.on_step_end(info(4, {"loss": 1.0}))
    resumed.on_train_end(info(4))
    finished = client.get_run(outer.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params == {"learning_rate": "0.5", "seed": "1"}  # kept, and the new one added
    history = client.get_metric_history(outer.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 1.5), (4, 1.0)]


class Recorder(MetricLogger):
    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.calls: list = []

    def start(self, info):
        self.calls.append("start")

    def log(self, metrics, step):
        self.calls.append((step, metrics))

    def finish(self, error):
        self.calls.append(("finish", error))


def test_schedule_names_and_process_zero(monkeypatch):
    recorder = Recorder(every=2)
    recorder.on_eval_end(info(0, {"loss": 1.0}))  # outside a run: not sent
    recorder.on_train_begin(info(0))
    for step in (1, 2, 3):
        recorder.on_step_end(info(step, {"loss": float(step)}))
    recorder.on_eval_end(info(3, {"loss": 0.5}))
    recorder.on_train_end(info(3))
    assert recorder.calls == [
        "start",
        (2, {"train/loss": 2.0}),
        (3, {"train/loss": 3.0}),  # the last step is always logged
        (3, {"eval/loss": 0.5}),
        ("finish", None),
    ]
    monkeypatch.setattr("jax.process_index", lambda: 1)
    other = Recorder(every=1)
    other.on_train_begin(info(0))
    other.on_step_end(info(1, {"loss": 1.0}))
    other.on_train_end(info(1))
    assert other.calls == []


def test_report_to_chooses_the_loggers(monkeypatch, tmp_path):
    config = kithara.TrainingConfig(output_dir=str(tmp_path), report_to="all", save_strategy="no")
    assert config.report_integrations == ("tensorboard", "wandb", "mlflow")
    assert [type(cb) for cb in reporting_callbacks(config)] == [TensorBoardLogger, WandbLogger, MLflowLogger]
    assert reporting_callbacks(kithara.TrainingConfig(report_to="none")) == []
    assert reporting_callbacks(kithara.TrainingConfig(report_to="tensorboard")) == []  # no directory: nothing
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    assert kithara.TrainingConfig(report_to="all").report_integrations == ("tensorboard", "mlflow")
    for cls in (kithara.SFTConfig, kithara.DPOConfig, kithara.GRPOConfig):  # what the runs' configs hold
        values = config_values(cls())
        assert json.loads(json.dumps(values)) == values and values["config_class"] == cls.__name__


@pytest.mark.parametrize(
    ("report_to", "error", "match"),
    [
        ("wandbb", ValueError, "unknown integration 'wandbb'; did you mean 'wandb'"),
        (["tensorbord"], ValueError, "did you mean 'tensorboard'"),
        ("MLflow", ValueError, "did you mean 'mlflow'"),
        (["none", "wandb"], ValueError, "mixes 'none'"),
        ("comet_ml", NotImplementedError, "kithara has no comet_ml logger"),
    ],
)
def test_bad_report_to_is_refused(report_to, error, match):
    with pytest.raises(error, match=match):
        kithara.TrainingConfig(report_to=report_to)


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r'needs the mlflow package.*pip install "kithara\[mlflow\]"'):
        kithara.TrainingConfig(report_to=["tensorboard", "mlflow"])
    with pytest.raises(ImportError, match=r'pip install "kithara\[mlflow\]"'):
        MLflowLogger()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'pip install "kithara\[wandb\]"'):
        kithara.TrainingConfig(report_to="wandb")
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        Recorder(every=0)


def test_long_params_are_cut_to_mlflows_limit():
    assert truncate("x" * 10, 10) == "x" * 10
    assert truncate("x" * 11, 10) == "x" * 7 + "..."
    assert truncate([1, 2], 10) == "[1, 2]"
