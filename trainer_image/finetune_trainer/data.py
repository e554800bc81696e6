"""Datasets through Hugging Face `datasets`: every source kind becomes a memory-mapped Arrow table, its columns
mapped to the task's (`text`, `label`, `pair`), split into train / validation / test, and tokenised once with
`Dataset.map` into a cache file that a restarted pod (or the next job of the same data and tokenizer) reuses.

Source kinds (docs/data.md): a hub id (`owner/name`, read through `huggingface_hub.snapshot_download` into the HF
cache, which also serves offline, then the snapshot's files through `load_dataset`); local or PVC files (json,
jsonl, csv, parquet, arrow); directories written by `save_to_disk`; object-store URIs (`s3://`, `gs://`, through
fsspec with the credentials the pod's environment carries); folders of text files with one sub-folder per label.

Tokenisation is one function per task (`TOKENIZERS`): a batched `map` function from the mapped columns to the
model's inputs. Causal-LM formats plug in there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .failures import SOURCE_NOTE
from .paths import resolve_path

log = logging.getLogger("finetune_trainer")

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "gcs://")
CACHE_SUBDIR = "finetune-tokenized"
# Below this many rows per process, starting tokeniser processes costs more than it saves.
ROWS_PER_PROCESS = 5000
CACHE_KEY_VERSION = 1  # bump when a tokenise function changes what it writes for the same inputs


class DataError(ValueError):
    """A dataset that cannot be read as the spec says; the message names the field and the fix."""


# --- reading sources ------------------------------------------------------------------------------------------

def _is_object_store(source: str) -> bool:
    return source.startswith(OBJECT_STORE_SCHEMES)


def _storage_options(source: str) -> dict[str, Any]:
    """fsspec options from the pod's environment (dataset.credentialsSecret becomes environment variables).
    s3fs reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY itself but not AWS_ENDPOINT_URL (S3-compatible stores)."""
    if source.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _format_for(path: str, declared: str, *, exists: bool, is_dir: bool) -> str:
    if declared != "auto":
        return declared
    if is_dir:
        return "save-to-disk" if _is_saved_dataset(path) else "text-folders"
    ext = os.path.splitext(path.rstrip("/"))[1].lower().lstrip(".")
    if ext in FILE_FORMATS:
        return ext
    if not exists and not _is_object_store(path) and not path.startswith("/") and path.count("/") <= 1:
        return "hub"
    raise DataError(f"dataset {path}: cannot tell the format from the extension {ext!r} "
                    f"({'does not exist' if not exists else 'a file'}); set dataset.format")


def _pick_split(loaded: Any, split: str, source: str, field_name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {source} has no split {split!r} (splits: {sorted(loaded)}); set dataset.{field_name}")
        return loaded[split]
    return loaded


def _text_folders(path: str, cache_dir: str) -> Any:
    from datasets import Dataset

    labels = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files = [(label, name) for label in labels for name in sorted(os.listdir(os.path.join(path, label)))
             if name.lower().endswith(TEXT_SUFFIXES)]
    if not files:
        raise DataError(f"dataset {path}: no text files ({', '.join(TEXT_SUFFIXES)}) in label sub-folders; "
                        "set dataset.format for another layout")
    # The listing (names, sizes, times) is part of the generator's arguments, so datasets' cache of the Arrow
    # table it writes is reused exactly while the folder is unchanged.
    signature = [(label, name, *_stat(os.path.join(path, label, name))) for label, name in files]
    return Dataset.from_generator(_read_text_files, gen_kwargs={"root": path, "signature": signature},
                                  cache_dir=cache_dir)


def _read_text_files(root: str, signature: list[tuple[Any, ...]]):
    for label, name, *_ in signature:
        with open(os.path.join(root, label, name), encoding="utf-8", errors="replace") as f:
            yield {"text": f.read().strip(), "label": label}


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _json_field(path: str) -> str | None:
    """`{"data": [...]}` / `{"rows": [...]}` files name their list; a list or JSON lines needs no field."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("{"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except json.JSONDecodeError:
        return None  # JSON lines whose first line is an object
    for key in ("data", "rows"):
        if isinstance(loaded.get(key), list):
            return key
    raise DataError(f"dataset {path}: a JSON file must hold a list of objects (or {{'data': [...]}}), or be JSON lines")


@dataclass
class Record:
    """One example as Python values (sft.build_sft_dataset's input when examples are built by hand)."""

    text: str
    label: str | None = None
    pair: str | None = None  # embedding: the positive paired with `text`
    row: dict[str, Any] | None = None  # causal-lm: the whole row, for the SFT formats (sft.py)


@dataclass
class Source:
    """One read source: its rows and an identity that changes whenever its content may have."""

    rows: Any  # datasets.Dataset
    identity: list[Any]


def read_source(source: str, ds: Any, split: str, split_field: str, *, pvc_mount: str | None, cache_dir: str) -> Source:
    """One source as a `datasets.Dataset` (memory-mapped Arrow), before column mapping."""
    import datasets

    if _is_object_store(source):
        return _read_object_store(source, ds, split, split_field, cache_dir)
    path = resolve_path(source, pvc_mount=pvc_mount)
    exists = os.path.exists(path)
    fmt = _format_for(path, str(ds.format), exists=exists, is_dir=os.path.isdir(path))
    if fmt == "hub":
        return _read_hub(source, ds, split, split_field, cache_dir)
    if not exists:
        raise DataError(f"dataset {source}: {path} does not exist; a hub dataset id is `owner/name` (set dataset.format: hub)")
    if fmt == "text-folders":
        return Source(_text_folders(path, cache_dir), ["text-folders", path])
    if fmt == "save-to-disk":
        loaded = datasets.load_from_disk(path)
        return Source(_pick_split(loaded, split, source, split_field), ["disk", path, _tree_stat(path), split])
    builder = FILE_FORMATS.get(fmt)
    if builder is None:
        raise DataError(f"dataset {source}: format {fmt!r} needs a directory (save-to-disk, text-folders) or a hub id")
    kwargs: dict[str, Any] = {}
    if builder == "json" and fmt == "json":
        kwargs["field"] = _json_field(path)
    rows = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **kwargs)
    return Source(rows, ["file", builder, path, *_stat(path)])


