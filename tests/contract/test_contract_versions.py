"""The versioned contract between operator and trainer: a newer operator's config trains (its unknown fields
dropped with one warning line), an incompatible one is refused with both versions named, and the API
validation the operator and the CRD use stays strict."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from trainer.tiny_models import build_tiny_bert, make_manifest, write_tiny_data

from finetune_contract.config import (
    EXIT_INCOMPATIBLE_CONFIG,
    SCHEMA_VERSION,
    IncompatibleConfig,
    check_compatible,
    read_trainer_config,
)
from finetune_contract.spec import FineTuneJobSpec
from finetune_operator.api import InvalidFineTuneJob, validate_manifest

ROOT = Path(__file__).resolve().parents[2]
MAJOR, MINOR = (int(x) for x in SCHEMA_VERSION.split("."))
NEWER = f"{MAJOR}.{MINOR + 7}"


def base_manifest() -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "skew"},
            "spec": {"model": {"name": "m"}, "dataset": {"source": "d"},
                     "tolerations": [{"key": "gpu", "operator": "Exists"}]}}


def from_newer_operator(config: dict) -> dict:
    """What an operator of a newer minor writes: new fields at the top, in a nested object, inside a list."""
    newer = copy.deepcopy(config)
    newer["schemaVersion"] = NEWER
    newer["traceContext"] = {"id": "abc"}
    newer["spec"]["hyperparameters"]["lookaheadSteps"] = 5
    newer["spec"].setdefault("output", {})["compression"] = "zstd"
    newer["spec"]["tolerations"][0]["priority"] = 1
    return newer


def test_the_operator_writes_the_contract_version():
    config = validate_manifest(base_manifest()).trainer_config()
    assert config["schemaVersion"] == SCHEMA_VERSION and config["kind"] == "TrainerConfig"
    read = read_trainer_config(json.loads(json.dumps(config)))
    assert read.ignored == () and read.warning() is None
    assert read.config.spec == validate_manifest(base_manifest()).spec


def test_fields_left_at_their_default_are_not_written():
    # An older trainer (0.1.0 validates strictly) then sees none of the fields this release added unless a job sets them.
    config = validate_manifest(base_manifest()).trainer_config()
    assert "terminationGracePeriodSeconds" not in config["spec"] and "output" not in config["spec"]
    assert config["spec"]["hyperparameters"]["learningRate"] == pytest.approx(5e-5)  # resolved values are all there
    m = base_manifest()
    m["spec"]["output"] = {"retain": False}
    assert validate_manifest(m).trainer_config()["spec"]["output"] == {"retain": False}


def test_a_newer_minor_is_read_and_its_unknown_fields_listed_once():
    newer = from_newer_operator(validate_manifest(base_manifest()).trainer_config())
    read = read_trainer_config(newer)
    assert set(read.ignored) == {"traceContext", "spec.hyperparameters.lookaheadSteps", "spec.output.compression",
                                 "spec.tolerations[0].priority"}
    warning = read.warning()
    assert "\n" not in warning and NEWER in warning and SCHEMA_VERSION in warning
    for path in read.ignored:
        assert path in warning
    assert read.config.spec.hyperparameters.learning_rate == pytest.approx(5e-5)  # known fields kept


def test_a_config_without_a_version_is_the_unversioned_1_0():
    config = validate_manifest(base_manifest()).trainer_config()
    del config["schemaVersion"]
    assert read_trainer_config(config).version == "1.0"


@pytest.mark.parametrize("version", [f"{MAJOR + 1}.0", f"{MAJOR - 1}.9", "1", "latest"])
def test_an_incompatible_version_is_refused_naming_both(version):
    config = validate_manifest(base_manifest()).trainer_config()
    config["schemaVersion"] = version
    with pytest.raises(IncompatibleConfig) as err:
        read_trainer_config(config)
    assert version in str(err.value) and SCHEMA_VERSION in str(err.value)


def test_an_older_minor_the_trainer_no_longer_reads_is_refused():
    check_compatible("1.3", reader="1.5", oldest_minor=3)  # still readable
    with pytest.raises(IncompatibleConfig, match=r"1\.2 is older than this trainer \(schema 1\.5\) can read \(oldest 1\.3\)"):
        check_compatible("1.2", reader="1.5", oldest_minor=3)


def test_the_api_validation_stays_strict():
    # Dropping unknown fields is the trainer's reading of a newer config, not a looser API.
    spec = validate_manifest(base_manifest()).trainer_config()["spec"]
    spec["hyperparameters"]["lookaheadSteps"] = 5
    with pytest.raises(ValidationError, match="lookaheadSteps"):
        FineTuneJobSpec.model_validate(spec)
    bad = base_manifest()
    bad["spec"]["output"] = {"compression": "zstd"}
    with pytest.raises(InvalidFineTuneJob, match="spec.output.compression: unknown field"):
        validate_manifest(bad)


def _trainer(config: dict, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update({"FINETUNE_CONFIG": str(path), "FINETUNE_OUTPUT_DIR": str(tmp_path / "out"), "FINETUNE_STATUS": "off"})
    return subprocess.run([sys.executable, "-m", "finetune_trainer"], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_the_trainer_refuses_an_incompatible_config_before_importing_torch(tmp_path):
    config = validate_manifest(base_manifest()).trainer_config()
    config["schemaVersion"] = f"{MAJOR + 1}.0"
    proc = _trainer(config, tmp_path, timeout=60)
    assert proc.returncode == EXIT_INCOMPATIBLE_CONFIG, proc.stderr[-2000:]
    message = json.loads(proc.stderr.strip().splitlines()[-1])["message"]
    assert f"schemaVersion {MAJOR + 1}.0 is incompatible" in message and f"reads schema {SCHEMA_VERSION}" in message
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.slow
def test_a_config_from_a_newer_operator_trains_with_one_warning(tmp_path):
    manifest = make_manifest(build_tiny_bert(tmp_path / "model"), write_tiny_data(tmp_path / "train.jsonl"),
                             name="skew", hyperparameters={"epochs": 1})
    manifest["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    newer = from_newer_operator(validate_manifest(manifest).trainer_config())
    proc = _trainer(newer, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["outcome"] == "completed"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "does not know" in line]
    assert len(lines) == 1, lines
    assert "spec.hyperparameters.lookaheadSteps" in lines[0] and "spec.tolerations[0].priority" in lines[0]
