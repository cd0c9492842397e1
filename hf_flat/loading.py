"""Loading what the `hf-flat` analysis commands analyse: the saved model (a save_pretrained folder,
a Trainer checkpoint, or a PEFT adapter merged into its base model), with its live weights or the
average its checkpoint keeps in ``hf_flat_state.safetensors`` (`load_weights`, `load_average`), and
the data, processed with the model folder's own tokenizer or image processor (`prepare`). Mistakes
in what the user passed raise `UsageError` (`hf_flat.data`) with a one-line message.
"""

import json
import os

import torch

from .data import UsageError


def model_folder(path):
    """Refuse, in one line, a MODEL that is no saved model folder (a save_pretrained folder, a Trainer
    checkpoint, or a PEFT adapter folder, whose adapter_config.json names its base model)."""
    from .data import ADAPTER_CONFIG, adapter_base

    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such model folder; pass a folder written by save_pretrained or a Trainer "
                         "checkpoint (OUTPUT_DIR/checkpoint-N).")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        adapter_base(path)  # (a base that cannot be loaded is refused here, before any work)
    elif not os.path.isfile(os.path.join(path, "config.json")):
        checkpoints = sorted((n for n in os.listdir(path) if n.startswith("checkpoint-")),
                             key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)
        hint = f"; its checkpoints: {', '.join(checkpoints)}" if checkpoints else ""
        raise UsageError(f"{path} has no config.json (nor {ADAPTER_CONFIG} of a PEFT adapter), so it holds no saved "
                         f"model: pass a save_pretrained folder or a checkpoint-N folder{hint}.")
    return path


#: A PEFT adapter's ``task_type`` -> the transformers class it was trained on, over its base model.
ADAPTER_TASK_MODELS = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _load_transformers_model(path, task=None, num_labels=None):
    """The transformers model saved in `path` (a folder, or a Hub name in the cache): of the
    architecture its config.json names, or with the head of a PEFT adapter's `task` (``SEQ_CLS``,
    ...; with `num_labels` classes when given: a head the adapter itself holds)."""
    from transformers import AutoConfig
    import transformers

    from .data import from_pretrained_kwargs

    offline = from_pretrained_kwargs(path)
    if task in ADAPTER_TASK_MODELS:
        extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
        return getattr(transformers, ADAPTER_TASK_MODELS[task]).from_pretrained(path, **offline, **extra)
    config = AutoConfig.from_pretrained(path, **offline)
    architecture = (config.architectures or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise UsageError(f"{path}: config.json names no transformers architecture ({config.architectures!r}).")
    return getattr(transformers, architecture).from_pretrained(path, **offline)


def load_weights(path, device, weights="live"):
    """(model, description): the model saved in `path` with its live weights, or with the average its
    checkpoint keeps (`weights="averaged"`, `load_average`), in eval mode on `device`.

    A PEFT adapter folder (a LoRA run's output folder or checkpoint) is loaded over its base model
    (`adapter_base`: a local folder, or a Hub model in the cache) with `peft.PeftModel.from_pretrained`,
    its average (which holds the adapter's trainable weights, by their PEFT names) copied in, and
    merged into the base (`merge_and_unload`): the commands then see a plain transformers model whose
    every weight is analysed, as for a model saved whole."""
    from .data import adapter_base, adapter_task

    base = adapter_base(model_folder(path))
    if base is None:
        model = _load_transformers_model(path)
        described = load_average(model, path) if weights == "averaged" else "live (as saved)"
        return model.to(device).eval(), described
    from peft import PeftModel

    # the model the adapter was trained on: the base with its task's head (get_peft_model(AutoModelFor...(base)))
    model = PeftModel.from_pretrained(_load_transformers_model(base, *adapter_task(path)), path)
    described = load_average(model, path) if weights == "averaged" else "live (as saved)"
    try:
        merged = model.merge_and_unload()
    except (AttributeError, ValueError, TypeError) as error:
        raise UsageError(f"{path}: its {model.peft_config[model.active_adapter].peft_type} adapter cannot be merged "
                         f"into its base model ({error}); the commands analyse the merged weights, so they take "
                         "adapters that merge (LoRA and its variants).") from None
    merged.requires_grad_(True)  # as a model saved whole: every weight is analysed
    return merged.to(device).eval(), f"{described}; a PEFT adapter merged into its base model {base}"


def load_model(path, device):
    """The model saved in `path` with its live weights (a PEFT adapter: merged into its base model)."""
    return load_weights(path, device)[0]


def flat_state_file(path) -> str:
    """The checkpoint's hf_flat_state.safetensors (or, from `WeightAveraging` used as a callback on its
    own, hf_flat_averaging.safetensors), which --weights averaged reads."""
    from .averaging import AVERAGING_STATE_NAME
    from .trainer import FLAT_STATE_NAME

    for name in (FLAT_STATE_NAME, AVERAGING_STATE_NAME):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    raise UsageError(f"{path} has no {FLAT_STATE_NAME} (nor {AVERAGING_STATE_NAME}): --weights averaged needs a "
                     "Trainer checkpoint of an averaging run (swa, ema, lawa, wasam, ...); the final model such a run "
                     "saves already holds the average, so use --weights live for it.")


def load_average(model, path) -> str:
    """Copy the averaged weights that the checkpoint `path` keeps in its flat state file into `model`;
    return a description. The file is read as the trainer reads it on resume
    (`WeightAveraging.load_state_dict`, one file or an FSDP run's shard files), and the value put
    into each parameter is `WeightAveraging.value`: the SWA mean or the EMA, and for LAWA the mean of
    the window of the latest snapshots (``averaging.<slot>.<name>``), exactly what the trainer puts
    into the model at the end of training."""
    from .args import AVERAGING_METHODS
    from .averaging import WeightAveraging
    from .state_file import load_flat_state, shape_in_state

    file = flat_state_file(path)
    tensors, meta = load_flat_state(file)
    method = meta.get("averaging")
    keys = [k for k in tensors if k.startswith("averaging.")]
    if method is None or not keys:
        raise UsageError(f"{file} holds no averaged weights (flat_method={meta.get('flat_method')!r}: no averaging, "
                         "or no snapshot taken yet); use --weights live.")
    if method not in AVERAGING_METHODS:
        raise UsageError(f"{file} holds averaging={method!r}, which this hf-flat does not know (it reads "
                         f"{', '.join(AVERAGING_METHODS)}): use the hf-flat version that wrote it, or --weights live.")
    slots = int(meta["averaging_window"]) if "averaging_window" in meta else None
    if "averaging_names" in meta:
        names = json.loads(meta["averaging_names"])
    else:  # a file written without the list: the names from the keys
        names = sorted({k.split(".", 2)[-1] if slots is not None else k[len("averaging."):] for k in keys})
    if slots == 0 or not names:
        raise UsageError(f"{file} holds no averaged weights yet (no snapshot taken); use --weights live.")
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise UsageError(f"{file}: the average holds parameter {unknown[0]}, which the model in {path} lacks "
                         f"({len(unknown)} such); --weights averaged needs the checkpoint of the model that was trained.")
    for name in names:
        key = f"averaging.{name}" if slots is None else f"averaging.0.{name}"
        if key not in tensors:
            raise UsageError(f"{file} lists {name} among the averaged weights but holds no {key}: the file is "
                             "incomplete; use another checkpoint.")
        if tuple(shape_in_state(tensors, key)) != tuple(params[name].shape):
            raise UsageError(f"{file}: the averaged {name} has shape {tuple(shape_in_state(tensors, key))} but the "
                             f"model in {path} has {tuple(params[name].shape)}.")
    averaging = WeightAveraging(method, k=max(1, slots or 1), on_cpu=True)
    averaging.restore(params, tensors, {**meta, "averaging_names": json.dumps(names),
                                        "averaging_count": meta.get("averaging_count", "0")})
    with torch.no_grad():
        for name in averaging.names():
            params[name].copy_(averaging.value(name).to(params[name].device, params[name].dtype))
    count = meta.get("averaging_count", "?")
    if slots is not None:
        return f"averaged (lawa, the mean of its window of the latest {slots} of {count} snapshots, from {file})"
    return f"averaged ({method}, {count} snapshots/updates, from {file})"


def model_name(path, weights="live") -> str:
    """A short name for plots and summaries: the folder, with its parent for a checkpoint."""
    parts = os.path.normpath(path).split(os.sep)
    name = os.sep.join(parts[-2:]) if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]
    return f"{name} (averaged weights)" if weights == "averaged" else name


