"""Fixtures for trainer tests: the tiny models and data of tiny_models.py, built once per session."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_models import build_tiny_bert, build_tiny_gpt2, load_weights, make_manifest, write_tiny_data

__all__ = ["load_weights", "make_manifest"]  # the tests import these from here


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_model_dir) -> str:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data") / "train.jsonl")


@pytest.fixture
def manifest(tiny_model_dir, tiny_data):
    def build(**overrides: Any) -> dict[str, Any]:
        return make_manifest(tiny_model_dir, tiny_data, **overrides)

    return build


@pytest.fixture(autouse=True, scope="session")
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()  # per-split bars would bury a failure's output