def _tree_stat(path: str) -> list[Any]:
    out = []
    for root, _dirs, files in sorted(os.walk(path)):
        out += [(os.path.relpath(os.path.join(root, f), path), *_stat(os.path.join(root, f))) for f in sorted(files)]
    return out


def _read_hub(source: str, ds: Any, split: str, split_field: str, cache_dir: str) -> Source:
    """A hub dataset: `snapshot_download` fetches the repository at `revision` into the HF cache (HF_HOME; with
    HF_HUB_OFFLINE=1 it serves the cached snapshot and never calls out), then `load_dataset` reads the snapshot's
    data files by the hub's own conventions (README configs, `data/<split>-*` names)."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot = snapshot_download(source, repo_type="dataset", revision=ds.revision, token=os.environ.get("HF_TOKEN"))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DataError(f"dataset {source} (revision {ds.revision or 'default'}): not found on the hub "
                        f"({type(err).__name__}); check dataset.source and dataset.revision, and HF_TOKEN in "
                        "dataset.credentialsSecret for a private dataset") from err
    except LocalEntryNotFoundError as err:
        raise DataError(f"dataset {source} (revision {ds.revision or 'default'}): not in the HF cache and the hub "
                        "cannot be reached (HF_HUB_OFFLINE or no network); pre-fill the cache volume or allow network") from err
    try:
        loaded = datasets.load_dataset(snapshot, name=ds.config, cache_dir=cache_dir)
    except ValueError as err:
        raise DataError(f"dataset {source}: {str(err).splitlines()[0][:300]}; check dataset.config") from err
    # The snapshot's directory name is the commit: the identity is exact whatever `revision` names.
    return Source(_pick_split(loaded, split, source, split_field), ["hub", source, os.path.basename(snapshot), ds.config, split])


def _read_object_store(source: str, ds: Any, split: str, split_field: str, cache_dir: str) -> Source:
    import datasets
    import fsspec

    options = _storage_options(source)
    try:
        fs, path = fsspec.core.url_to_fs(source, **options)
    except (ImportError, ValueError) as err:
        raise DataError(f"dataset {source}: no fsspec backend for this URI ({err}); the trainer image has s3fs, "
                        "gcsfs for gs://") from err
    try:
        info = fs.info(path)
    except FileNotFoundError as err:
        raise DataError(f"dataset {source} does not exist (or the credentials in dataset.credentialsSecret cannot "
                        "read it)") from err
    if info.get("type") == "directory":
        if str(ds.format) not in ("auto", "save-to-disk") or not fs.exists(path.rstrip("/") + "/state.json") and not \
                fs.exists(path.rstrip("/") + "/dataset_dict.json"):
            raise DataError(f"dataset {source}: an object-store prefix must hold a dataset written by save_to_disk; "
                            "point dataset.source at a file (.parquet, .jsonl, ...) otherwise")
        loaded = datasets.load_from_disk(source, storage_options=options)
        etags = sorted((k, v.get("ETag") or v.get("etag") or v.get("size")) for k, v in fs.find(path, detail=True).items())
        return Source(_pick_split(loaded, split, source, split_field), ["store-disk", source, etags, split])
    fmt = str(ds.format)
    if fmt == "auto":
        fmt = os.path.splitext(path)[1].lower().lstrip(".")
    builder = FILE_FORMATS.get(fmt)
    if builder is None:
        raise DataError(f"dataset {source}: cannot tell the format from the extension {fmt!r}; set dataset.format")
    # Copied into the cache first: datasets then reads (and memory-maps) a local file, and the copy is keyed
    # by the object's ETag, so an unchanged object is not fetched again by a restarted pod.
    tag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("size"))
    local_dir = os.path.join(cache_dir, "finetune-objects", hashlib.sha256(f"{source}\0{tag}".encode()).hexdigest()[:24])
    local = os.path.join(local_dir, os.path.basename(path))
    if not os.path.exists(local):
        os.makedirs(local_dir, exist_ok=True)
        fs.get(path, local + ".part")
        os.replace(local + ".part", local)
    kwargs = {"field": _json_field(local)} if fmt == "json" else {}
    rows = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=cache_dir, **kwargs)
    return Source(rows, ["store-file", source, tag])


# --- column mapping and splits --------------------------------------------------------------------------------

def classification_columns(ds: Any) -> dict[str, tuple[str, str]]:
    return {"text": (ds.text_field, "textField"), "label": (ds.label_field, "labelField")}


def causal_lm_columns(ds: Any) -> dict[str, tuple[str, str]]:
    return {"text": (ds.text_field, "textField")}


def embedding_columns(ds: Any) -> dict[str, tuple[str, str]]:
    if ds.text_pair_field:
        return {"text": (ds.text_field, "textField"), "pair": (ds.text_pair_field, "textPairField")}
    return classification_columns(ds)


COLUMNS: dict[str, Callable[[Any], dict[str, tuple[str, str]]]] = {
    "sequence-classification": classification_columns,
    "causal-lm": causal_lm_columns,
    "embedding": embedding_columns,
}
"""Per task: {the tokenise function's column name: (the source's column, the dataset field that names it)}.
`text`, `pair` and `label` are read as strings; other columns (e.g. chat `messages`) keep their type."""


def map_columns(rows: Any, ds: Any, task: str, source: str, spec: Any | None = None) -> Any:
    """The source's columns as the task's (COLUMNS); a missing column is named with its field."""
    from datasets import ClassLabel, Value

    cols = set(rows.column_names)
    if task == "causal-lm" and spec is not None:
        from .sft import sft_columns

        wanted = sft_columns(spec, cols)  # text, prompt/completion or chat messages (sft.format, auto from the columns)
    else:
        wanted = COLUMNS[task](ds)
    for _, (column, field_name) in wanted.items():
        if column not in cols:
            raise DataError(f"dataset {source} has no column {column!r} (dataset.{field_name}); its columns: "
                            f"{sorted(cols)}")
    rows = rows.select_columns([c for c, _ in wanted.values()])
    feature = rows.features.get(ds.label_field) if "label" in wanted else None
    if isinstance(feature, ClassLabel):
        # Label names, not their ids: the ids of one file need not match another split's.
        features = rows.features.copy()
        features[ds.label_field] = Value("string")
        rows = rows.map(lambda b: {ds.label_field: [None if x is None else feature.int2str(x) for x in b[ds.label_field]]},
                        batched=True, features=features, desc="label names")
    renames = {c: k for k, (c, _) in wanted.items() if c != k}
    # A column named like a target it is not mapped to would collide with the rename.
    rows = rows.rename_columns(renames) if renames else rows
    for name in ("text", "pair", "label"):
        if name in rows.column_names and rows.features[name] != Value("string"):
            rows = rows.cast_column(name, Value("string"))
    return rows


@dataclass
class Splits:
    train: Any
    validation: Any
    test: Any | None
    labels: list[str] = field(default_factory=list)
    identity: list[Any] = field(default_factory=list)


def _limit(rows: Any, n: int | None) -> Any:
    return rows.select(range(min(n, len(rows)))) if n and n < len(rows) else rows


def load_splits(spec: Any, *, pvc_mount: str | None = None, cache_dir: str) -> Splits:
    """(train, validation, test): separate sources, or seeded hold-outs of `testFraction` then `validationFraction`.

    Without a test split the hold-out is exactly the one of earlier releases (the same seed draws the same
    validation examples)."""
    ds, task = spec.dataset, str(spec.task)
    seed = spec.hyperparameters.seed or 0

    def read(source: str, split: str, split_field: str) -> Source:
        try:
            got = read_source(source, ds, split, split_field, pvc_mount=pvc_mount, cache_dir=cache_dir)
            got.rows = map_columns(got.rows, ds, task, source, spec)
        except Exception as err:
            # Which of source / validationSource / testSource failed: datasets' own errors rarely say
            # (finetune_trainer.failures.culprit reads this note for the DatasetUnreadable message).
            err.add_note(f"{SOURCE_NOTE}{split_field}={source}")
            raise
        return got

    main = read(ds.source, ds.split, "split")
    rows, identity = main.rows, [main.identity]
    n = len(rows)
    # Folder datasets come sorted by label: shuffle before holding out, with the job's seed.
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = None
    if ds.test_source:
        got = read(ds.test_source, ds.test_split, "testSplit")
        test, identity = got.rows, identity + [got.identity]
    elif ds.test_fraction:
        n_test = max(1, round(n * ds.test_fraction))
        test, order = rows.select(order[:n_test]), order[n_test:]
    if ds.validation_source:
        got = read(ds.validation_source, ds.validation_split, "validationSplit")
        train, val, identity = rows.select(order) if len(order) != n else rows, got.rows, identity + [got.identity]
    else:
        n_val = max(1, round(n * (ds.validation_fraction or 0.1)))
        val, train = rows.select(order[:n_val]), rows.select(order[n_val:])
    train, val = _limit(train, ds.max_train_samples), _limit(val, ds.max_validation_samples)
    if test is not None:
        test = _limit(test, ds.max_test_samples)
        if len(test) == 0:
            raise DataError(f"dataset {ds.test_source or ds.source}: the test split is empty; check dataset.testSource")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"dataset {ds.source}: {len(train)} training and {len(val)} validation examples; need at least "
                        "one of each (lower dataset.testFraction/validationFraction or add data)")
    labels: list[str] = []
    if "label" in train.column_names:
        found: set[Any] = set()
        for part in (train, val, test):
            if part is not None:
                found |= set(part.unique("label"))
        if None in found:
            raise DataError(f"dataset {ds.source}: some rows have no label (dataset.labelField {ds.label_field!r}); "
                            f"{task} needs one on every example")
        labels = sorted(found)
    return Splits(train, val, test, labels, identity)


# --- tokenisation ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizeContext:
    """What a task's tokenise function may read besides the batch."""

    tokenizer: Any
    max_length: int
    label_index: dict[str, int]
    spec: Any
    train: bool = True  # the training split (causal-lm packs only it)


