"""Issue 13, part 4: models as they are published, offline.

A hub id with a pinned revision loads from a Hugging Face cache laid out as the hub leaves it (HF_HOME on the
shared cache claim) without writing a file (the second job of a base model downloads nothing); trustRemoteCode
is off unless asked; 4-bit/8-bit loading is refused on CPU and without bitsandbytes with messages that say
what to change, and builds QLoRA's BitsAndBytesConfig where it can run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_chat_llama

from finetune_contract.spec import FineTuneJobSpec
from finetune_trainer import models

REPO = "acme/tiny-chat"
COMMITS = {"main": "1" * 40, "older": "2" * 40}


def _spec(**model) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": {"name": REPO, **model}, "task": "causal-lm",
                                           "dataset": {"source": "/data/x.jsonl"}})


def hub_cache(root: Path, model_dir: str) -> Path:
    """HF_HOME as the hub leaves it after downloading REPO at two commits: blobs, snapshots, refs/main."""
    import torch
    from safetensors.torch import load_file, save_file

    repo = root / "hub" / ("models--" + REPO.replace("/", "--"))
    for name, commit in COMMITS.items():
        snap = repo / "snapshots" / commit
        shutil.copytree(model_dir, snap)
        if name == "older":  # other weights at the older commit, so the revision is seen in what loads
            weights = load_file(snap / "model.safetensors")
            save_file({k: torch.zeros_like(v) for k, v in weights.items()}, snap / "model.safetensors", metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMITS["main"])
    return root


LOAD = """
import json, sys
from finetune_contract.spec import FineTuneJobSpec
from finetune_trainer.models import load_model, load_tokenizer
sums = []
for raw in json.loads(sys.argv[1]):
    spec = FineTuneJobSpec.model_validate(raw)
    tok, source = load_tokenizer(spec)
    model = load_model(spec, [], tok, source).model
    sums.append(float(sum(p.detach().abs().sum() for p in model.parameters())))
print(json.dumps(sums))
"""


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _load_as_pods(home: Path, *specs: FineTuneJobSpec) -> list[float]:
    """What trainer pods do with HF_HOME on the cache claim and no network (in another process: huggingface_hub
    reads HF_HOME when it is imported); one load per spec, in order, as successive jobs would."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    raw = [spec.model_dump(by_alias=True, mode="json") for spec in specs]
    out = subprocess.run([sys.executable, "-c", LOAD, json.dumps(raw)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_id_and_revision_load_from_the_shared_cache_without_writing(tmp_path):
    home = hub_cache(tmp_path / "cache", build_tiny_chat_llama(tmp_path / "src"))
    before = _files(home)
    main, pinned, older = _load_as_pods(home, _spec(), _spec(revision=COMMITS["main"]), _spec(revision=COMMITS["older"]))
    assert _files(home) == before  # nothing downloaded, nothing written: the cache served both jobs
    assert main == pinned and main > 0
    # The older commit holds other weights (all zeros): the pinned revision is what loaded.
    assert older < 0.5 * main


def test_trust_remote_code_only_when_asked(tmp_path):
    """A model whose config names its own code (auto_map) loads only with trustRemoteCode: true."""
    from transformers import AutoTokenizer

    src = Path(build_tiny_chat_llama(tmp_path / "src"))
    (src / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny-remote'\n")
    (src / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="tiny-remote", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    spec = FineTuneJobSpec.model_validate({"model": {"name": str(src)}, "task": "causal-lm", "dataset": {"source": "/d.jsonl"}})
    assert spec.model.trust_remote_code is False and models.hub_kwargs(spec)["trust_remote_code"] is False
    tok = AutoTokenizer.from_pretrained(src)
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load_model(spec, [], tok, str(src))
    trusted = spec.model_copy(update={"model": spec.model.model_copy(update={"trust_remote_code": True})})
    loaded = models.load_model(trusted, [], tok, str(src))
    assert type(loaded.model).__name__ == "TinyForCausalLM"


def _qlora_spec(quantization: str) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"name": REPO, "quantization": quantization}, "task": "causal-lm", "dataset": {"source": "/d.jsonl"},
        "lora": {"enabled": True}, "resources": {"gpu": True}})


def test_quantization_is_refused_on_cpu_and_without_bitsandbytes(monkeypatch):
    import importlib.util

    assert models.quantization_config(_spec()) is None  # quantization: none (the default)
    with pytest.raises(models.QuantizationUnavailable, match=r"needs a CUDA GPU .* set resources.gpu: true"):
        models.quantization_config(_qlora_spec("4bit"), cuda=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(models.QuantizationUnavailable, match="bitsandbytes package"):
        models.quantization_config(_qlora_spec("8bit"), cuda=True)
    # The trainer refuses before touching the weights: load_model on this CPU machine says why.
    with pytest.raises(models.QuantizationUnavailable, match="CUDA"):
        models.load_model(_qlora_spec("4bit"), [], None, "/nonexistent")


def test_quantization_builds_qloras_config_where_it_can_run(monkeypatch):
    """On a GPU with bitsandbytes: NF4 with double quantization and bf16 compute (QLoRA), or LLM.int8."""
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    four = models.quantization_config(_qlora_spec("4bit"), cuda=True)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant, four.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.bfloat16)
    eight = models.quantization_config(_qlora_spec("8bit"), cuda=True)
    assert eight.load_in_8bit and not eight.load_in_4bit
