"""gs:// for real: checkpoints (orbax, through tensorstore and epath), TensorBoard events,
training data and the Hugging Face export (epath, through gcsfs), against a local GCS server
(gcp-storage-emulator) with no credentials; see docs/checkpointing.md, "Google Cloud Storage".
Also the error when the gcs extra is missing."""

import contextlib
import importlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import tiny_model

import kithara

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gcp-storage-emulator's CLI, with one fix: real GCS sends an object's generation in the
# x-goog-generation header of a download, and tensorstore (orbax's array writer) reads it
# there to update a file conditionally; the emulator sends none ("Malformed StorageGeneration").
_EMULATOR = """
import sys
from gcp_storage_emulator.handlers import objects

download = objects.download

def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    except Exception:
        pass  # a missing object: the emulator's own handler answers 404
    download(request, response, storage, *args, **kwargs)

objects.download = download_with_generation  # before the server module builds its routes
from gcp_storage_emulator.__main__ import main

sys.argv[0] = "gcp-storage-emulator"
main()
"""


@contextlib.contextmanager
def _emulator() -> Iterator[str]:
    pytest.importorskip("gcp_storage_emulator")
    port = _free_port()
    options = ["--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-c", _EMULATOR, "start", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _clear_filesystem_caches() -> None:
    import gcsfs.core
    from etils.epath import backend

    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs() -> Iterator[str]:
    """A local GCS server with an empty bucket ``gs://bucket``, every client pointed at it
    anonymously; yields its URL."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("google.cloud.storage")
    import fsspec

    with _emulator() as url, pytest.MonkeyPatch.context() as mp:
        # gcsfs (epath) and google-cloud-storage (the tests' own checks) read this; the
        # latter then uses anonymous credentials, gcsfs the token below.
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        # tensorstore's gcs driver (orbax's arrays) reads its endpoint from this; the token
        # spares it the search for credentials (a metadata-server probe, offline).
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous")
        mp.setenv("NO_GCE_CHECK", "true")
        # gcsfs's default filesystem first asks the gRPC storage-control API whether a bucket
        # is zonal, which the emulator does not serve (a 60 s timeout per bucket): use the
        # plain JSON-API filesystem, as gcsfs does for a regional bucket after that check.
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs.core

        registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is a view
        for protocol in ("gs", "gcs"):
            mp.setitem(registry, protocol, gcsfs.core.GCSFileSystem)
        mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        _clear_filesystem_caches()
        try:
            yield url
        finally:
            _clear_filesystem_caches()


def _blobs(prefix: str) -> list[str]:
    from google.cloud import storage

    return sorted(b.name for b in storage.Client().list_blobs(BUCKET, prefix=prefix))


def _trainer(examples, steps, **kwargs):
    loader = kithara.Dataloader(examples, 1, seed=0)
    kwargs.setdefault("progress_bar", False)
    return kithara.Trainer(tiny_model(), kithara.optimizers.adamw(1e-2), loader, steps=steps, **kwargs)


@pytest.mark.slow
def test_checkpoint_saves_to_and_restores_from_gcs(gcs, examples):
    ckpt = kithara.Checkpointer("gs://bucket/run/ckpt", save_interval=2, max_to_keep=1)
    trained = _trainer(examples[:48], 4, checkpointer=ckpt)
    trained.train()
    assert ckpt.manager.all_steps() == [4]  # step 2 saved, then deleted (max_to_keep)
    assert any(name.startswith("run/ckpt/4/") for name in _blobs("run/ckpt/"))
    assert not any(name.startswith("run/ckpt/2/") for name in _blobs("run/ckpt/"))

    state, data_state = kithara.Checkpointer("gs://bucket/run/ckpt").restore(trained)
    assert int(state.step) == 4 and data_state["batch"] == 4
    for path, value in trained.train_state.model.trainable.items():
        np.testing.assert_array_equal(np.asarray(state.model.trainable[path]), np.asarray(value))
    mu, expected_mu = state.opt_state.inner_state[1][0].mu, trained.train_state.opt_state.inner_state[1][0].mu
    for path, value in expected_mu.items():
        np.testing.assert_array_equal(np.asarray(mu[path]), np.asarray(value))


def test_tensorboard_gs_without_the_gcs_extra_names_the_extra(monkeypatch, examples):
    # What a Python without the gcs extra sees: importing gcsfs fails.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ImportError, match=r'pip install "kithara\[gcs\]"'):
        kithara.TensorBoardLogger("gs://bucket/tb")
    with pytest.raises(ImportError, match=r"'gs://bucket/run/runs' is on Google Cloud Storage"):
        _trainer(examples, 2, tensorboard_dir="gs://bucket/run/runs")
    kithara.TensorBoardLogger("runs/local")  # local directories need nothing more


def _download(prefix: str, to) -> list[str]:
    """Copies the objects under ``prefix`` into directory ``to``; returns their names there."""
    from google.cloud import storage

    names = []
    for blob in storage.Client().list_blobs(BUCKET, prefix=prefix):
        name = blob.name[len(prefix) :]
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(to / name))
        names.append(name)
    return sorted(names)


@pytest.mark.slow
def test_sft_reads_data_and_writes_checkpoints_and_tensorboard_on_gcs(gcs, tmp_path):
    from conftest import word_tokenizer
    from google.cloud import storage
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [{"prompt": "hi how are you", "completion": "fine thanks"}, {"prompt": "hello", "completion": "ok bye"}] * 8
    blob = storage.Client().bucket(BUCKET).blob("data/train.jsonl")
    blob.upload_from_string("".join(json.dumps(row) + "\n" for row in rows))

    def trainer(steps):
        return kithara.SFTTrainer(
            tiny_model(),
            "gs://bucket/data/train.jsonl",
            tokenizer=word_tokenizer(),
            args=kithara.SFTConfig(
                output_dir="gs://bucket/sft",
                max_length=8,
                max_steps=steps,
                save_steps=2,
                logging_steps=1,
                disable_tqdm=True,
            ),
        )

    first = trainer(2)
    assert len(first.train()) == 2
    second = trainer(3)
    history = second.train()
    assert second.restored_step == 2 and [h["step"] for h in history] == [3]
    assert kithara.Checkpointer("gs://bucket/sft/checkpoints").manager.all_steps() == [2, 3]

    names = _download("sft/runs/", tmp_path / "tb")
    assert names and all(name.startswith("events.out.tfevents.") for name in names), names
    steps = set()
    for name in names:
        events = EventAccumulator(str(tmp_path / "tb" / name))
        events.Reload()
        steps |= {event.step for event in events.Scalars("train/loss")}
    assert steps == {1, 2, 3}


@pytest.mark.slow
def test_hf_export_writes_to_gcs(gcs, tmp_path):
    from conftest import word_tokenizer

    model = tiny_model()
    model.save_in_hf_format(str(tmp_path / "local"), max_shard_size="20KB", tokenizer=word_tokenizer())
    model.save_in_hf_format("gs://bucket/hf", max_shard_size="20KB", tokenizer=word_tokenizer())
    names = _download("hf/", tmp_path / "remote")
    local = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert names == local and "model.safetensors.index.json" in names
    for name in names:
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name

    model.save_in_hf_format("gs://bucket/hf")  # one shard now: the earlier shards and index go
    weights = [name for name in _blobs("hf/") if "safetensors" in name]
    assert weights == ["hf/model.safetensors"]