def _ids(ctx: TokenizeContext, texts: list[str]) -> list[list[int]]:
    return ctx.tokenizer(texts, truncation=True, max_length=ctx.max_length, add_special_tokens=True)["input_ids"]


def tokenize_classification(batch: dict[str, list[Any]], ctx: TokenizeContext) -> dict[str, list[Any]]:
    return {"input_ids": _ids(ctx, batch["text"]), "labels": [ctx.label_index[x] for x in batch["label"]]}


def tokenize_causal_lm(batch: dict[str, list[Any]], ctx: TokenizeContext) -> dict[str, list[Any]]:
    """The SFT formats (sft.py): `text`, prompt/completion or chat messages, with their loss masks as `labels`;
    the training split packed when sft.packing (validation never is: its perplexity stays comparable)."""
    from .sft import sft_settings, tokenize_mapped

    return tokenize_mapped(batch, tokenizer=ctx.tokenizer, spec=ctx.spec,
                           pack_rows=ctx.train and sft_settings(ctx.spec).packing)


def tokenize_embedding(batch: dict[str, list[Any]], ctx: TokenizeContext) -> dict[str, list[Any]]:
    out = {"input_ids": _ids(ctx, batch["text"])}
    if "pair" in batch:
        out["pair_input_ids"] = _ids(ctx, batch["pair"])
    else:
        out["labels"] = [ctx.label_index[x] for x in batch["label"]]
    return out


