"""The model card's part on the flat method: tags and a section naming the method, its paper and
its settings (`FlatTrainerMixin.create_model_card` adds them to the base trainer's card)."""

from .args import FLAT_SETTINGS, METHOD_PAPERS

#: The heading of the section `create_model_card` adds.
FLAT_CARD_HEADING = "## Flat-minima training (hf-flat)"


def flat_tags(args) -> list[str]:
    """The model-card tags of a flat run: ``hf-flat`` and the names of its methods (none for 'none')."""
    parts = [p for p in (args.flat_perturbation, args.flat_averaging) if p]
    return ["hf-flat", *parts] if parts else []


def flat_card_section(args) -> str:
    """The model card's section on the flat method: what it is, its paper, and its settings."""
    parts = [p for p in (args.flat_perturbation, args.flat_averaging) if p]
    method = f"`flat_method={str(args.flat_method)!r}`"
    lines = [FLAT_CARD_HEADING, "", f"Trained with hf-flat (flat-minima methods for the Hugging Face Trainer), {method}:", ""]
    lines += [f"- {METHOD_PAPERS[p]}" for p in parts]
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | {getattr(args, name)!r} |" for p in parts for name in FLAT_SETTINGS[p]]
    return "\n".join(lines) + "\n"
