"""Every source kind of dataset.source, read through Hugging Face `datasets` offline (issue 13): a parquet file, a
`save_to_disk` directory, a dataset laid out as a hub repository and read through the hub code path
(`snapshot_download` from the HF cache with HF_HUB_OFFLINE=1), an S3 bucket on moto's server with credentials from
a Secret applied to the trainer's environment as the kubelet applies the pod's envFrom, and the text-folders
layout; column mapping, test splits, and the tokenised cache that a second run reads instead of tokenising."""

from __future__ import annotations

import json
import os
import socket

import pytest
from tiny_models import texts

from finetune_contract.spec import FineTuneJobSpec
from finetune_operator.api import validate_manifest
from finetune_trainer import data as d

SHA = "0123456789abcdef0123456789abcdef01234567"


def _spec(source: str, **dataset) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": {"name": "m"}, "dataset": {"source": source, **dataset},
                                           "hyperparameters": {"seed": 3}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _table(n: int, seed: int, text: str = "text", label: str = "label"):
    import pyarrow as pa

    rows = texts(n, seed)
    return pa.table({text: [r["text"] for r in rows], label: [r["label"] for r in rows], "id": list(range(n))})


def test_parquet_with_column_mapping_and_a_test_fraction(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    pq.write_table(_table(60, 1, text="body", label="topic"), tmp_path / "news.parquet")
    spec = _spec(str(tmp_path / "news.parquet"), textField="body", labelField="topic", testFraction=0.2,
                 validationFraction=0.1)
    got = d.prepare(spec, tokenizer, pvc_mount=None, cache_dir=str(tmp_path / "cache"))
    assert (len(got.train), len(got.validation), len(got.test)) == (42, 6, 12)
    assert got.labels == ["money", "sport", "tech"] and not got.cached
    row = got.train[0]
    assert set(row) == {"input_ids", "labels"} and row["input_ids"][0] == tokenizer.cls_token_id
    # The three splits are disjoint: nothing the model is tested on is trained on or picks the best epoch.
    split = d.load_splits(spec, cache_dir=str(tmp_path / "cache"))
    ids = [set(part["text"]) for part in (split.train, split.validation, split.test)]
    assert not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_a_missing_column_names_the_field(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    pq.write_table(_table(10, 1), tmp_path / "x.parquet")
    with pytest.raises(d.DataError, match=r"no column 'body' \(dataset.textField\); its columns: \['id', 'label', 'text'\]"):
        d.prepare(_spec(str(tmp_path / "x.parquet"), textField="body"), tokenizer, pvc_mount=None,
                  cache_dir=str(tmp_path / "cache"))


def test_save_to_disk_dataset_dict_with_a_test_split(tmp_path, tokenizer):
    from datasets import ClassLabel, Dataset, DatasetDict

    def part(n, seed):
        ds = Dataset.from_dict({"text": [r["text"] for r in texts(n, seed)], "label": [r["label"] for r in texts(n, seed)]})
        return ds.cast_column("label", ClassLabel(names=["money", "sport", "tech"]))  # ids on disk, names in the job

    DatasetDict({"train": part(30, 1), "validation": part(9, 2), "test": part(12, 3)}).save_to_disk(str(tmp_path / "saved"))
    spec = _spec(str(tmp_path / "saved"), validationSource=str(tmp_path / "saved"), testSource=str(tmp_path / "saved"))
    got = d.prepare(spec, tokenizer, pvc_mount=None, cache_dir=str(tmp_path / "cache"))
    assert (len(got.train), len(got.validation), len(got.test)) == (30, 9, 12)
    assert got.labels == ["money", "sport", "tech"]
    with pytest.raises(d.DataError, match=r"has no split 'dev' \(splits: \['test', 'train', 'validation'\]\); set dataset.split"):
        d.load_splits(_spec(str(tmp_path / "saved"), split="dev"), cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """`acme/news` laid out in the HF hub cache exactly as `snapshot_download` leaves it, offline."""
    import pyarrow.parquet as pq

    repo = tmp_path / "hub" / "datasets--acme--news"
    snap = repo / "snapshots" / SHA / "data"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    pq.write_table(_table(40, 1), snap / "train-00000-of-00001.parquet")
    pq.write_table(_table(10, 2), snap / "test-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_dataset_by_id_revision_and_split(hub_cache, tokenizer):
    spec = _spec("acme/news", revision=SHA, testSource="acme/news")
    got = d.prepare(spec, tokenizer, pvc_mount=None, cache_dir=str(hub_cache / "cache"))
    assert (len(got.train), len(got.validation), len(got.test)) == (36, 4, 10)
    assert d.load_splits(_spec("acme/news"), cache_dir=str(hub_cache / "cache")).identity[0][2] == SHA  # main -> the commit
    with pytest.raises(d.DataError, match="not in the HF cache and the hub cannot be reached"):
        d.load_splits(_spec("acme/news", revision="v2"), cache_dir=str(hub_cache / "cache"))


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _kubelet_env(pod: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The trainer container's environment from its envFrom secretRefs, as the kubelet materialises it."""
    container = pod["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(secrets[source["secretRef"]["name"]])
    return env


def test_s3_object_with_credentials_from_the_referenced_secret(s3_server, tmp_path, tokenizer, monkeypatch):
    import boto3
    import pyarrow.parquet as pq

    from finetune_operator.plan import children
    from finetune_operator.settings import Settings

    secret = {"AWS_ACCESS_KEY_ID": "data-key", "AWS_SECRET_ACCESS_KEY": "data-secret", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": s3_server}
    client = boto3.client("s3", aws_access_key_id="data-key", aws_secret_access_key="data-secret",
                          region_name="us-east-1", endpoint_url=s3_server)
    client.create_bucket(Bucket="corpora")
    pq.write_table(_table(50, 4), tmp_path / "news.parquet")
    client.upload_file(str(tmp_path / "news.parquet"), "corpora", "bbc/news.parquet")
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "s3-data"},
                "spec": {"model": {"name": "m"}, "dataset": {"source": "s3://corpora/bbc/news.parquet",
                                                             "credentialsSecret": "corpora-creds", "testFraction": 0.2}}}
    job = validate_manifest(manifest)
    env = _kubelet_env(children.pod_template(job, Settings()), {"corpora-creds": secret})
    assert env == secret  # the Secret reaches the trainer only through the pod's envFrom, never the spec
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = d.prepare(job.spec, tokenizer, pvc_mount=None, cache_dir=str(tmp_path / "cache"))
    assert (len(got.train), len(got.validation), len(got.test)) == (35, 5, 10)
    missing = job.spec.model_copy(update={"dataset": job.spec.dataset.model_copy(update={"source": "s3://corpora/none.parquet"})})
    with pytest.raises(d.DataError, match="does not exist .or the credentials in dataset.credentialsSecret"):
        d.load_splits(missing, cache_dir=str(tmp_path / "cache"))


def test_text_folders_layout_still_reads(tmp_path, tokenizer):
    for i, row in enumerate(texts(12, 5)):
        folder = tmp_path / "news" / row["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.txt").write_text(row["text"] + "\n")
    got = d.prepare(_spec(str(tmp_path / "news"), validationFraction=0.25), tokenizer, pvc_mount=None,
                    cache_dir=str(tmp_path / "cache"))
    assert (len(got.train), len(got.validation), got.test) == (9, 3, None) and got.labels == ["money", "sport", "tech"]


def test_the_second_run_reads_the_tokenised_cache(tmp_path, tokenizer, monkeypatch, tiny_data):
    spec = _spec(tiny_data, testFraction=0.1)
    cache = str(tmp_path / "cache")
    first = d.prepare(spec, tokenizer, pvc_mount=None, cache_dir=cache)
    assert not first.cached

    def must_not_run(batch, ctx):
        raise AssertionError("tokenised again although the cache holds this split")

    monkeypatch.setitem(d.TOKENIZERS, "sequence-classification", must_not_run)
    second = d.prepare(spec, tokenizer, pvc_mount=None, cache_dir=cache)
    assert second.cached and second.train[:] == first.train[:] and second.test[:] == first.test[:]
    # Another maxLength is other data: tokenised afresh (here: by the function that refuses).
    with pytest.raises(AssertionError, match="tokenised again"):
        d.prepare(_spec(tiny_data, testFraction=0.1, maxLength=16), tokenizer, pvc_mount=None, cache_dir=cache)


def test_tokenising_uses_the_pods_cpus_only_for_large_splits():
    assert d.tokenize_processes(1_000, cpus=8) is None
    assert d.tokenize_processes(12_000, cpus=8) == 2
    assert d.tokenize_processes(1_000_000, cpus=8) == 8
    assert d.tokenize_processes(1_000_000, cpus=1) is None


def test_json_object_with_a_data_list(tmp_path, tokenizer):
    (tmp_path / "rows.json").write_text(json.dumps({"data": texts(20, 1)}))
    got = d.load_splits(_spec(str(tmp_path / "rows.json")), cache_dir=str(tmp_path / "cache"))
    assert len(got.train) + len(got.validation) == 20 and os.path.isdir(tmp_path / "cache")
