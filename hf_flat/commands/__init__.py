"""The `hf-flat` subcommands, one module each. Each module's `add_parser(subparsers)` registers
the command's arguments and its `run(args)` does the work; `compare` parses its own arguments
(its `main(argv)`, which `hf_flat.cli.main` hands them to). `COMMANDS` lists them in the order
`hf-flat --help` shows them."""

from . import compare, connect, interpolate, plane, report, sharpness, soup

COMMANDS = {
    "interpolate": interpolate, "plane": plane, "sharpness": sharpness, "connect": connect, "report": report,
    "soup": soup, "compare": compare,
}
