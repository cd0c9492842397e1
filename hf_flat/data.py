"""Data loading shared by the CLI and the example scripts.

`load_splits` takes a `datasets` name (`load_dataset(name, config)`), local files (CSV, JSON /
JSON lines, or an image folder) or the built-in `digits` task (scikit-learn's 1,797 8x8 digits,
offline), and `preprocess` turns examples into model inputs with the model's own tokenizer or
image processor.
"""

import os

import numpy as np


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


def load_splits(source: str, config: str | None = None, train_split="train", eval_split="test") -> dict:
    """{"train": Dataset, "eval": Dataset} from `source`: "digits", a local .csv / .json / .jsonl
    file or folder of such files, an image folder (one sub-folder per class), or a Hub data set name."""
    from datasets import load_dataset

    if source == "digits":
        splits = digits_splits()
        return {"train": splits["train"], "eval": splits["test"]}
    if os.path.exists(source):
        files = _split_files(source)
        if files:
            kind = "csv" if next(iter(files.values())).endswith(".csv") else "json"
            loaded = load_dataset(kind, data_files=files)
        else:
            loaded = load_dataset("imagefolder", data_dir=source)
    else:
        loaded = load_dataset(source, config)
    if eval_split not in loaded:  # a local folder may name it either way
        eval_split = next((name for name in ("test", "validation") if name in loaded), eval_split)
    return {"train": loaded[train_split] if train_split in loaded else None,
            "eval": loaded[eval_split] if eval_split in loaded else None}


def _split_files(path):
    """A single file is the train split; in a folder, files named after their split (train.csv,
    validation.json, test.jsonl)."""
    if os.path.isfile(path):
        return {"train": path}
    found = {}
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if ext in (".csv", ".json", ".jsonl") and stem in ("train", "validation", "test"):
            found[stem] = os.path.join(path, name)
    return found


def preprocess(dataset, model_dir, text_column=None, text_pair_column=None, label_column="label", max_length=128):
    """Model inputs for `dataset`: tokenized text (the model folder's tokenizer), processed images
    (its image processor), or arrays already called `pixel_values` / `input_ids`; labels as `labels`."""
    columns = dataset.column_names
    if label_column in columns and label_column != "labels":
        dataset = dataset.rename_column(label_column, "labels")
        columns = dataset.column_names
    if "pixel_values" in columns or "input_ids" in columns:
        return dataset.with_format("torch")
    if "image" in columns:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir)
        mode = "RGB" if len(getattr(processor, "image_mean", None) or [0, 0, 0]) == 3 else "L"

        def images(batch):
            return {"pixel_values": processor([img.convert(mode) for img in batch["image"]])["pixel_values"]}

        dataset = dataset.map(images, batched=True, remove_columns=["image"])
        return dataset.with_format("torch")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_column = text_column or next(c for c in columns if c != "labels" and isinstance(dataset[0][c], str))

    def tokenize(batch):
        pair = batch[text_pair_column] if text_pair_column else None
        return tokenizer(batch[text_column], pair, truncation=True, max_length=max_length, padding="max_length")

    keep = {"labels"}
    dataset = dataset.map(tokenize, batched=True, remove_columns=[c for c in columns if c not in keep])
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
