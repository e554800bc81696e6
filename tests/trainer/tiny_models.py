"""Tiny offline models and data for trainer tests (plain functions, so e2e tests can build them too).

A 2-layer, 32-wide BERT and GPT-2 with a word-level tokenizer, labelled texts on three topics, and a
FineTuneJob manifest builder. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

TOPICS = {
    "sport": ["goal", "match", "team", "score", "coach", "league", "player", "win"],
    "tech": ["chip", "software", "code", "robot", "data", "network", "cloud", "phone"],
    "money": ["bank", "market", "price", "stock", "trade", "profit", "tax", "loan"],
}
COMMON = ["the", "a", "of", "and", "to", "in", "is", "was", "on", "for", "with", "new", "today", "report"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def texts(n: int, seed: int, signal: float = 0.4) -> list[dict[str, str]]:
    """`n` labelled texts; each word is one of its topic's words with probability `signal` (0.4: a task a tiny
    model learns in a few epochs but not in one)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[label]) if rng.random() < signal else rng.choice(COMMON) for _ in range(rng.randint(6, 14))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def build_tiny_bert(root: Path) -> str:
    """A 2-layer, 32-wide BERT base model (no task head) with a word-level tokenizer, in root/model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = SPECIAL + COMMON + [w for ws in TOPICS.values() for w in ws]
    # transformers 5 ignores `vocab_file=` here (every word became [UNK]): pass the vocabulary itself.
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert len(tokenizer) == len(vocab) and tokenizer.unk_token_id not in tokenizer("the goal")["input_ids"]
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    model_dir = Path(root) / "model"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def build_tiny_gpt2(root: Path, tokenizer_dir: str) -> str:
    """A 2-layer, 32-wide GPT-2 (causal LM head, tied embeddings) with the tiny BERT's word-level tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_dir = Path(root) / "model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def write_tiny_data(path: Path, n: int = 96, seed: int = 1, signal: float = 0.4) -> str:
    with open(path, "w") as f:
        for row in texts(n, seed=seed, signal=signal):
            f.write(json.dumps(row) + "\n")
    return str(path)


def make_manifest(model_dir: str, data: str, name: str = "tiny", **spec_overrides: Any) -> dict[str, Any]:
    """A FineTuneJob on the tiny model; `hyperparameters=...` etc. are merged into the spec."""
    spec: dict[str, Any] = {
        "model": {"name": model_dir},
        "dataset": {"source": data, "maxLength": 32, "validationFraction": 0.25},
        "preset": "fast",
        "hyperparameters": {"epochs": 2, "batchSize": 8, "learningRate": 1e-3, "mixedPrecision": "no"},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **copy.deepcopy(value)}
        else:
            spec[key] = copy.deepcopy(value)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def load_weights(output_dir: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "best", "model.safetensors"))


# --- a tiny chat model (issue 13: SFT formats) -------------------------------------------------------------

CHAT_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TURN = "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
# Two renderings of one format: with `{% generation %}` blocks (transformers' assistant mask) and without
# (the trainer finds the assistant's tokens by rendering prefixes). The generation block ends before the
# separating space: a block ending in whitespace makes transformers mark every later token as the assistant's.
CHAT_TEMPLATES = {
    "generation-tags": "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m['content'] }} <|end|>{% endgeneration %} {% else %}" + CHAT_TURN + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}",
    "plain": "{% for m in messages %}" + CHAT_TURN + "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}",
}
CHAT_FACTS = [("what is the capital of france", "paris"), ("what is the capital of italy", "rome"),
              ("what is the capital of spain", "madrid"), ("what is the capital of japan", "tokyo"),
              ("two plus two", "four"), ("two plus three", "five"), ("three plus three", "six"),
              ("say hello", "hello"), ("what colour is the sky", "blue"), ("what colour is grass", "green")]


def chat_vocab() -> list[str]:
    words = sorted({w for q, a in CHAT_FACTS for w in (q + " " + a).split()} | {"you", "are", "helpful", "answer", "briefly"})
    return CHAT_SPECIAL + words


def build_tiny_chat_llama(root: Path, template: str = "generation-tags", vocab_size: int | None = None) -> str:
    """A 2-layer, 32-wide Llama with a whitespace word-level tokenizer whose chat template is CHAT_TEMPLATES[template]."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = chat_vocab()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=CHAT_SPECIAL[4:])
    tokenizer.chat_template = CHAT_TEMPLATES[template]
    config = LlamaConfig(vocab_size=vocab_size or len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir = Path(root) / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def chat_rows(n: int, seed: int, system: bool = True) -> list[dict[str, Any]]:
    """Conversations of one or two question/answer turns drawn from CHAT_FACTS."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs: list[dict[str, str]] = [{"role": "system", "content": "you are helpful answer briefly"}] if system else []
        for q, a in rng.sample(CHAT_FACTS, rng.randint(1, 2)):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def trainer_env(manifest: dict[str, Any], out: Path, job: str, **extra: str) -> dict[str, str]:
    """The environment of a trainer process run outside a pod on `out` (what the pod's env would give it):
    config.json written there from the manifest, no status API, every optimizer step appended to out/steps.log,
    one OpenMP thread; `extra` adds or overrides variables. Launcher variables inherited from a parent run
    are dropped."""
    from finetune_operator.api import validate_manifest

    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    config.write_text(json.dumps(validate_manifest(manifest).trainer_config()))
    env = {
        **os.environ, "FINETUNE_CONFIG": str(config), "FINETUNE_OUTPUT_DIR": str(out), "FINETUNE_JOB_NAME": job,
        "FINETUNE_STATUS": "off", "FINETUNE_METRICS_LINGER_SECONDS": "0", "FINETUNE_STEP_LOG": str(out / "steps.log"),
        "OMP_NUM_THREADS": "1",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FINETUNE_METRICS_PORT", "FINETUNE_WORLD_SIZE"):
        env.pop(key, None)
    return {**env, **extra}

