"""Issue 13, part 2: causal-LM SFT formats on a tiny Llama with a chat template (built here, nothing downloaded).

Checked token by token: the loss mask covers exactly the assistant's tokens (both ways of finding them:
the template's `{% generation %}` blocks and prefix rendering), prompt-completion masks exactly the
completion, `completionOnlyLoss: false` trains every token; packed examples give exactly their unpacked
logits (no attention across examples); and training lowers the loss on the assistant's tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_manifest
from local_train import run
from tiny_models import build_tiny_chat_llama, chat_rows

from finetune_contract.spec import SftSpec
from finetune_trainer.data import Collator, Record
from finetune_trainer.sft import IGNORE_INDEX, SftFormatError, build_sft_dataset, pack, tokenize_batch
from finetune_trainer.steps import forward

CONVERSATION = [
    {"role": "system", "content": "you are helpful"},
    {"role": "user", "content": "what is the capital of france"},
    {"role": "assistant", "content": "paris"},
    {"role": "user", "content": "two plus two"},
    {"role": "assistant", "content": "four"},
]
# The same conversation written out in the template's tokens, with who wrote each one (1: the assistant).
EXPECTED = [
    ("<|system|>", 0), ("you", 0), ("are", 0), ("helpful", 0), ("<|end|>", 0),
    ("<|user|>", 0), ("what", 0), ("is", 0), ("the", 0), ("capital", 0), ("of", 0), ("france", 0), ("<|end|>", 0),
    ("<|assistant|>", 0), ("paris", 1), ("<|end|>", 1),
    ("<|user|>", 0), ("two", 0), ("plus", 0), ("two", 0), ("<|end|>", 0),
    ("<|assistant|>", 0), ("four", 1), ("<|end|>", 1),
]


@pytest.fixture(scope="module", params=["generation-tags", "plain"])
def chat_model(request, tmp_path_factory) -> str:
    return build_tiny_chat_llama(tmp_path_factory.mktemp(f"chat-{request.param}"), request.param)


@pytest.fixture(scope="module")
def tagged_model(tmp_path_factory) -> str:
    return build_tiny_chat_llama(tmp_path_factory.mktemp("chat-tagged"), "generation-tags")


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _one(tokenizer, row, **sft) -> tuple[list[str], list[int]]:
    out = tokenize_batch({k: [v] for k, v in row.items()}, tokenizer=tokenizer, sft=SftSpec(**sft), max_length=64)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    return tokenizer.convert_ids_to_tokens(ids), [int(lab != IGNORE_INDEX) for lab in labels]


def test_loss_mask_is_exactly_the_assistant_tokens(chat_model):
    tokens, mask = _one(_tokenizer(chat_model), {"messages": CONVERSATION})
    assert list(zip(tokens, mask, strict=True)) == EXPECTED


def test_train_on_everything_switch(chat_model):
    tokens, mask = _one(_tokenizer(chat_model), {"messages": CONVERSATION}, completion_only_loss=False)
    assert tokens == [t for t, _ in EXPECTED] and mask == [1] * len(EXPECTED)


def test_prompt_completion_masks_exactly_the_completion(tagged_model):
    tok = _tokenizer(tagged_model)
    tokens, mask = _one(tok, {"prompt": "what is the capital of italy", "completion": "rome"})
    # The prompt is tokenised with the tokenizer's special tokens (none for this one), the completion gets </s>.
    assert list(zip(tokens, mask, strict=True)) == [("what", 0), ("is", 0), ("the", 0), ("capital", 0), ("of", 0),
                                                    ("italy", 0), ("rome", 1), ("</s>", 1)]
    # Conversational prompt/completion: rendered with the chat template, the completion's turn is the target.
    tokens, mask = _one(tok, {"prompt": [{"role": "user", "content": "say hello"}],
                              "completion": [{"role": "assistant", "content": "hello"}]})
    assert list(zip(tokens, mask, strict=True)) == [("<|user|>", 0), ("say", 0), ("hello", 0), ("<|end|>", 0),
                                                    ("<|assistant|>", 0), ("hello", 1), ("<|end|>", 1)]


def test_format_auto_and_errors_name_the_field(tagged_model):
    tok = _tokenizer(tagged_model)
    _, mask = _one(tok, {"text": "what is the capital of spain madrid"})
    assert mask == [1] * 7  # format auto, no messages/prompt columns: text, every token
    with pytest.raises(SftFormatError, match="sft.messagesField"):
        tokenize_batch({"text": ["x"]}, tokenizer=tok, sft=SftSpec(format="messages"), max_length=64)
    with pytest.raises(SftFormatError, match="sft.completionField"):
        tokenize_batch({"prompt": ["x"]}, tokenizer=tok, sft=SftSpec(format="prompt-completion"), max_length=64)
    # A prompt longer than maxLength leaves nothing to learn: the row is left out, not trained at 0/0.
    out = tokenize_batch({"prompt": ["what is the capital of france"], "completion": ["paris"]}, tokenizer=tok,
                         sft=SftSpec(), max_length=4)
    assert out["input_ids"] == []


def test_template_without_generation_tags_that_rewrites_history_is_refused(tmp_path):
    tok = _tokenizer(build_tiny_chat_llama(tmp_path, "plain"))
    # A template that drops earlier assistant turns once a later one follows (as reasoning templates do):
    # the partial renderings are no prefix of the whole one, so the assistant's tokens cannot be found exactly.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|> "
                         "{{ m['content'] }} <|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    with pytest.raises(SftFormatError, match="generation"):
        tokenize_batch({"messages": [CONVERSATION]}, tokenizer=tok, sft=SftSpec(), max_length=64)


def test_pack_keeps_examples_whole_and_restarts_positions():
    packed = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[1, 2, 3], [-100, 5], [6, 7, -100, 9]], 6)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    # Each example's first label is dropped: unpacked, nothing predicts an example's first token either.
    assert packed["labels"] == [[-100, 2, 3, -100, 5], [-100, 7, -100, 9]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(tagged_model, attn):
    """Attention does not cross example boundaries: each packed example's logits are its logits alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tagged_model, attn_implementation=attn).eval()
    tok = _tokenizer(tagged_model)
    rows = chat_rows(6, seed=3)
    out = tokenize_batch({"messages": [r["messages"] for r in rows]}, tokenizer=tok, sft=SftSpec(), max_length=64)
    packed = pack(out["input_ids"], out["labels"], 64)
    assert any(len(set(p)) < len(p) for p in packed["position_ids"]), "the test needs rows holding several examples"
    collate = Collator(tok.pad_token_id, "causal-lm")
    batch = collate([{k: packed[k][i] for k in packed} for i in range(len(packed["input_ids"]))])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    hp = type("HP", (), {"loss": None, "label_smoothing": 0.0})()
    with torch.no_grad():
        _, logits = forward(model, batch, "causal-lm", hp, train=False)
        row, start = 0, 0
        for ids in out["input_ids"]:
            if start + len(ids) > len(packed["input_ids"][row]):
                row, start = row + 1, 0
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[row, start:start + len(ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(ids)
        # Without the restarting position ids the same rows give other logits (the check can fail).
        crossed = model(input_ids=batch["input_ids"]).logits
        assert not torch.allclose(crossed, logits, atol=1e-3)


def _assistant_loss(model_dir: str, rows: list[dict]) -> float:
    """Mean next-token loss on the assistant's tokens only (labels -100 elsewhere)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = _tokenizer(model_dir)
    out = tokenize_batch({"messages": [r["messages"] for r in rows]}, tokenizer=tok, sft=SftSpec(), max_length=64)
    batch = Collator(tok.pad_token_id, "causal-lm")([{"input_ids": i, "labels": lab} for i, lab in
                                                     zip(out["input_ids"], out["labels"], strict=True)])
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss)


@pytest.mark.parametrize("packing", [False, True])
def test_chat_sft_lowers_the_assistant_token_loss(tagged_model, tmp_path, packing):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(96, seed=1)))
    held_out = chat_rows(24, seed=2)
    m = make_manifest(tagged_model, str(data), task="causal-lm", sft={"packing": packing},
                      dataset={"source": str(data), "maxLength": 64, "validationFraction": 0.25},
                      hyperparameters={"epochs": 3, "batchSize": 8, "learningRate": 1e-2, "mixedPrecision": "no",
                                       "dropout": 0.0, "scheduler": {"name": "constant", "warmupSteps": 0}})
    result = run(m, output_dir=str(tmp_path / "out"), progress=False)
    assert result["outcome"] == "completed"
    before, after = _assistant_loss(tagged_model, held_out), _assistant_loss(str(tmp_path / "out" / "best"), held_out)
    # Answers are a function of the question: the assistant-token loss falls well below the untrained one (~ln 47).
    assert after < 0.5 * before, (before, after)
    first, last = result["history"][0], result["history"][-1]
    assert last["valLoss"] < first["valLoss"]


def test_packing_makes_fewer_training_rows(tagged_model):
    tok = _tokenizer(tagged_model)
    records = [Record("", row=r) for r in chat_rows(40, seed=5)]
    spec = make_manifest(tagged_model, "unused", task="causal-lm", sft={"packing": True})["spec"]
    from finetune_contract.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate({**spec, "dataset": {**spec["dataset"], "maxLength": 64}})
    packed = build_sft_dataset(records, tok, spec, train=True)
    plain = build_sft_dataset(records, tok, spec, train=False)  # validation is never packed
    assert len(plain) == 40 and len(packed) < len(plain) / 2
    assert sum(len(x["input_ids"]) for x in packed.items) == sum(len(x["input_ids"]) for x in plain.items)


def test_the_datasets_map_interface_keeps_the_masks(tagged_model):
    """What data.py's tokenisation (datasets.map over Arrow tables) calls: chat messages survive the Arrow round
    trip, a renamed column is found, and packing inside the map keeps every token."""
    from datasets import Dataset

    from finetune_contract.spec import FineTuneJobSpec
    from finetune_trainer.sft import sft_columns, tokenize_mapped

    tok = _tokenizer(tagged_model)
    spec = FineTuneJobSpec.model_validate({"model": {"name": tagged_model}, "task": "causal-lm",
                                           "dataset": {"source": "/d.jsonl", "maxLength": 64},
                                           "sft": {"messagesField": "conversation", "packing": True}})
    rows = Dataset.from_list([{"conversation": CONVERSATION, "id": 1}, {"conversation": CONVERSATION[1:3], "id": 2}])
    wanted = sft_columns(spec, rows.column_names)
    assert wanted == {"messages": ("conversation", "sft.messagesField")}
    rows = rows.select_columns(["conversation"]).rename_columns({"conversation": "messages"})
    plain = rows.map(tokenize_mapped, batched=True, remove_columns=rows.column_names,
                     fn_kwargs={"tokenizer": tok, "spec": spec})
    assert [int(x != IGNORE_INDEX) for x in plain[0]["labels"]] == [m for _, m in EXPECTED]
    packed = rows.map(tokenize_mapped, batched=True, remove_columns=rows.column_names,
                      fn_kwargs={"tokenizer": tok, "spec": spec, "pack_rows": True})
    assert len(packed) == 1 and packed[0]["input_ids"] == plain[0]["input_ids"] + plain[1]["input_ids"]
    assert packed[0]["position_ids"] == list(range(len(plain[0]["input_ids"]))) + list(range(len(plain[1]["input_ids"])))
