"""Datasets: read json/jsonl/csv files or a folder of text files per label, split off validation,
tokenise once, and pad each batch to its longest sequence."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .paths import resolve_path

TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class Record:
    text: str
    label: str | None = None
    pair: str | None = None  # embedding: the positive paired with `text`
    row: dict[str, Any] | None = None  # causal-lm: the whole row, for the SFT formats (sft.py)


def _format_for(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if os.path.isdir(path):
        return "text-folders"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("json", "jsonl", "csv"):
        return ext
    raise ValueError(f"dataset {path}: cannot tell the format from the extension {ext!r}; set dataset.format")


def _from_row(row: dict[str, Any], ds: Any, whole_rows: bool = False) -> Record:
    if whole_rows:  # causal-lm: sft.py reads the fields its format needs and names a missing one
        return Record(str(row.get(ds.text_field, "")), row=row)
    if ds.text_field not in row:
        raise ValueError(f"dataset row has no text field {ds.text_field!r} (fields: {sorted(row)})")
    label = row.get(ds.label_field)
    pair = row.get(ds.text_pair_field) if ds.text_pair_field else None
    return Record(str(row[ds.text_field]), None if label is None else str(label), None if pair is None else str(pair))


def read_records(source: str, ds: Any, pvc_mount: str | None = None, whole_rows: bool = False) -> list[Record]:
    """All records of one source (a file or a folder), in a deterministic order."""
    path = resolve_path(source, pvc_mount=pvc_mount)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {source}: {path} does not exist (hub datasets need network and are not supported offline)")
    fmt = _format_for(path, str(ds.format))
    if fmt == "text-folders":
        records = []
        for label in sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))):
            folder = os.path.join(path, label)
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(TEXT_SUFFIXES):
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                        text = f.read().strip()
                        records.append(Record(text, label, row={ds.text_field: text} if whole_rows else None))
        return records
    with open(path, encoding="utf-8", newline="" if fmt == "csv" else None) as f:
        if fmt == "csv":
            rows: list[dict[str, Any]] = list(csv.DictReader(f))
        elif fmt == "jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            loaded = json.load(f)
            rows = loaded.get("data", loaded.get("rows")) if isinstance(loaded, dict) else loaded
            if not isinstance(rows, list):
                raise ValueError(f"dataset {source}: a JSON file must hold a list of objects (or {{'data': [...]}})")
    return [_from_row(r, ds, whole_rows) for r in rows]


def split_records(spec: Any, pvc_mount: str | None = None) -> tuple[list[Record], list[Record]]:
    """(train, validation): a separate validation source, or a seeded hold-out of `validationFraction`."""
    ds = spec.dataset
    seed = spec.hyperparameters.seed or 0
    whole = str(spec.task) == "causal-lm"
    records = read_records(ds.source, ds, pvc_mount, whole)
    if ds.validation_source:
        train, val = records, read_records(ds.validation_source, ds, pvc_mount, whole)
    else:
        order = list(range(len(records)))
        # Folder datasets come sorted by label: shuffle before holding out, with the job's seed.
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(records) * (ds.validation_fraction or 0.1)))
        val = [records[i] for i in order[:n_val]]
        train = [records[i] for i in order[n_val:]]
    if ds.max_train_samples:
        train = train[: ds.max_train_samples]
    if ds.max_validation_samples:
        val = val[: ds.max_validation_samples]
    if not train or not val:
        raise ValueError(f"dataset {ds.source}: {len(train)} training and {len(val)} validation examples; need at least one of each")
    return train, val


def label_names(*splits: list[Record]) -> list[str]:
    labels = sorted({r.label for split in splits for r in split if r.label is not None})
    return labels


class TokenizedDataset(Dataset):
    """Token ids per example (no padding: the collator pads each batch to its longest row)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _ids(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def build_dataset(records: list[Record], task: str, tokenizer: Any, max_length: int, labels: list[str], seed: int) -> TokenizedDataset:
    """Tokenise one split for `task`.

    Embedding examples are always (anchor, positive, label) so both losses and the evaluation
    read one shape: explicit pairs get their index as label; labelled texts get a positive of
    the same label drawn with the seed (a label with one text pairs the text with itself).
    """
    if task == "causal-lm":
        raise ValueError("causal-lm examples are built by sft.build_sft_dataset (formats, loss masks, packing)")
    ids = _ids(tokenizer, [r.text for r in records], max_length)
    if task == "sequence-classification":
        index = {name: i for i, name in enumerate(labels)}
        missing = [r for r in records if r.label is None]
        if missing:
            raise ValueError("sequence-classification needs a label on every example (dataset.labelField)")
        return TokenizedDataset([{"input_ids": x, "labels": index[r.label]} for x, r in zip(ids, records, strict=True)])
    if all(r.pair is not None for r in records):
        pair_ids = _ids(tokenizer, [r.pair for r in records], max_length)
        return TokenizedDataset(
            [{"input_ids": a, "pair_input_ids": p, "labels": i} for i, (a, p) in enumerate(zip(ids, pair_ids, strict=True))]
        )
    if any(r.label is None for r in records):
        raise ValueError("embedding needs dataset.textPairField or a label on every example")
    index = {name: i for i, name in enumerate(labels)}
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    rng = random.Random(seed)
    items = []
    for i, r in enumerate(records):
        others = [j for j in by_label[r.label] if j != i] or [i]
        items.append({"input_ids": ids[i], "pair_input_ids": ids[rng.choice(others)], "labels": index[r.label]})
    return TokenizedDataset(items)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class Collator:
    """Pads a list of examples into tensors.

    Causal LM: labels come with the examples (sft.py: -100 where no loss counts) and are padded with -100.
    Packed rows carry position_ids, padded as one more sequence starting at 0, and no attention_mask: the
    model derives the block-diagonal mask from the position ids (see sft.py)."""

    def __init__(self, pad_id: int, task: str):
        self.pad_id = pad_id
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = _pad([r["input_ids"] for r in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "causal-lm":
            labels, _ = _pad([r["labels"] for r in rows], -100)
            batch["labels"] = labels
            if "position_ids" in rows[0]:
                width = ids.shape[1]
                batch["position_ids"] = torch.tensor(
                    [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows], dtype=torch.long)
                del batch["attention_mask"]
            return batch
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        if "pair_input_ids" in rows[0]:
            batch["pair_input_ids"], batch["pair_attention_mask"] = _pad([r["pair_input_ids"] for r in rows], self.pad_id)
        return batch


class EpochSeededSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch).

    Every rank draws the same order without synchronising RNG state, and a run resumed in the
    middle of epoch N replays exactly epoch N's order, so skipping the batches already seen is exact.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())
