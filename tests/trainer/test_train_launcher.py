"""The container entry point (`finetune-trainer`) as a pod runs it, and its refusal of a wrong world."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_train import run

pytestmark = pytest.mark.slow


def test_entry_point_runs_one_process_without_rendezvous_variables(manifest, tmp_path):
    from finetune_operator.api import validate_manifest

    config = tmp_path / "config.json"
    m = manifest(hyperparameters={"epochs": 1})
    config.write_text(json.dumps(validate_manifest(m).trainer_config()))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update({"FINETUNE_CONFIG": str(config), "FINETUNE_OUTPUT_DIR": str(tmp_path / "out"), "FINETUNE_STATUS": "off"})
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["outcome"] == "completed"


def test_workers_refuse_a_world_other_than_the_job_asks_for(manifest, tmp_path, capfd):
    # Two processes start, but the job (as the pod's environment says) asked for three.
    with pytest.raises(RuntimeError, match="torchrun exited"):  # torchrun reports 1 when a worker exits 2
        run(manifest(), output_dir=str(tmp_path), processes=2, progress=False, env={"FINETUNE_WORLD_SIZE": "3"})
    err = capfd.readouterr().err
    assert "refusing to train a different configuration" in err and "the job asks for 3" in err
    assert not os.path.exists(tmp_path / "result.json")
