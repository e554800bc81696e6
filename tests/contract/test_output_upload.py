"""spec.output.uri: at the end of training the trainer uploads the best model and result.json (and, when asked,
the checkpoints) through fsspec. Checked against a real S3-compatible server (moto's, in this process) with s3fs,
the same client the trainer image uses, and gs:// against gcp-storage-emulator (also in this process) with gcsfs;
credentials and endpoint come from the environment, as the pod gets them from output.credentialsSecret (envFrom)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from trainer.tiny_models import build_tiny_bert, make_manifest, write_tiny_data

from finetune_operator.api import validate_manifest
from finetune_trainer.upload import UploadError, upload_results

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    yield env
    server.stop()


@pytest.fixture
def s3fs_client(s3, monkeypatch):
    import s3fs

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _results(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "best" / "adapter").mkdir(parents=True)
    (out / "best" / "model.safetensors").write_bytes(b"\0" * 4096)
    (out / "best" / "adapter" / "adapter_config.json").write_text("{}")
    (out / "checkpoints" / "epoch-1").mkdir(parents=True)
    (out / "checkpoints" / "epoch-1" / "trainer_state.json").write_text("{}")
    (out / "result.json").write_text(json.dumps({"outcome": "completed"}))
    return out


def test_best_model_and_result_are_uploaded(s3fs_client, tmp_path):
    s3fs_client.mkdir("models-a")
    out = _results(tmp_path)
    done = upload_results(SimpleNamespace(uri="s3://models-a/team/bbc", upload_checkpoints=False), str(out), "bbc")
    assert done == ["s3://models-a/team/bbc/best", "s3://models-a/team/bbc/result.json"]
    assert sorted(s3fs_client.find("models-a")) == [
        "models-a/team/bbc/best/adapter/adapter_config.json", "models-a/team/bbc/best/model.safetensors",
        "models-a/team/bbc/result.json"]
    assert s3fs_client.cat("models-a/team/bbc/best/model.safetensors") == b"\0" * 4096


def test_checkpoints_only_when_asked(s3fs_client, tmp_path):
    s3fs_client.mkdir("models-b")
    upload_results(SimpleNamespace(uri="s3://models-b/run/", upload_checkpoints=True), str(_results(tmp_path)), "bbc")
    assert "models-b/run/checkpoints/epoch-1/trainer_state.json" in s3fs_client.find("models-b")


def test_a_failed_upload_says_where_the_results_still_are(s3fs_client, tmp_path):
    out = _results(tmp_path)
    with pytest.raises(UploadError, match=r"bucket no-such-bucket of spec.output.uri s3://no-such-bucket/x does not exist "
                                          r"\(the trainer does not create buckets\); the results are still in"):
        upload_results(SimpleNamespace(uri="s3://no-such-bucket/x", upload_checkpoints=False), str(out), "bbc")
    assert "no-such-bucket" not in s3fs_client.ls("")


@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator in this process on a free port: the JSON API gcsfs speaks, in memory."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    # What output.credentialsSecret would hold for an emulator (envFrom): its address, no credentials (the emulator
    # checks none; with a real bucket the Secret names GOOGLE_APPLICATION_CREDENTIALS instead), and gcsfs's JSON-API
    # filesystem, since the emulator speaks no gRPC (see upload.py).
    yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    server.stop()


@pytest.fixture
def gcsfs_client(gcs, monkeypatch):
    import fsspec
    import gcsfs.core

    for k, v in gcs.items():
        monkeypatch.setenv(k, v)
    # Never Google's servers: no metadata-server probe, no default credentials from this machine.
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is read when gcsfs is first imported, which another test may have done: the
    # JSON-API class is what fsspec resolves gs:// to here, as in a trainer started with that variable.
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, protocol, gcsfs.core.GCSFileSystem)
        monkeypatch.setitem(fsspec.config.conf, protocol, {})  # FSSPEC_GS_* as read at upload, undone afterwards
    return gcsfs.core.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)


def test_gs_uploads_through_gcsfs(gcsfs_client, tmp_path):
    gcsfs_client.mkdir("gs-models")
    out = _results(tmp_path)
    done = upload_results(SimpleNamespace(uri="gs://gs-models/team/bbc", upload_checkpoints=True), str(out), "bbc")
    assert done == ["gs://gs-models/team/bbc/best", "gs://gs-models/team/bbc/result.json",
                    "gs://gs-models/team/bbc/checkpoints"]
    gcsfs_client.invalidate_cache()
    assert sorted(gcsfs_client.find("gs-models")) == [
        "gs-models/team/bbc/best/adapter/adapter_config.json", "gs-models/team/bbc/best/model.safetensors",
        "gs-models/team/bbc/checkpoints/epoch-1/trainer_state.json", "gs-models/team/bbc/result.json"]
    assert gcsfs_client.cat("gs-models/team/bbc/best/model.safetensors") == b"\0" * 4096
    assert json.loads(gcsfs_client.cat("gs-models/team/bbc/result.json")) == {"outcome": "completed"}
    import fsspec

    # The Secret's FSSPEC_GS_TOKEN arrived after fsspec was imported (as in a process that imported it early):
    # the upload read it anyway.
    assert fsspec.config.conf["gs"]["token"] == "anon"


def test_gs_without_its_bucket_is_refused_not_created(gcsfs_client, tmp_path):
    with pytest.raises(UploadError, match=r"bucket no-such-gs-bucket of spec.output.uri gs://no-such-gs-bucket/x does "
                                          r"not exist"):
        upload_results(SimpleNamespace(uri="gs://no-such-gs-bucket/x", upload_checkpoints=False),
                       str(_results(tmp_path)), "bbc")
    gcsfs_client.invalidate_cache()
    assert "no-such-gs-bucket" not in [b.rstrip("/") for b in gcsfs_client.ls("")]


def test_an_object_store_without_its_fsspec_backend_is_a_clear_error(tmp_path, monkeypatch):
    # gcsfs is an optional extra of the trainer image (`gcs`): without it, gs:// says which package is missing.
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
    with pytest.raises(UploadError, match="gs:// gcsfs"):
        upload_results(SimpleNamespace(uri="gs://bucket/x", upload_checkpoints=False), str(_results(tmp_path)), "bbc")


def test_no_uri_uploads_nothing(tmp_path):
    assert upload_results(SimpleNamespace(uri=None), str(tmp_path)) == []


@pytest.mark.slow
def test_the_trainer_uploads_at_the_end_of_training(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("trained")
    manifest = make_manifest(build_tiny_bert(tmp_path / "model"), write_tiny_data(tmp_path / "train.jsonl"),
                             name="upload", hyperparameters={"epochs": 1},
                             output={"ephemeral": True, "uri": "s3://trained/upload", "credentialsSecret": "s3-creds",
                                     "uploadCheckpoints": True})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(validate_manifest(manifest).trainer_config()))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update({**s3, "FINETUNE_CONFIG": str(config), "FINETUNE_OUTPUT_DIR": str(tmp_path / "out"), "FINETUNE_STATUS": "off"})
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = set(s3fs_client.find("trained"))
    assert {"trained/upload/result.json", "trained/upload/best/config.json"} <= stored
    assert any(p.startswith("trained/upload/best/model") for p in stored)
    assert any(p.startswith("trained/upload/checkpoints/") for p in stored)
    local = json.loads((tmp_path / "out" / "result.json").read_text())
    assert json.loads(s3fs_client.cat("trained/upload/result.json")) == local and local["outcome"] == "completed"
