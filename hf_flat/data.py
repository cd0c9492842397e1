"""Data loading for the `hf-flat` analysis commands (the example scripts use `digits_splits`).

`load_splits` takes a `datasets` name (`load_dataset(name, config)`), local files (CSV, JSON /
JSON lines, or an image folder) or the built-in `digits` task (scikit-learn's 1,797 8x8 digits,
offline), and `preprocess` turns examples into model inputs with the model's own tokenizer or
image processor. Mistakes in what the user passed raise `UsageError` with a one-line message.
"""

import difflib
import json
import os

import numpy as np

#: Sequence length when neither the tokenizer nor the model config states a limit.
FALLBACK_MAX_LENGTH = 128
#: Model types whose position ids start after the padding index (RoBERTa's embeddings), so that
#: `pad_token_id + 1` of their `max_position_embeddings` cannot hold tokens.
_PADDING_OFFSET_TYPES = ("camembert", "longformer", "data2vec-text")
_DATA_EXTENSIONS = (".csv", ".json", ".jsonl")


class UsageError(ValueError):
    """A mistake in the arguments or data the user passed; the message says what to do."""


def digits_splits(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as `datasets.Dataset`s of 1x8x8 float images in [-1, 1] and labels."""
    from datasets import Dataset
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )

    def make(x, y):
        return Dataset.from_dict({"pixel_values": x, "labels": y}).with_format("torch")

    return {"train": make(x_train, y_train), "test": make(x_test, y_test)}


ACCEPTED = ("'digits', a local CSV / JSON file, a folder of train.* / test.* files, an image folder "
            "(train/ and test/ with one sub-folder per class), or a `datasets` name")


def load_splits(source: str, config: str | None = None, train_split="train", eval_split="test") -> dict:
    """{"train": Dataset, "eval": Dataset, "note": str | None} from `source`: "digits", a local .csv /
    .json / .jsonl file (used for both splits, as "note" says) or folder of such files, an image
    folder (one sub-folder per class), or a Hub data set name. A split that is absent is None."""
    from datasets import load_dataset

    if source == "digits":
        splits = digits_splits()
        return {"train": splits["train"], "eval": splits["test"], "note": None}
    if os.path.isfile(source):
        if not source.endswith(_DATA_EXTENSIONS):
            raise UsageError(f"--data {source}: a data file must be .csv, .json or .jsonl; or pass a folder.")
        kind = "csv" if source.endswith(".csv") else "json"
        data = load_dataset(kind, data_files={"train": source})["train"]
        note = (f"--data {source} is a single file: it is both the train and the test set "
                "(pass a folder with train.csv and test.csv to keep them apart)")
        return {"train": data, "eval": data, "note": note}
    if os.path.isdir(source):
        files = _split_files(source)
        if files:
            kind = "csv" if next(iter(files.values())).endswith(".csv") else "json"
            loaded = load_dataset(kind, data_files=files)
        elif any(name.endswith(_DATA_EXTENSIONS) for name in os.listdir(source)):
            found = ", ".join(sorted(n for n in os.listdir(source) if n.endswith(_DATA_EXTENSIONS)))
            raise UsageError(f"--data {source}: name the folder's files after their split (train.csv, test.csv; "
                             f"found: {found}), or pass one file as --data.")
        else:
            try:
                loaded = load_dataset("imagefolder", data_dir=source)
            except (ValueError, FileNotFoundError) as error:
                raise UsageError(f"--data {source}: no train.* / test.* files and no image folder "
                                 f"({' '.join(str(error).split())}); --data takes {ACCEPTED}.") from None
    else:
        loaded = _load_named(source, config)
    if eval_split not in loaded:  # a local folder may name it either way
        eval_split = next((name for name in ("test", "validation") if name in loaded), eval_split)
    return {"train": loaded[train_split] if train_split in loaded else None,
            "eval": loaded[eval_split] if eval_split in loaded else None, "note": None,
            "splits": list(loaded)}


def _load_named(source, config):
    """`load_dataset(source, config)` for a name that is no local path: near misses of "digits"
    and names the Hub does not know are refused at once, not after the Hub's retries."""
    from datasets import load_dataset
    from huggingface_hub import constants

    unknown = f"--data {source}: no such file or folder, and not a known data set. --data takes {ACCEPTED}."
    if difflib.get_close_matches(source, ["digits"], cutoff=0.7):
        raise UsageError(f"--data {source}: no such file or folder; did you mean 'digits'? --data takes {ACCEPTED}.")
    if source.endswith(_DATA_EXTENSIONS) or source.startswith((".", "~", os.sep)) or source.count("/") > 1:
        raise UsageError(unknown)
    if not constants.HF_HUB_OFFLINE:  # one quick look-up instead of load_dataset's retries
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

        try:
            HfApi().dataset_info(source, timeout=10)
        except (RepositoryNotFoundError, HFValidationError):
            raise UsageError(unknown) from None
        except Exception as error:  # no network
            raise UsageError(
                f"--data {source}: no such file or folder, and the Hugging Face Hub cannot be reached to look it up "
                f"({type(error).__name__}). Pass a local file or folder or 'digits'; for a data set already in "
                "the datasets cache, set HF_HUB_OFFLINE=1."
            ) from None
    try:
        return load_dataset(source, config)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UsageError(f"--data {source}: `datasets` cannot load it: {' '.join(str(error).split())}") from None


def _split_files(path):
    """In a folder, the files named after their split (train.csv, validation.json, test.jsonl)."""
    found = {}
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if ext in _DATA_EXTENSIONS and stem in ("train", "validation", "test"):
            found[stem] = os.path.join(path, name)
    return found


#: The file that makes a folder a PEFT adapter (LoRA, ...): its weights are loaded over a base model.
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(model_dir) -> bool:
    """A PEFT adapter folder: adapter_config.json and no config.json of a whole model."""
    return (os.path.isfile(os.path.join(model_dir, ADAPTER_CONFIG))
            and not os.path.isfile(os.path.join(model_dir, "config.json")))


def _cached(source, name) -> bool:
    """Whether the Hugging Face cache holds file `name` of the Hub model `source` (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source, name), str)
    except Exception:  # not a valid repository name, no cache
        return False


def _looks_like_path(name) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def adapter_base(model_dir) -> str | None:
    """The base model of a PEFT adapter folder (its adapter_config.json's ``base_model_name_or_path``):
    a local model folder, or a Hub name already in the Hugging Face cache (loaded offline). None for
    a folder that is not an adapter. A base that cannot be loaded offline is a `UsageError` that
    says how to point the adapter at a local copy."""
    if not is_adapter_folder(model_dir):
        return None
    config_path = os.path.join(model_dir, ADAPTER_CONFIG)
    try:
        with open(config_path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise UsageError(f"{config_path} cannot be read ({error}): the adapter's base model is unknown.") from None
    fix = (f"set base_model_name_or_path in {config_path} to the folder of the base model (a save_pretrained "
           "folder with its config.json)")
    if not base:
        raise UsageError(f"{model_dir} is a PEFT adapter whose {ADAPTER_CONFIG} names no base model "
                         f"(base_model_name_or_path is {base!r}): {fix}.")
    if os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, "config.json")):
            raise UsageError(f"{model_dir} is a PEFT adapter over {base} (base_model_name_or_path in its "
                             f"{ADAPTER_CONFIG}), which has no config.json, so it holds no saved model: {fix}.")
        return base
    if not _looks_like_path(base) and _cached(base, "config.json"):
        return base
    where = ("is not a local folder" if _looks_like_path(base)
             else "is not a local folder, and the Hugging Face cache does not hold it")
    download = "" if _looks_like_path(base) else f", or put it in the cache first (`hf download {base}`)"
    raise UsageError(f"{model_dir} is a PEFT adapter whose base model, {base!r} (base_model_name_or_path in its "
                     f"{ADAPTER_CONFIG}), {where}; hf-flat loads the adapter over its base model offline: {fix}"
                     f"{download}.")


def from_pretrained_kwargs(source) -> dict:
    """A model or processor `source` that is no local folder comes from the Hugging Face cache, offline."""
    return {} if os.path.isdir(source) else {"local_files_only": True}


def config_source(model_dir) -> str:
    """Where a model folder's config.json is: the folder, or for a PEFT adapter its base model."""
    return adapter_base(model_dir) or model_dir


def adapter_task(path) -> tuple[str | None, int | None]:
    """A PEFT adapter folder's ``task_type`` and, for a classification head that the adapter holds
    (``modules_to_save``), its number of classes: the smallest output size among those modules'
    weight matrices (the head's last layer)."""
    from safetensors import safe_open

    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        task = json.load(f).get("task_type")
    weights, sizes = os.path.join(path, "adapter_model.safetensors"), []
    if task in ("SEQ_CLS", "TOKEN_CLS") and os.path.isfile(weights):
        with safe_open(weights, "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if ".modules_to_save." in f".{key}" and key.endswith(".weight") and len(shape) == 2:
                    sizes.append(shape[0])
    return task, (min(sizes) if sizes else None)


def model_config(model_dir):
    """The model config of a model folder, or of an adapter folder's base model (with the number of
    classes of a classification head that the adapter holds, `adapter_task`)."""
    from transformers import AutoConfig

    source = config_source(model_dir)
    config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs(source))
    if source != model_dir:
        labels = adapter_task(model_dir)[1]
        if labels is not None and labels != config.num_labels:
            config.num_labels = labels
    return config


def _holds(source, name) -> bool:
    return os.path.isfile(os.path.join(source, name)) if os.path.isdir(source) else _cached(source, name)


def sequence_limit(tokenizer, config) -> tuple[int | None, str]:
    """The longest sequence the model takes: the smaller of the tokenizer's `model_max_length` and
    the config's `max_position_embeddings` (less `pad_token_id + 1` for RoBERTa-style positions),
    with a description of where it comes from; None when neither states one."""
    limits = []
    if tokenizer.model_max_length < 1_000_000:  # unset: transformers' VERY_LARGE_INTEGER
        limits.append((tokenizer.model_max_length, f"tokenizer model_max_length {tokenizer.model_max_length}"))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        model_type = getattr(config, "model_type", "") or ""
        offset = 0
        if "roberta" in model_type or model_type in _PADDING_OFFSET_TYPES:
            offset = (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append((positions - offset, f"max_position_embeddings {positions}" + (f" - {offset}" if offset else "")))
    if not limits:
        return None, "no limit stated by the tokenizer or the config"
    return min(limits)[0], ", ".join(text for _, text in limits)


def max_length_for(model_dir, requested: int | None = None) -> tuple[int, str | None]:
    """The sequence length to tokenize with: `requested`, or by default the model's limit
    (`sequence_limit`), capped by that limit; and a note when the request was capped."""
    from transformers import AutoTokenizer

    tokenizer_source = processor_files(model_dir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **from_pretrained_kwargs(tokenizer_source))
    limit, source = sequence_limit(tokenizer, model_config(model_dir))
    if requested is not None and requested < 1:
        raise UsageError(f"--max_length {requested}: give a positive number of tokens.")
    if limit is None:
        return requested or FALLBACK_MAX_LENGTH, None
    if requested is not None and requested > limit:
        return limit, f"--max_length {requested} is capped at {limit}, this model's limit ({source})"
    return requested or limit, None


def processor_files(model_dir, kind="tokenizer") -> str:
    """Where the tokenizer / image processor of a model folder is: the folder itself or, for a PEFT
    adapter folder without one, its base model. Refuse a model folder without the files its data
    needs (transformers would build an empty tokenizer and give numbers for nothing)."""
    names = ("tokenizer_config.json", "tokenizer.json") if kind == "tokenizer" else ("preprocessor_config.json",)
    sources = [model_dir] + ([adapter_base(model_dir)] if is_adapter_folder(model_dir) else [])
    for source in sources:
        if any(_holds(source, name) for name in names):
            return source
    saver = "tokenizer" if kind == "tokenizer" else "image_processor"
    where = f"{model_dir} (nor its base model {sources[1]})" if len(sources) > 1 else model_dir
    raise UsageError(f"{where} holds no {kind.replace('_', ' ')} ({names[0]}), which this data needs: save it there "
                     f"with {saver}.save_pretrained({model_dir!r}) (give the Trainer processing_class=... and its "
                     "checkpoints hold it).")


def _column(name, option, columns):
    if name not in columns:
        raise UsageError(f"{option} {name!r} is not a column of the data; its columns are: {', '.join(columns)}.")
    return name


def encode_labels(dataset, config, label_column="label"):
    """`dataset` with its labels in a `labels` column of class ids: string labels mapped through the
    model config's `label2id`, and class ids checked against `num_labels`."""
    columns = dataset.column_names
    if "labels" in columns and label_column not in columns:
        label_column = "labels"
    _column(label_column, "--label_column", columns)
    if label_column != "labels":
        if "labels" in columns:
            dataset = dataset.remove_columns("labels")
        dataset = dataset.rename_column(label_column, "labels")
    feature = dataset.features["labels"]
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        label2id = dict(getattr(config, "label2id", None) or {})
        missing = sorted({v for v in dataset.with_format(None)["labels"] if v not in label2id})
        if missing:
            raise UsageError(
                f"--label_column {label_column}: labels {missing[:5]} are not in the model config's label2id "
                f"({sorted(label2id)[:10]}); write the labels as class ids, or save the model with a label2id "
                "naming them (examples/glue/run_glue.py does)."
            )
        from datasets import Value

        dataset = dataset.map(lambda row: {"labels": label2id[row["labels"]]})
        dataset = dataset.cast_column("labels", Value("int64"))
    elif dtype is not None and dtype.startswith(("int", "uint")) and getattr(config, "num_labels", 0) > 1:
        values = dataset.with_format(None)["labels"]
        label2id = dict(getattr(config, "label2id", None) or {})
        if label2id and all(str(k).lstrip("-").isdigit() for k in label2id):
            # the model was trained on integer labels by name (run_glue.py saves labels 1, 4, 5 as "1", "4", "5")
            bad = sorted({v for v in values if str(v) not in label2id})
            if not bad:
                from datasets import Value

                dataset = dataset.map(lambda row: {"labels": label2id[str(row["labels"])]})
                return dataset.cast_column("labels", Value("int64"))
            raise UsageError(
                f"--label_column {label_column}: labels {bad[:5]} are not in the model config's label2id "
                f"({sorted(label2id)[:10]})"
                + ("; unlabelled splits (-1, e.g. GLUE's test) cannot be scored: pass --eval_split validation."
                   if -1 in bad else ".")
            )
        bad = sorted({v for v in values if not 0 <= v < config.num_labels})
        if bad:
            raise UsageError(
                f"--label_column {label_column}: labels {bad[:5]} are not class ids of this model's "
                f"{config.num_labels} classes (0 to {config.num_labels - 1})"
                + ("; unlabelled splits (-1, e.g. GLUE's test) cannot be scored: pass --eval_split validation."
                   if -1 in bad else ".")
            )
    return dataset


def preprocess(dataset, model_dir, text_column=None, text_pair_column=None, label_column="label", max_length=None):
    """Model inputs for `dataset`: tokenized text (the model folder's tokenizer, truncated to
    `max_length`, default the model's limit, and padded to the longest example), processed images
    (its image processor), or arrays already called `pixel_values` / `input_ids`; labels as
    `labels` (see `encode_labels`)."""
    dataset = encode_labels(dataset, model_config(model_dir), label_column)
    columns = dataset.column_names
    if "pixel_values" in columns or "input_ids" in columns:
        return dataset.with_format("torch")
    if "image" in columns:
        from transformers import AutoImageProcessor

        source = processor_files(model_dir, "image_processor")
        processor = AutoImageProcessor.from_pretrained(source, **from_pretrained_kwargs(source))
        mode = "RGB" if len(getattr(processor, "image_mean", None) or [0, 0, 0]) == 3 else "L"

        def images(batch):
            return {"pixel_values": processor([img.convert(mode) for img in batch["image"]])["pixel_values"]}

        dataset = dataset.map(images, batched=True, remove_columns=["image"])
        return dataset.with_format("torch")
    from transformers import AutoTokenizer

    source = processor_files(model_dir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, **from_pretrained_kwargs(source))
    max_length = max_length or max_length_for(model_dir)[0]
    if text_column is None:
        text_column = next((c for c in columns if c != "labels" and isinstance(dataset[0][c], str)), None)
        if text_column is None:
            raise UsageError(f"no text column found among {', '.join(columns)}: name one with --text_column.")
    _column(text_column, "--text_column", columns)
    if text_pair_column is not None:
        _column(text_pair_column, "--text_pair_column", columns)

    def tokenize(batch, length=None):
        pair = batch[text_pair_column] if text_pair_column else None
        padding = "max_length" if length else False
        return tokenizer(batch[text_column], pair, truncation=True, max_length=length or max_length, padding=padding)

    lengths = dataset.map(lambda b: {"n": [len(ids) for ids in tokenize(b)["input_ids"]]}, batched=True,
                          remove_columns=columns)["n"]
    dataset = dataset.map(tokenize, batched=True, fn_kwargs={"length": max(lengths)},
                          remove_columns=[c for c in columns if c != "labels"])
    return dataset.with_format("torch")


def batches(dataset, batch_size: int, device="cpu", limit: int | None = None):
    """A function returning an iterable of dict batches of `dataset` on `device` (the first
    `limit` examples if given), as the analysis functions take them."""
    import torch

    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)

    def iterate():
        for batch in loader:
            yield {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    return iterate


#: What `--label_noise` does, for the scripts' help texts.
LABEL_NOISE_HELP = (
    "symmetric label noise on the training split only (Foret et al., SAM, ICLR 2021, section 3.3): exactly "
    "round(p * N) of the N training examples, chosen at random, get a label drawn uniformly from the other "
    "classes (never their own), so the realised noise fraction is p up to rounding; the evaluation data and the "
    "--holdout_fraction split keep their clean labels. Must lie in [0, 1); 0 = no noise")
LABEL_NOISE_SEED_HELP = ("the seed of the --label_noise draw (which examples, which new labels); default: --seed. "
                         "The same seed gives the same noisy labels; fix it to keep one noisy data set across seeds")


def check_label_noise(fraction, option="--label_noise"):
    """Refuse a noise fraction outside [0, 1) with a message naming `option` and the value."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise UsageError(f"{option} {fraction!r}: the share of training labels to replace must lie in [0, 1) "
                         "(0 = clean labels, 0.2 = 20% of them replaced)")
    return float(fraction)


def apply_label_noise(dataset, fraction: float, num_classes: int, seed: int, label_column: str = "labels"):
    """Symmetric label noise, as in SAM's noisy-label experiments (Foret et al., ICLR 2021, arXiv
    2010.01412, section 3.3): exactly ``round(fraction * N)`` of the N examples of `dataset`, chosen
    uniformly without replacement, get a new label drawn uniformly from the ``num_classes - 1``
    OTHER classes, so every replaced label differs from the original and the realised noise fraction
    is `fraction` up to rounding. `label_column` holds class ids 0 .. num_classes - 1. The draw uses
    ``numpy.random.default_rng(seed)`` alone: the same data, fraction and seed give the same noisy labels.

    Apply it to the training split only, after any held-out split is carved off (the example
    scripts do), so evaluation and held-out labels stay clean.

    Returns ``(noisy dataset, record)``; the dataset keeps its features and format, and the record
    holds ``label_noise`` (the fraction asked for), ``label_noise_seed``, ``label_noise_flipped``
    (the number of replaced labels) and ``label_noise_fraction`` (flipped / N, the realised fraction).
    """
    fraction = check_label_noise(fraction)
    record = {"label_noise": fraction, "label_noise_seed": int(seed), "label_noise_flipped": 0,
              "label_noise_fraction": 0.0}
    if fraction == 0:
        return dataset, record
    if num_classes < 2:
        raise UsageError(f"--label_noise {fraction}: the data has {num_classes} class(es); a label can only be replaced "
                         "by another class, so label noise needs two or more")
    if label_column not in dataset.column_names:
        raise UsageError(f"--label_noise: the training data has no {label_column!r} column to add noise to "
                         f"(its columns: {', '.join(dataset.column_names)})")
    labels = np.asarray(dataset.with_format(None)[label_column])
    if labels.dtype.kind not in "iu":
        raise UsageError(f"--label_noise {fraction}: the labels are {labels.dtype} values, not class ids; a regression "
                         "target (such as STS-B's scores) cannot be flipped: use --label_noise 0")
    bad = sorted({int(v) for v in labels if not 0 <= v < num_classes})
    if bad:
        raise UsageError(f"--label_noise: labels {bad[:5]} are not class ids of {num_classes} classes")
    n = len(labels)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    noisy = labels.copy()
    # label + k (mod C) with k uniform in 1 .. C-1: uniform over the other classes
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes

    form = dataset.format
    plain = dataset.with_format(None)
    feature = plain.features[label_column]
    out = plain.map(lambda batch, idx: {label_column: [int(noisy[i]) for i in idx]}, batched=True,
                    with_indices=True, features=plain.features)
    if form["type"] is not None or form["columns"] is not None:
        out = out.with_format(form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"],
                              **form["format_kwargs"])
    assert out.features[label_column] == feature
    record.update(label_noise_flipped=len(chosen), label_noise_fraction=len(chosen) / n if n else 0.0)
    return out, record
