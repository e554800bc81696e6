"""Supervised fine-tuning formats for causal-LM: token ids, per-token labels and packing.

Three row formats (spec.sft.format; `auto` picks from the row's fields, as TRL's SFTTrainer does):

- `text`: the whole text is the target (every token has a loss).
- `prompt-completion`: the prompt and the completion are tokenised separately and concatenated, so the
  boundary between them is exact whatever the tokenizer merges (TRL does the same); a prompt and a
  completion that are lists of messages are rendered with the chat template instead.
- `messages`: a conversation rendered with the model's own chat template. Which tokens the assistant
  wrote comes from the template's `{% generation %}` blocks (transformers' `return_assistant_tokens_mask`)
  when it has them, otherwise from rendering the conversation up to each assistant turn (with the
  generation prompt) and through it: the tokens in between are that turn's. Both are exact; the second
  checks that every partial rendering is a prefix of the whole one and refuses the row otherwise.

Labels are the token ids where the loss counts and -100 elsewhere: only completion/assistant tokens by
default (`completionOnlyLoss`), every token with `completionOnlyLoss: false`.

Packing concatenates whole examples up to `maxLength` with position ids restarting at 0 for each one and
no 2D attention mask: transformers then derives the per-example sequences from the position ids and builds
a block-diagonal causal mask for sdpa and eager attention (masking_utils.find_packed_sequence_indices), so
no token attends across an example boundary (tests/trainer/test_sft.py compares packed and unpacked logits).
The first token of every packed example gets no label: unpacked, nothing predicts it either.

Every function works on one batch of rows in the `datasets.map(batched=True)` shape (a dict of columns).
"""

from __future__ import annotations

import re
from typing import Any

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class SftFormatError(ValueError):
    """A row that the chosen SFT format cannot read; the message names the field and the fix."""


def detect_format(columns: list[str] | set[str], sft: Any) -> str:
    """The format `auto` stands for, from the dataset's columns."""
    declared = str(sft.format)
    if declared != "auto":
        return declared
    if sft.messages_field in columns:
        return "messages"
    if sft.prompt_field in columns and sft.completion_field in columns:
        return "prompt-completion"
    return "text"


def _require(row: dict[str, Any], field: str, fmt: str, spec_field: str) -> Any:
    if field not in row or row[field] is None:
        raise SftFormatError(f"sft.format {fmt}: a row has no field {field!r} (fields: {sorted(row)}); "
                             f"set sft.{spec_field} to the column that holds it")
    return row[field]


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def _check_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise SftFormatError("sft.format messages needs a tokenizer with a chat template (tokenizer_config.json "
                             "`chat_template`); this model has none: use a chat/instruct model, or sft.format "
                             "prompt-completion")
    return template if isinstance(template, str) else str(template)