def prepare(args, model_dir, need_eval=True):
    """{"train": (dataset, batches), "eval": ..., "notes": [...], "max_length": int | None} for the
    command's --data, processed with `model_dir`'s tokenizer or image processor."""
    from .data import batches, load_splits, max_length_for, preprocess

    splits = load_splits(args.data, args.data_config, args.train_split, args.eval_split)
    prepared = {"notes": [splits["note"]] if splits.get("note") and need_eval else [], "max_length": None}
    for name, limit in (("train", args.max_train_samples), ("eval", args.max_eval_samples)):
        if name == "eval" and not need_eval:
            continue
        if splits.get(name) is None:
            wanted = args.train_split if name == "train" else f"{args.eval_split}' or 'validation"
            found = ", ".join(splits.get("splits") or []) or "none"
            raise UsageError(f"--data {args.data}: no '{wanted}' split (found: {found}); name one with "
                             f"--{'train' if name == 'train' else 'eval'}_split, or add the file.")
        dataset = splits[name]
        if prepared["max_length"] is None and "image" not in dataset.column_names and "pixel_values" not in dataset.column_names:
            prepared["max_length"], note = max_length_for(model_dir, args.max_length)
            prepared["notes"] += [note] if note else []
        dataset = preprocess(dataset, model_dir, args.text_column, args.text_pair_column, args.label_column,
                             prepared["max_length"])
        if len(dataset) == 0:
            raise UsageError(f"--data {args.data}: the {name} split is empty.")
        prepared[name] = (dataset, batches(dataset, args.batch_size, args.device, limit))
    return prepared


def has_batchnorm(model):
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def save_processors(source, output_dir) -> list[str]:
    """Save `source`'s tokenizer (when it has tokenizer files) and copy its preprocessor_config.json
    (image processor / feature extractor) into `output_dir`, where `prepare` and users look for them;
    return what was saved. For a PEFT adapter folder without them: its base model's."""
    import shutil

    from .data import adapter_base, from_pretrained_kwargs, processor_files

    saved = []
    try:
        tokenizer = processor_files(source, "tokenizer")
    except UsageError:  # no tokenizer (an image model)
        tokenizer = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer, **from_pretrained_kwargs(tokenizer)).save_pretrained(output_dir)
        saved.append("tokenizer")
    folders = [source] + [base for base in [adapter_base(source)] if base is not None and os.path.isdir(base)]
    for name in ("preprocessor_config.json", "processor_config.json"):
        found = next((os.path.join(f, name) for f in folders if os.path.isfile(os.path.join(f, name))), None)
        if found is not None:
            shutil.copyfile(found, os.path.join(output_dir, name))
            saved.append(name)
    return saved
