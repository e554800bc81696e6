"""`run(manifest)` for tests and benchmarks: resolve a FineTuneJob the way the operator does, then train the
resolved config in this process (finetune_trainer.local_run). The trainer itself never imports the operator."""

from __future__ import annotations

import os
from typing import Any

import yaml

from finetune_operator.api import validate_manifest
from finetune_trainer import local_run


def trainer_config(manifest: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        with open(manifest, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if len(docs) != 1:
            raise ValueError(f"{manifest}: expected one FineTuneJob document, found {len(docs)}")
        manifest = docs[0]
    if manifest.get("kind") == "TrainerConfig":
        return manifest
    return validate_manifest(manifest).trainer_config()


def run(manifest: dict[str, Any] | str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    return local_run.run(trainer_config(manifest), **kwargs)