def _messages(value: Any, fmt: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise SftFormatError(f"sft.format {fmt}: field {field!r} must hold a list of {{role, content}} messages")
    return value


def chat_ids_and_mask(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the model's chat template and a 0/1 mask of the assistant's tokens."""
    template = _check_template(tokenizer)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
    full = _template_ids(tokenizer, messages)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _template_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else \
            _template_ids(tokenizer, [], add_generation_prompt=True)
        through = _template_ids(tokenizer, messages[: i + 1])
        if through[: len(before)] != before or full[: len(through)] != through:
            raise SftFormatError(
                f"sft.format messages: the chat template renders message {i} (assistant) differently depending on "
                "what follows, so its tokens cannot be told apart exactly; use a template with {% generation %} "
                "blocks (tokenizer.chat_template) or sft.completionOnlyLoss: false")
        for j in range(len(before), len(through)):
            mask[j] = 1
    return full, mask


def _plain_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """The completion ends with the end-of-sequence token, so the model learns to stop (TRL appends it too)."""
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def example(row: dict[str, Any], fmt: str, tokenizer: Any, sft: Any, text_field: str = "text") -> tuple[list[int], list[int]]:
    """(input_ids, 0/1 completion mask) of one row; `text_field`: dataset.textField (format text)."""
    if fmt == "text":
        value = row.get(text_field)
        if value is None:
            raise SftFormatError(f"sft.format text: a row has no field {text_field!r} (fields: {sorted(row)}); set "
                                 "dataset.textField, or sft.format to the format of the rows")
        ids = _plain_ids(tokenizer, str(value), special=True)
        return ids, [1] * len(ids)
    if fmt == "prompt-completion":
        prompt = _require(row, sft.prompt_field, fmt, "promptField")
        completion = _require(row, sft.completion_field, fmt, "completionField")
        if isinstance(prompt, list):  # conversational: prompt and completion are lists of messages
            prompt_msgs = _messages(prompt, fmt, sft.prompt_field)
            full_msgs = prompt_msgs + _messages(completion, fmt, sft.completion_field)
            _check_template(tokenizer)
            before = _template_ids(tokenizer, prompt_msgs, add_generation_prompt=True)
            full = _template_ids(tokenizer, full_msgs)
            if full[: len(before)] != before:
                raise SftFormatError("sft.format prompt-completion: the chat template renders the prompt differently "
                                     "once the completion follows; use string prompt/completion fields")
            return full, [0] * len(before) + [1] * (len(full) - len(before))
        p = _plain_ids(tokenizer, str(prompt), special=True)
        c = _eos(tokenizer, _plain_ids(tokenizer, str(completion), special=False))
        return p + c, [0] * len(p) + [1] * len(c)
    if fmt == "messages":
        return chat_ids_and_mask(tokenizer, _messages(_require(row, sft.messages_field, fmt, "messagesField"), fmt,
                                                      sft.messages_field))
    raise SftFormatError(f"sft.format {fmt!r} is not one of auto, text, prompt-completion, messages")


def tokenize_batch(batch: dict[str, list[Any]], *, tokenizer: Any, sft: Any, max_length: int,
                   fmt: str | None = None, text_field: str = "text") -> dict[str, list[Any]]:
    """`datasets.map(batched=True)` function: rows -> input_ids and labels (-100 where no loss counts).

    Rows truncated to `max_length`; a row left without any labelled token (a prompt longer than maxLength)
    is dropped, since its loss would be 0/0 (the returned batch may be shorter than the input)."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    fmt = fmt or detect_format(columns, sft)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for i in range(n):
        row = {k: batch[k][i] for k in columns}
        ids, mask = example(row, fmt, tokenizer, sft, text_field)
        ids, mask = ids[:max_length], mask[:max_length]
        if not sft.completion_only_loss:
            mask = [1] * len(ids)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        # Labels are aligned with inputs; the loss shifts them, so position 0's label never counts.
        if not any(x != IGNORE_INDEX for x in labels[1:]):
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def pack(input_ids: list[list[int]], labels: list[list[int]], max_length: int) -> dict[str, list[list[int]]]:
    """Whole examples concatenated in order into rows of at most `max_length` tokens (next fit: a row is closed
    when the next example does not fit), with position ids restarting per example and the first label of every
    example dropped (the loss would otherwise predict it from the previous example's last token)."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []

    def close() -> None:
        if cur_ids:
            rows["input_ids"].append(list(cur_ids))
            rows["labels"].append(list(cur_labels))
            rows["position_ids"].append(list(cur_pos))

    for ids, labs in zip(input_ids, labels, strict=True):
        ids, labs = ids[:max_length], labs[:max_length]
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            close()
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids += ids
        cur_labels += [IGNORE_INDEX] + labs[1:]
        cur_pos += list(range(len(ids)))
    close()
    return rows


def sft_settings(spec: Any) -> Any:
    """spec.sft, or its defaults when the job leaves it unset."""
    from finetune_contract.spec import SftSpec

    return spec.sft if spec.sft is not None else SftSpec()


def build_sft_dataset(records: list[Any], tokenizer: Any, spec: Any, *, train: bool, job: str = "") -> Any:
    """One causal-LM split as token ids and labels (packed when sft.packing and `train`).

    records: data.Record with `row` (the whole row). Validation is never packed: its per-token loss and
    perplexity are the same either way, and unpacked they stay comparable across jobs."""
    import logging

    from .data import TokenizedDataset

    sft = sft_settings(spec)
    rows = [r.row if r.row is not None else {spec.dataset.text_field: r.text} for r in records]
    columns = sorted({k for row in rows for k in row})
    fmt = detect_format(columns, sft)
    batch = {k: [row.get(k) for row in rows] for k in columns}
    out = tokenize_batch(batch, tokenizer=tokenizer, sft=sft, max_length=spec.dataset.max_length, fmt=fmt,
                         text_field=spec.dataset.text_field)
    log = logging.getLogger("finetune_trainer")
    dropped = len(rows) - len(out["input_ids"])
    if dropped:
        log.warning("job %s: %d of %d %s examples have no %s token within maxLength %d and are left out", job, dropped,
                    len(rows), "training" if train else "validation",
                    "completion" if sft.completion_only_loss else "target", spec.dataset.max_length)
    if not out["input_ids"]:
        raise SftFormatError(f"sft.format {fmt}: no example keeps a token to train on within dataset.maxLength "
                             f"{spec.dataset.max_length}: raise maxLength or shorten the prompts")
    n_examples = len(out["input_ids"])
    if train and sft.packing:
        out = pack(out["input_ids"], out["labels"], spec.dataset.max_length)
        log.info("job %s: packed %d training examples into %d rows of up to %d tokens", job, n_examples,
                 len(out["input_ids"]), spec.dataset.max_length)
    keys = list(out)
    items = [{k: out[k][i] for k in keys} for i in range(len(out["input_ids"]))]
    log.info("job %s: sft format %s, loss on %s tokens (%d %s examples)", job, fmt,
             "completion/assistant" if sft.completion_only_loss else "all", n_examples, "training" if train else "validation")
    return TokenizedDataset(items)


def pack_batch(batch: dict[str, list[Any]], *, max_length: int) -> dict[str, list[list[int]]]:
    """`datasets.map(batched=True)` form of `pack` on tokenised rows (examples pack within each map batch)."""
    return pack(batch["input_ids"], batch["labels"], max_length)


# --- the datasets.map interface (data.py's per-task columns and tokenise functions) ---------------------------

def sft_columns(spec: Any, columns: list[str] | set[str]) -> dict[str, tuple[str, str]]:
    """For task causal-lm: {the column `tokenize_mapped` reads: (the source's column, the spec field naming it)}
    for the job's format (`auto` decided from the source's `columns`)."""
    sft = sft_settings(spec)
    fmt = detect_format(columns, sft)
    if fmt == "messages":
        return {"messages": (sft.messages_field, "sft.messagesField")}
    if fmt == "prompt-completion":
        return {"prompt": (sft.prompt_field, "sft.promptField"), "completion": (sft.completion_field, "sft.completionField")}
    return {"text": (spec.dataset.text_field, "dataset.textField")}


def tokenize_mapped(batch: dict[str, list[Any]], *, tokenizer: Any, spec: Any, pack_rows: bool = False) -> dict[str, list[Any]]:
    """`datasets.map(batched=True, remove_columns=...)` function over the columns `sft_columns` named: token ids and
    labels, packed (within each map batch) when `pack_rows` (the training split with sft.packing)."""
    standard = sft_settings(spec).model_copy(
        update={"prompt_field": "prompt", "completion_field": "completion", "messages_field": "messages"})
    fmt = "messages" if "messages" in batch else "prompt-completion" if "prompt" in batch else "text"
    out = tokenize_batch(batch, tokenizer=tokenizer, sft=standard, max_length=spec.dataset.max_length, fmt=fmt,
                         text_field="text")
    return pack(out["input_ids"], out["labels"], spec.dataset.max_length) if pack_rows else out