TokenizeFn = Callable[[dict[str, list[Any]], TokenizeContext], dict[str, list[Any]]]
TOKENIZERS: dict[str, TokenizeFn] = {
    "sequence-classification": tokenize_classification,
    "causal-lm": tokenize_causal_lm,
    "embedding": tokenize_embedding,
}
"""One batched tokenise function per task: mapped columns -> model inputs (lists of ids; the collator pads)."""


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of what the tokenizer does, not where it was loaded from (two paths to one model share a cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [type(tokenizer).__name__, tokenizer.padding_side, tokenizer.truncation_side,
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256((text + "\0" + "\0".join(extra)).encode()).hexdigest()


def tokenize_processes(rows: int, cpus: int | None = None) -> int | None:
    """Processes for `map` (num_proc): the pod's CPUs, one per ROWS_PER_PROCESS rows at most; None: in-process."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cpus, rows // ROWS_PER_PROCESS)
    return n if n >= 2 else None


@dataclass
class Tokenized:
    dataset: Any  # datasets.Dataset of model inputs
    cache_file: str
    cached: bool  # read from an earlier run's cache file, nothing tokenised


def tokenize(rows: Any, role: str, key_parts: list[Any], ctx: TokenizeContext, task: str, cache_dir: str) -> Tokenized:
    """Tokenise one split with `TOKENIZERS[task]` through `Dataset.map`, into `<cache_dir>/finetune-tokenized/<key>`.

    The key covers the sources' identities, the dataset spec, the seed, the task and the tokenizer's content, so a
    restarted pod or a second job of the same data and tokenizer reads the file instead of tokenising again."""
    key = hashlib.sha256(json.dumps([CACHE_KEY_VERSION, role, task, key_parts], sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = os.path.join(cache_dir, CACHE_SUBDIR)
    os.makedirs(folder, exist_ok=True)
    cache_file = os.path.join(folder, f"{role}-{key}.arrow")
    num_proc = tokenize_processes(len(rows))
    shards = [cache_file] if num_proc is None else [
        cache_file.replace(".arrow", f"_{i:05d}_of_{num_proc:05d}.arrow") for i in range(num_proc)]
    cached = all(os.path.exists(s) for s in shards)
    fn = TOKENIZERS[task]
    out = rows.map(_Apply(fn, ctx), batched=True, remove_columns=rows.column_names, cache_file_name=cache_file,
                   load_from_cache_file=True, new_fingerprint=key, num_proc=num_proc, desc=f"tokenising {role}")
    return Tokenized(out, cache_file, cached)


class _Apply:
    """A picklable (num_proc) binding of a tokenise function to its context."""

    def __init__(self, fn: TokenizeFn, ctx: TokenizeContext):
        self.fn, self.ctx = fn, ctx

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return self.fn(batch, self.ctx)


def embedding_partners(dataset: Any, seed: int) -> Any:
    """Labelled embedding texts (no pair column): each gets a positive of the same label drawn with the seed (a
    label with one text pairs it with itself), and its label becomes the example's; explicit pairs get their
    index as label. Both losses and the evaluation then read one shape (anchor, positive, label)."""
    if "pair_input_ids" in dataset.column_names:
        return dataset.add_column("labels", list(range(len(dataset))))
    labels = list(dataset["labels"])
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    partners = []
    for i, label in enumerate(labels):
        others = [j for j in by_label[label] if j != i] or [i]
        partners.append(rng.choice(others))
    return dataset.add_column("pair_input_ids", list(dataset.select(partners)["input_ids"]))


@dataclass
class PreparedData:
    train: Any
    validation: Any
    test: Any | None
    labels: list[str]
    cached: bool  # every split came from the tokenised cache
    paired: bool


def default_cache_dir(output_dir: str) -> str:
    """Where raw Arrow tables and tokenised splits go: $HF_DATASETS_CACHE (a cache volume shared by jobs), else the
    job's output volume, which a restarted pod of the same job finds again."""
    return os.environ.get("HF_DATASETS_CACHE") or os.path.join(output_dir, "cache", "datasets")


def prepare(spec: Any, tokenizer: Any, *, pvc_mount: str | None, cache_dir: str) -> PreparedData:
    """Read, map, split and tokenise every split of the job's data."""
    task, seed = str(spec.task), spec.hyperparameters.seed or 0
    splits = load_splits(spec, pvc_mount=pvc_mount, cache_dir=cache_dir)
    index = {name: i for i, name in enumerate(splits.labels)}
    sft = getattr(spec, "sft", None)
    key_parts = [splits.identity, spec.dataset.model_dump(mode="json"), seed, tokenizer_identity(tokenizer),
                 splits.labels, sft.model_dump(mode="json") if sft is not None and task == "causal-lm" else None]
    parts = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    done = {role: tokenize(rows, role, key_parts, TokenizeContext(tokenizer, spec.dataset.max_length, index, spec,
                                                                  train=role == "train"), task, cache_dir)
            for role, rows in parts.items() if rows is not None}
    for role, t in done.items():
        if len(t.dataset) == 0:
            raise DataError(f"dataset {spec.dataset.source}: no {role} example keeps a token to train on within "
                            f"dataset.maxLength {spec.dataset.max_length}: raise maxLength or shorten the prompts")
    out = {role: t.dataset for role, t in done.items()}
    paired = task == "embedding" and "pair_input_ids" in out["train"].column_names
    if task == "embedding":
        out = {role: embedding_partners(d, seed + (1 if role != "train" else 0)) for role, d in out.items()}
    return PreparedData(out["train"], out["validation"], out.get("test"), splits.labels,
                        all(t.cached for t in done.values()), paired)


class TokenizedDataset(Dataset):
    """Token ids per example held in memory (tests and probes build them by hand)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


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
            if "labels" in rows[0]:
                labels, _ = _pad([r["labels"] for r in rows], -100)
                batch["labels"] = labels
            else:
                batch["labels"] = ids.masked_fill(mask == 0, -100)
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
