"""MkDocs hooks: the docs' generated parts, made from the code at every build so they cannot drift.

- ``<!-- arguments-table -->`` becomes the table of every flat-minima argument, read from the
  dataclass fields of `hf_flat.FlatArgumentsMixin` (name, type, default, the methods that read it,
  its help text, which states the allowed values).
- ``<!-- cli-help: COMMAND -->`` becomes ``hf-flat COMMAND --help`` (``<!-- cli-help -->``: ``hf-flat --help``),
  printed by the parser that the console script uses.

`tests/test_docs.py` imports this file: a field without help text fails there, and so does a page
whose generated part would be empty.
"""

import contextlib
import dataclasses
import io
import os
import re
import typing

#: The help of a field must say what it does; the table shows it as written.
MIN_HELP_LENGTH = 10


def flat_fields() -> list[dataclasses.Field]:
    """The flat-minima fields, in the order `FlatArgumentsMixin` declares them."""
    from hf_flat import FlatArgumentsMixin, FlatTrainingArguments
    from transformers import TrainingArguments

    own = set(FlatArgumentsMixin.__annotations__)
    fields = [f for f in dataclasses.fields(FlatTrainingArguments) if f.name in own]
    assert not own & {f.name for f in dataclasses.fields(TrainingArguments)}, "a flat field shadows a Trainer field"
    return fields


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    args = typing.get_args(annotation)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return annotation.__name__


def _used_by(name: str) -> str:
    from hf_flat.args import AVERAGING_METHODS, FLAT_SETTINGS

    if name == "flat_method":
        return "every method"
    methods = AVERAGING_METHODS if name == "average_on_cpu" else [m for m, s in FLAT_SETTINGS.items() if name in s]
    return ", ".join(f"`{m}`" for m in methods)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def arguments_table() -> str:
    """The Markdown table of every flat-minima argument."""
    rows = ["| argument | type | default | used by | what it does (allowed values) |", "|---|---|---|---|---|"]
    for f in flat_fields():
        help_text = f.metadata.get("help", "")
        if len(help_text.strip()) < MIN_HELP_LENGTH:
            raise ValueError(f"FlatArgumentsMixin.{f.name} has no help text: add metadata={{'help': ...}}")
        rows.append(
            f"| `{f.name}` | `{_type_name(f.type)}` | `{f.default!r}` | {_used_by(f.name)} | {_cell(help_text)} |"
        )
    return "\n".join(rows)


def cli_help(command: str | None = None) -> str:
    """What ``hf-flat [COMMAND] --help`` prints, at a fixed width of 100 columns."""
    from hf_flat.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        if command == "compare":  # it parses its own arguments (the top-level parser only hands them over)
            from hf_flat.commands.compare import build_parser as compare_parser

            parser = compare_parser()
        elif command is not None:
            subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
            parser = subparsers.choices[command]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            parser.print_help()
        return out.getvalue().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render(markdown: str) -> str:
    """`markdown` with every generated part filled in."""
    markdown = markdown.replace("<!-- arguments-table -->", arguments_table())

    def help_block(match):
        return "```text\n" + cli_help(match.group(1)) + "\n```"

    return re.sub(r"<!-- cli-help(?:: (\w+))? -->", help_block, markdown)


def on_page_markdown(markdown, page, config, files):  # the MkDocs hook
    return render(markdown)


if __name__ == "__main__":  # print the generated arguments table, for readers of the Markdown
    print(arguments_table())
