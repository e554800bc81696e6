import pytest

from finetune_operator.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(trainer_image="registry.example/finetune-trainer:1.0")
