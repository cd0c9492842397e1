"""`hf-flat`: loss-surface analysis of saved models from the command line.

    hf-flat interpolate MODEL_A MODEL_B --data digits --output_dir out/interp
    hf-flat plane MODEL --data glue --data_config sst2 --eval_split validation --output_dir out/plane
    hf-flat sharpness MODEL --data my_data.csv --rho 0.05 --m 128 --n 4 --output_dir out/sharp
    hf-flat connect MODEL_A MODEL_B --data digits --curve bezier --output_dir out/connect
    hf-flat report MODEL_1 MODEL_2 [...] --data digits [--curves out/connect] --output_dir out/report
    hf-flat soup MODEL_1 MODEL_2 MODEL_3 [--greedy --data my_data --metric accuracy] --output_dir out/soup
    hf-flat compare --script examples/vit/run_vit.py --methods none sam ... (see `hf-flat compare -h`)

MODEL is a `save_pretrained` folder or a Trainer checkpoint (with `--weights averaged`, the SWA /
EMA / LAWA / WASAM average a checkpoint holds; LAWA's: the mean of its window), or the output folder
or a checkpoint of a PEFT (LoRA) run: the adapter is loaded over the base model its
adapter_config.json names (a local folder, or a Hub model already in the cache: nothing is
downloaded) and merged into it. --data is `digits` (built in), a local CSV / JSON file
(used as both the train and the test set) or folder (train.csv, test.csv), an image folder, or a
`datasets` name; text and images are processed with the model folder's own tokenizer / image
processor. Every number goes to `<output_dir>/results.json`, the plots to PNG files beside it;
`soup` also saves the averaged model there (a save_pretrained folder with the first model's
tokenizer / image processor).
"""

import argparse
import sys

from .commands import COMMANDS
from .commands._common import HelpFormatter
from .data import UsageError


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-flat", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    """Console entry point: `hf-flat compare ...` or an analysis command (results in the output
    folder). Mistakes in the arguments or data end with a one-line message and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from .commands.compare import main as compare

        return compare(argv[1:])
    try:
        run(argv)
    except UsageError as error:
        print(f"hf-flat {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # from the libraries, e.g. a model folder that does not load
        print(f"hf-flat {argv[0]}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


def run(argv=None) -> dict:
    """Parse `argv`, run the analysis, write results.json and the plots; return the results."""
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        raise UsageError("run `hf-flat compare ...` through main(), the console entry point.")
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
