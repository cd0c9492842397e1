"""`hf-flat compare`: run a training script over methods and seeds and print a results table.

    hf-flat compare --script examples/vit/run_vit.py --methods none swa sam wasam --seeds 0 1 2 \\
        --grid sam_rho=0.02,0.05,0.1 --grid average_start=0.5,0.75 --output_dir out/compare -- --num_train_epochs 10

The table and the tuning protocol follow Kaddour, Liu, Silva, Kusner, "When Do Flat Minima
Optimizers Work?", NeurIPS 2022, arXiv 2202.00661 (its arXiv version, "Questions for Flat-Minima
Optimization of Modern Neural Networks": Tables 1 and 2, section 5).

Any script works that takes the `FlatTrainingArguments` flags (`--flat_method`, `--seed`,
`--output_dir`, `--sam_rho`, ...) and writes the Trainer's `all_results.json` or
`eval_results.json` into its output folder. Each run is
``SCRIPT [--config file] [arguments after --] --flat_method M --seed S [grid values] --output_dir DIR``;
its output is streamed to stderr (``--quiet``: one line per run) and kept in ``DIR/log.txt``.

Before training, compare checks its names: the methods, and every ``--grid`` name against the
flags the script's ``--help`` lists. ``--metric`` is checked on the first run that finishes: a
name not in its results stops compare with the list of the numeric keys it has.

With ``--grid``, each method's tunable values are chosen first on a held-out part of the training
data. A flat-minima argument goes only to the methods whose runs it changes (`applies`: the
arguments `hf_flat.args.FLAT_SETTINGS` lists for each part of a method, e.g. ``sam_rho`` for the
two-pass methods, ``average_freq`` for SWA and LAWA, ``swa_lr`` for every averaging method,
``saf_*`` for SAF), and compare says which methods a global ``--grid`` skips; any other flag
(``learning_rate``) goes to every method but ``none``. Tuning: one run per combination with
``--holdout_fraction`` and the first seed (or once per ``--tuning_seeds`` seed: the best mean held-out
score wins, and the table says for how many tuning seeds it was also their own best); the chosen
combination is then run with every seed on the real evaluation set. A method whose tuning runs all fail is left out of the table and counted as failed.

The table: the baseline (the first method) as mean +- standard error over seeds; every other
method as its difference to the baseline +- the unpaired standard error of that difference,
``sqrt(se_method^2 + se_baseline^2)``, and, in the last column, the paired difference: the mean of
the per-seed differences d_s = method_s - baseline_s over the seeds both ran, +- sd(d_s) / sqrt(n).
Every method runs on the same seeds and a seed fixes initialisation and data order, so the paired
SE is the one that measures the difference; seeds one side lacks (a failed run) are left out of
the pair, and the output names them. In bold: the best method, and every method whose per-seed
gap to the best, averaged over their common seeds, is within one paired SE of zero. ``--percent auto`` shows a metric x 100
when its name says it is a fraction (accuracy, f1, exact_match, matthews, pearson, ...) and every
value lies in [-1, 1]; losses and other metrics are shown as they are. Warnings a run's
``all_results.json`` records in ``flat_warnings`` (such as an averaging run that took a single
snapshot) mark the method's row with a dagger and are listed under the table.

``--grid METHOD:NAME=V1,V2`` gives one method its own values (ASAM's radii are ten times SAM's),
replacing a grid of the same name for that method. A method whose grid has a single combination
(``--grid wasam:sam_rho=0.05``) runs with it and no tuning runs: that is how to fix settings chosen
elsewhere.

Runs are started ``--jobs`` at a time (default 1), each on ``--threads`` CPU threads (default: the
CPUs / jobs). Each run is forked from a worker process (``hf_flat/preload.py``, one per job) that
has executed the script's top-level imports once, which saves the ~7 s that importing torch,
transformers and datasets takes per run; a forked run gives the numbers a fresh process gives
(tested to the bit), and ``--fresh_processes`` starts each run as ``python SCRIPT ...`` instead.

A run is reused, and said to be, when a finished run with the same command exists: the script,
the config file's contents, the arguments after ``--``, the method, the seed and the grid values
(each command has its own folder, ``runs/<name>-<hash>``). Exit status: 0 when every run worked,
1 when some failed (the table is still written), 2 for a mistake in the command.
"""

import argparse
import codecs
import contextlib
import concurrent.futures
import csv
import difflib
import hashlib
import itertools
import json
import math
import os
import queue
import re
import select
import subprocess
import sys
import time

#: Flags compare sets for every run itself: they may not appear after ``--`` or in ``--grid``.
OWN_FLAGS = ("flat_method", "seed", "output_dir", "holdout_fraction")
#: `--percent auto`: a metric whose name contains one of these is a fraction (if it lies in [-1, 1]).
FRACTION_NAMES = ("accuracy", "f1", "exact_match", "matthews", "pearson", "spearman", "precision", "recall", "auc")
RESULT_FILES = ("all_results.json", "eval_results.json")
WARNING_MARK = "†"


class UserError(Exception):
    """A mistake in the command: `main` prints its one-line message and returns 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written; every flag's help ends with its default, or '(required)'."""

    def _get_help_string(self, action):
        return action.help + " (required)" if action.required else super()._get_help_string(action)


def build_parser():
    usage = "hf-flat compare --script SCRIPT --output_dir DIR [options] [-- script arguments]"
    parser = argparse.ArgumentParser(prog="hf-flat compare", usage=usage, description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--script", required=True, help="the training script (python file)")
    parser.add_argument("--methods", nargs="+", default=["none", "swa", "sam", "wasam"],
                        help="flat_method values to compare; the first is the baseline")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="a run per method and seed")
    parser.add_argument("--metric", default="eval_accuracy",
                        help="key in the script's all_results.json / eval_results.json")
    parser.add_argument("--lower_is_better", action="store_true", help="for losses, error rates, perplexities")
    parser.add_argument("--percent", choices=("auto", "yes", "no"), default="auto",
                        help="show the metric x 100: auto = when its name names a fraction (accuracy, f1, exact_match, "
                        "matthews, pearson, ...) and every value lies in [-1, 1]")
    parser.add_argument("--grid", action="append", default=[], metavar="[METHOD:]NAME=V1,V2",
                        help="values to choose from on held-out data, e.g. sam_rho=0.02,0.05,0.1 (repeatable); "
                        "NAME must be a flag of the script. With METHOD: (e.g. asam:sam_rho=0.5,1.0) for that "
                        "method only, replacing a grid of the same NAME for every method. A method whose grid "
                        "has one combination runs it without tuning runs")
    parser.add_argument("--holdout_fraction", type=float, default=0.1,
                        help="share of the training data the --grid runs evaluate on")
    parser.add_argument("--tuning_seeds", nargs="+", type=int, default=None,
                        help="seeds of the --grid runs (default: the first of --seeds). With several, each "
                        "combination runs once per seed (a seed also fixes the script's held-out split when it "
                        "draws it by seed, as the example scripts do), the best mean held-out score is chosen, and "
                        "the table says how many tuning seeds' own best it was: how stable the choice is")
    parser.add_argument("--config", default=None, metavar="FILE.json",
                        help="a JSON config given to the script as its first argument "
                        "(SCRIPT FILE.json --flag value ...)")
    parser.add_argument("--output_dir", required=True, help="runs go to OUTPUT_DIR/runs, the table beside them")
    parser.add_argument("--python", default=sys.executable, help="the python that runs the script")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each run (OMP_NUM_THREADS, MKL_NUM_THREADS): floating-point sums, and "
                        "so the trained weights, depend on it. Default: the CPUs this process may use. Part of the "
                        "key under which finished runs are reused, and recorded in comparison.json")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; --threads then defaults to the CPUs / jobs. With jobs > 1 each run's "
                        "output goes to its log.txt only")
    parser.add_argument("--fresh_processes", action="store_true",
                        help="start each run as `python SCRIPT ...` instead of forking it from a worker that has "
                        "done the script's imports once (hf_flat.preload; saves ~7 s of imports per run)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not stream each run's output to stderr (it is still in its log.txt)")
    return parser


def add_parser(subparsers):
    """`hf-flat compare` in `hf-flat --help`: its arguments are parsed by `main` (`build_parser`)."""
    p = subparsers.add_parser("compare", help="train and compare flat-minima methods with an example script "
                              "(see `hf-flat compare -h`)", add_help=False)
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="the arguments of `hf-flat compare`")


def parse(argv):
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.extra = extra
    args.grid, args.method_grid = _parse_grids(args.grid)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    if args.threads is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.threads = max(1, cpus // args.jobs)
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    return args


def _parse_grids(texts):
    """({name: values} for every method, {method: {name: values}} for one method) from the --grid texts."""
    grid, method_grid = {}, {}
    for text in texts:
        name, _, values = text.partition("=")
        method, _, name = name.strip().rpartition(":")
        name = name.strip().lstrip("-")
        values = [v.strip() for v in values.split(",")]
        if not name or not all(values) or (":" in text.partition("=")[0] and not method.strip()):
            raise UserError(f"--grid {text!r}: expected [METHOD:]NAME=V1,V2,... (for example sam_rho=0.02,0.05,0.1 "
                            "or asam:sam_rho=0.5,1.0)")
        target = method_grid.setdefault(method.strip(), {}) if method else grid
        where = f"{method.strip()}:{name}" if method else name
        if name in target:
            raise UserError(f"--grid {where}: given twice; put all its values in one --grid {where}=V1,V2,...")
        target[name] = values
    return grid, method_grid


def applies(name, method):
    """Whether the flat-minima argument `name` changes a run of `method`: True or False for a flat
    field of `FlatTrainingArguments`, None for any other argument (learning_rate, ...).

    The arguments each part of a flat_method reads are `hf_flat.args.read_settings` (what the
    example scripts record as ``flat_settings``, and what FlatTrainingArguments warns about when
    set for a method that does not read them): e.g. ``average_freq`` for SWA and LAWA (their
    snapshot period), ``lawa_k`` for LAWA, SWA's schedule (``swa_lr``, ...) for every averaging
    method, ``sam_m`` / ``sam_scope`` / ``sam_interval`` for the two-pass methods that take them (not
    LookSAM, and ESAM not the first two, which FlatTrainingArguments refuses there); with
    ``average_on_cpu`` for every averaging method."""
    import dataclasses

    from ..args import FlatArgumentsMixin, read_settings

    flat = {f.name for f in dataclasses.fields(FlatArgumentsMixin)} - {"flat_method"}
    if name not in flat:
        return None
    return name in read_settings(method)


def _changed_by(name, methods) -> list[str]:
    """The methods among `methods` whose runs the flat argument `name` changes."""
    return [m for m in methods if applies(name, m)]


def tunable(method, grid, method_grid=None):
    """The grid entries that apply to `method`: its own flat-minima arguments, and any other flag
    (such as learning_rate) for every method but 'none'; then `method_grid[method]` (given for this
    method alone), whose entries replace those of the same name."""
    keep = {}
    for name, values in grid.items():
        own = applies(name, method)
        if own or (own is None and method != "none"):
            keep[name] = values
    keep.update((method_grid or {}).get(method, {}))
    return keep


def script_flags(args, runner):
    """The flags the script accepts, read from its ``--help`` (both ``--a_b`` and ``--a-b`` spellings),
    run the way the runs are run (`runner`: in a preloaded worker, or a fresh process)."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "script-help.txt")
    code = runner.run([args.script, "--help"], path, echo=False)
    with open(path, errors="replace") as f:
        text = f.read()
    flags = set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", text))
    if code != 0 or not flags:
        last = text.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"`{args.script} --help` failed (exit code {code}: {last[0]}); "
                        "compare needs it to check the flags; run it by hand to see why")
    return flags | {f.replace("-", "_") for f in flags}


def check_command(args, log, runner):
    """Every check that needs no training; raises `UserError` with what to do."""
    from ..args import parse_flat_method

    if not os.path.isfile(args.script):
        raise UserError(f"--script {args.script}: no such file; give the path of the training script")
    if args.config and not (os.path.isfile(args.config) and args.config.endswith(".json")):
        raise UserError(f"--config {args.config}: no such .json file; give the path of the script's JSON config")
    for method in args.methods:
        try:
            parse_flat_method(method)
        except ValueError as error:
            raise UserError(f"--methods: {error}") from None
    if args.tuning_seeds is None:
        args.tuning_seeds = args.seeds[:1]
    if len(set(args.methods)) != len(args.methods) or len(set(args.seeds)) != len(args.seeds) or (
            len(set(args.tuning_seeds)) != len(args.tuning_seeds)):
        raise UserError("--methods / --seeds / --tuning_seeds: a value is given twice; give each once")
    if (args.grid or args.method_grid) and not 0 < args.holdout_fraction < 1:
        raise UserError(f"--holdout_fraction {args.holdout_fraction}: must lie in (0, 1) for --grid")
    names = set(args.grid) | {n for g in args.method_grid.values() for n in g}
    given = {a[2:].split("=")[0].replace("-", "_") for a in args.extra if a.startswith("--")}
    for name in sorted(given & (set(OWN_FLAGS) | names)):
        where = "--grid" if name in names else "compare"
        raise UserError(f"--{name} after '--': {where} sets it for every run; remove it from the script arguments")
    for method in args.method_grid:
        if method not in args.methods:
            raise UserError(f"--grid {method}:...: {method!r} is not one of --methods ({' '.join(args.methods)})")
    for name in sorted(names):
        if name in OWN_FLAGS:
            raise UserError(f"--grid {name}: compare sets --{name} itself; it cannot be tuned")
    accepted = script_flags(args, runner)
    needed = ["flat_method", "seed", "output_dir"] + (["holdout_fraction"] if names else [])
    for name in needed:
        if name not in accepted:
            raise UserError(f"--script {args.script} has no --{name} flag, which compare passes to every run"
                            + (" with --grid" if name == "holdout_fraction" else "") + "; add it to the script")
    for name in sorted(names):
        if name not in accepted:
            close = difflib.get_close_matches(name, sorted(f for f in accepted if "-" not in f), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(f"--grid {name}: {args.script} has no --{name} flag{hint}; "
                            f"see `python {args.script} --help`")
    for method, grid in args.method_grid.items():
        for name in grid:
            if applies(name, method) is False:
                others = _changed_by(name, args.methods)
                where = (f"give it to those it changes, e.g. --grid {others[0]}:{name}=..." if others else
                         f"it changes none of --methods {' '.join(args.methods)}")
                raise UserError(f"--grid {method}:{name}: {name} does not change a run of {method}, so it cannot be "
                                f"tuned for it; {where} (it applies to: {', '.join(others) or 'none of them'})")
    for name in args.grid:
        tuned = [method for method in args.methods if tunable(method, {name: []})]
        if not tuned:
            log(f"warning: --grid {name} applies to none of the methods {' '.join(args.methods)}: it is not tuned")
        elif len(tuned) < len(args.methods):
            skipped = [m for m in args.methods if m not in tuned]
            why = ("whose runs it does not change" if applies(name, skipped[0]) is False
                   else "which runs with the script's own values")  # ('none', for a flag of every method)
            log(f"--grid {name}: tuned for {', '.join(tuned)}; not for {', '.join(skipped)}, {why} (give a method "
                f"its own values with --grid METHOD:{name}=...)")


def run_folder(args, name, flags):
    """The run's command (without --output_dir) and its folder `runs/<name>-<hash of the command>`."""
    command = [args.script, *([args.config] if args.config else []), *args.extra, *flags]
    key = {"script": os.path.abspath(args.script), "arguments": command[1:], "json files": {}, "threads": args.threads}
    for path in command[1:]:  # a config's contents are part of the command
        if path.endswith(".json") and os.path.isfile(path):
            with open(path) as f:
                key["json files"][path] = f.read()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return command, os.path.join(args.output_dir, "runs", f"{name}-{digest}")


def run_one(args, name, flags, settings, log, runner):
    """Run the script once, or reuse the finished run of the same command. Returns its record: `metrics`
    (and `reused`) when it worked, `failed` (the reason) when it did not."""
    command, out = run_folder(args, name, flags)
    record = {"name": name, "folder": out, "settings": settings, "command": command}
    done = os.path.join(out, "hf_flat_compare_done.json")
    if os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved.get("command") == command:
            log(f"  reused {out}: it finished before with the same command")
            check_metric(args, saved["metrics"], out)
            return {**record, "metrics": saved["metrics"], "seconds": saved.get("seconds"), "reused": True}
    os.makedirs(out, exist_ok=True)
    for stale in RESULT_FILES:  # a retried run must not be read from an earlier attempt's files
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    start = time.time()
    logpath = os.path.join(out, "log.txt")
    code = runner.run([*command, "--output_dir", out], logpath)
    seconds = round(time.time() - start, 1)
    if code != 0:
        log(f"  FAILED {name} (exit code {code}) after {seconds} s; see {logpath}")
        return {**record, "failed": f"exit code {code}", "log": logpath}
    metrics = _read_metrics(out)
    if metrics:  # finished: reusable under any --metric
        with open(done, "w") as f:
            json.dump({"command": command, "metrics": metrics, "seconds": seconds}, f, indent=1)
    check_metric(args, metrics, out)
    log(f"  finished {name} in {seconds} s: {args.metric} = {metrics[args.metric]}")
    return {**record, "metrics": metrics, "seconds": seconds, "reused": False}


class Runner:
    """Starts the runs, `--jobs` at a time: each forked from a worker that has done the script's
    imports once (`hf_flat.preload`), or with `--fresh_processes` as `python SCRIPT ...`. Either way
    the run gets `--threads` CPU threads and its output goes to its log.txt, and to stderr as it
    comes when one run is started at a time and --quiet is not given."""

    def __init__(self, args):
        self.args, self.idle, self.workers = args, queue.Queue(), []
        self.echo = not args.quiet and args.jobs == 1
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def run(self, argv, logpath, echo=None):
        """Run SCRIPT ARGS... (`argv`); its exit code (negative: killed by that signal)."""
        echo = self.echo if echo is None else echo
        if self.args.fresh_processes:
            return _run_logged([self.args.python, *argv], logpath, echo, self.env)
        try:
            worker = self.idle.get_nowait()
        except queue.Empty:
            worker = _Worker(self.args, self.env)
            self.workers.append(worker)
        try:
            return worker.run(argv, logpath, echo)
        finally:
            if worker.alive():
                self.idle.put(worker)

    def close(self):
        for worker in self.workers:
            worker.close()


class _Worker:
    """One `python hf_flat/preload.py` process: a run per request, forked after the imports."""

    def __init__(self, args, env):
        read, write = os.pipe()
        os.makedirs(args.output_dir, exist_ok=True)
        self.stderr = open(os.path.join(args.output_dir, "preload-worker.log"), "ab")
        # the file itself, not `-m hf_flat.preload`: the worker imports what the script imports, nothing more
        preload = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "preload.py")
        self.process = subprocess.Popen([args.python, preload, str(write), args.script],
                                        stdin=subprocess.PIPE, stdout=self.stderr, stderr=self.stderr,
                                        pass_fds=(write,), env=env, text=True)
        os.close(write)
        self.answers = os.fdopen(read)

    def alive(self):
        return self.process.poll() is None

    def run(self, argv, logpath, echo):
        self.process.stdin.write(json.dumps({"argv": argv, "log": logpath}) + "\n")
        self.process.stdin.flush()
        shown, decoder = 0, codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            ready = select.select([self.answers], [], [], 0.2)[0]
            if echo and os.path.exists(logpath):  # the run's output as it comes
                with open(logpath, "rb") as f:
                    f.seek(shown)
                    chunk = f.read()
                shown += len(chunk)
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
            if ready:
                break
        line = self.answers.readline()
        if not line:  # the worker died (killed, out of memory): this run failed, the next gets a new worker
            self.close()
            return -1
        return json.loads(line)["code"]

    def close(self):
        with contextlib.suppress(OSError):  # a worker that died has closed its end already
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.answers.close()
        self.stderr.close()


def _run_all(args, tasks):
    """Call every task (a function of no arguments), `--jobs` at a time; their results in order."""
    if args.jobs == 1:
        return [task() for task in tasks]
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        futures = [pool.submit(task) for task in tasks]
        return [future.result() for future in futures]
    finally:  # a mistake found by one run (an unknown --metric) stops the others from starting
        pool.shutdown(wait=True, cancel_futures=True)


def _run_logged(command, logpath, echo, env):
    """Run `command` in the environment `env`, its output into `logpath` and, with `echo`, to stderr as
    it comes. Returns the exit code."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(logpath, "wb") as logfile:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            logfile.write(chunk)
            if echo:
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
        return process.wait()


def _read_metrics(folder):
    for name in RESULT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {}


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metric(args, metrics, out):
    """Stop compare (`UserError`) when a run that worked has no numeric `--metric`: every other run would too."""
    if not metrics:
        raise UserError(f"{args.script} exited 0 but wrote neither {' nor '.join(RESULT_FILES)} into {out}; "
                        "compare reads --metric from them")
    if not _is_number(metrics.get(args.metric)):
        keys = ", ".join(sorted(k for k, v in metrics.items() if _is_number(v))) or "none"
        raise UserError(f"--metric {args.metric}: not a number in the results of {out}; its numeric keys: {keys}")


def mean_and_se(values):
    """Mean and standard error (sample standard deviation / sqrt(n)); SE is 0 for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _by_seed(values):
    """{seed: score} from a dict, or from a list read as seeds 0, 1, 2, ... by position."""
    return dict(values) if isinstance(values, dict) else dict(enumerate(values))


def paired_difference(a: dict, b: dict):
    """Mean and standard error of the per-seed differences a[s] - b[s] over the seeds both have,
    and those seeds: the paired comparison (SE = sd(d_s) / sqrt(n); 0 for one seed, nan for none)."""
    common = sorted(set(a) & set(b))
    mean, se = mean_and_se([a[s] - b[s] for s in common])
    return mean, se, common


#: The table's legend, printed under it and written into comparison.md / comparison.json.
LEGEND = (
    "Baseline: mean ± standard error over seeds. Other methods: difference of means to the baseline ± the "
    "unpaired SE, sqrt(se_method² + se_baseline²). Paired: mean of the per-seed differences d_s = method_s − "
    "baseline_s over the seeds both ran ± the paired SE, sd(d_s) / √n, with the number of seeds paired (every "
    "method runs on the same seeds, which fix initialisation and data order). Bold uses the paired SE: the best "
    "method, and every method whose per-seed gap to the best, averaged over their common seeds, is within one "
    "paired SE of it."
)


def table(scores: dict, lower_is_better=False):
    """Rows of the table from {method: {seed: score}} (or {method: [score per seed]}, seeds by
    position; the first method is the baseline). Each row: `mean`, `se`, `n`, `seeds`; other
    methods also `difference` / `difference_se` (difference of means, unpaired SE) and
    `paired_difference` / `paired_difference_se` / `paired_seeds` (per-seed differences over the
    seeds both ran). `bold`: the best method, and every method whose paired gap to the best
    (`behind_best`, over `behind_best_seeds`) is at most its paired SE (`behind_best_se`); with no
    seed in common with the best, the best's own SE is used (`bold_rule` says which)."""
    by_seed = {m: _by_seed(v) for m, v in scores.items()}
    methods = list(by_seed)
    stats = {m: mean_and_se(list(v.values())) for m, v in by_seed.items()}
    valid = [m for m in methods if by_seed[m]]
    sign = -1 if lower_is_better else 1
    best = max(valid, key=lambda m: sign * stats[m][0]) if valid else None
    base = methods[0]
    base_mean, base_se = stats[base]
    rows = []
    for m in methods:
        mean, se = stats[m]
        row = {"method": m, "n": len(by_seed[m]), "seeds": sorted(by_seed[m]), "mean": mean, "se": se, "bold": False}
        if by_seed[m] and best is not None:
            gap, gap_se, common = paired_difference(by_seed[best], by_seed[m])
            if m == best:
                row["bold"], row["bold_rule"] = True, "best"
            elif common:
                row.update(behind_best=sign * gap, behind_best_se=gap_se, behind_best_seeds=common)
                row["bold"], row["bold_rule"] = sign * gap <= gap_se, "paired"
            else:  # nothing to pair with: the best's own standard error, as before
                row["bold"], row["bold_rule"] = sign * (stats[best][0] - mean) <= stats[best][1], "unpaired"
        if m != base:
            row["difference"] = mean - base_mean
            row["difference_se"] = math.sqrt(se**2 + base_se**2)
            d, d_se, common = paired_difference(by_seed[m], by_seed[base])
            row.update(paired_difference=d, paired_difference_se=d_se, paired_seeds=common)
        rows.append(row)
    return rows


def pairing_notes(rows):
    """Lines naming what was paired where a method's seeds differ from the baseline's or the best's."""
    notes = []
    if not rows:
        return notes
    base = rows[0]
    for r in rows[1:]:
        if r["n"] and set(r["seeds"]) != set(base["seeds"]):
            lacks = [f"{who['method']} lacks seed(s) {', '.join(map(str, missing))}" for who, missing in (
                (r, sorted(set(base["seeds"]) - set(r["seeds"]))), (base, sorted(set(r["seeds"]) - set(base["seeds"]))))
                if missing]
            used = ", ".join(map(str, r["paired_seeds"])) or "none"
            notes.append(f"{r['method']} vs {base['method']}: {'; '.join(lacks)}: paired over the common seeds only ({used})")
    for r in rows:
        if r.get("bold_rule") == "paired" and r["behind_best_seeds"] != r["seeds"]:
            notes.append(f"{r['method']} vs the best method: bold is decided on the common seeds only "
                         f"({', '.join(map(str, r['behind_best_seeds']))})")
        elif r.get("bold_rule") == "unpaired":
            notes.append(f"{r['method']}: no seed in common with the best method; its bold mark uses the best's "
                         "unpaired SE")
    return notes


def percent_scale(metric, values, mode="auto"):
    """100 when the metric is shown in percent, else 1: `mode` 'yes' / 'no', or 'auto' (see `--percent`)."""
    if mode != "auto":
        return 100.0 if mode == "yes" else 1.0
    name = metric.lower()
    fraction = any(word in name for word in FRACTION_NAMES) and "loss" not in name
    return 100.0 if fraction and values and all(-1 <= v <= 1 for v in values) else 1.0


def markdown(rows, metric, scale=1.0, marked=()):
    """The table as Markdown; scores shown x `scale` (100: percent, 2 decimals; else 4 significant
    digits). Methods in `marked` get a dagger: their runs logged warnings (listed under the table).
    Under the table: the legend (`LEGEND`: which SE each column shows, and that bold uses the
    paired one) and, where one side lacks seeds, which seeds were paired (`pairing_notes`)."""
    spec = ".2f" if scale == 100 else ".4g"
    header = f"{metric} (%)" if scale == 100 else metric
    lines = [f"| method | {header} (baseline) / difference to baseline ± unpaired SE | n "
             "| paired difference ± paired SE (seeds) |", "|---|---|---|---|"]
    for i, r in enumerate(rows):
        paired = "baseline" if i == 0 else "-"
        if r["n"] == 0:
            cell = "all runs failed"
        elif i == 0:
            cell = f"{scale * r['mean']:{spec}} ± {scale * r['se']:{spec}}"
        else:
            cell = f"{scale * r['difference']:+{spec}} ± {scale * r['difference_se']:{spec}}"
            if r["paired_seeds"]:
                paired = (f"{scale * r['paired_difference']:+{spec}} ± {scale * r['paired_difference_se']:{spec}} "
                          f"({len(r['paired_seeds'])})")
        if r["bold"]:
            cell = f"**{cell}**"
        mark = WARNING_MARK if r["method"] in marked else ""
        lines.append(f"| {r['method']}{mark} | {cell} | {r['n']} | {paired} |")
    lines += ["", LEGEND]
    notes = pairing_notes(rows)
    if notes:
        lines += ["", "Seeds missing on one side:", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def run_warnings(method, metrics):
    """The messages a run recorded in `flat_warnings`, plus one when it ran another method than asked."""
    from ..args import parse_flat_method

    found = [str(w) for w in metrics.get("flat_warnings") or []]
    ran = metrics.get("flat_method")
    if ran is not None and parse_flat_method(str(ran)) != parse_flat_method(method):
        found.append(f"the script ran flat_method={ran!r}, not {method!r} (does its config set flat_method?)")
    return found


def _settings_text(settings):
    return ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "-"


def report(args, rows, scale, chosen, warnings, failures, runs, tuning=None, stability=None):
    """comparison.md: the table, its warnings and failures, and the hyper-parameters each method ran with
    (with several tuning seeds: how many of them chose the same on their own)."""
    parts = [markdown(rows, args.metric, scale, marked=set(warnings))]
    notes = [f"{WARNING_MARK} {method}: {message} ({', '.join(names)})"
             for method, found in warnings.items() for message, names in found.items()]
    if notes:
        parts.append("Warnings the runs logged:\n\n" + "\n".join(f"- {n}" for n in notes))
    if failures:
        parts.append(f"{len(failures)} run(s) failed: " + ", ".join(f"{f['name']} ({f['failed']})" for f in failures))
    seeds = getattr(args, "tuning_seeds", None) or args.seeds[:1]
    lines = ["Hyper-parameters per method" + (f" (tuning seeds {', '.join(map(str, seeds))}: the best mean held-out "
                                              "score is chosen; in brackets, how many seeds' own best it is)"
                                              if len(seeds) > 1 else "") + ":", "",
             "| method | chosen on held-out data (--grid) | flat_settings of its runs |", "|---|---|---|"]
    for method in args.methods:
        picked = "tuning failed" if chosen[method] is None else _settings_text(chosen[method])
        if chosen[method] and method not in (tuning or {}):
            picked += " (given: one value each, not tuned)"
        elif len(seeds) > 1 and method in (stability or {}):
            agree = stability[method]["agree"]
            picked += f" ({agree} of {len(seeds)} tuning seeds)"
        used = next((r["metrics"].get("flat_settings") for r in runs if r["method"] == method and "metrics" in r), None)
        lines.append(f"| {method} | {picked} | {_settings_text(used) if isinstance(used, dict) else '-'} |")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _tune(args, log, runner):
    """({method: chosen setting, or None when no combination ran on every tuning seed}, {method: tuning
    runs}, {method: how stable the choice is}, failures). A method with one combination runs it as it is;
    more are each run once per tuning seed on held-out data, and the best mean held-out score wins."""
    grids = {m: tunable(m, args.grid, args.method_grid) for m in args.methods}
    combinations = {m: [dict(zip(g, values)) for values in itertools.product(*g.values())] for m, g in grids.items()}
    several = len(args.tuning_seeds) > 1
    tasks = []
    for method, settings in combinations.items():
        if len(settings) < 2:
            continue
        for i, setting in enumerate(settings, 1):
            for seed in args.tuning_seeds:
                def task(method=method, setting=setting, i=i, n=len(settings), seed=seed):
                    flags = ["--flat_method", method, "--seed", str(seed),
                             "--holdout_fraction", str(args.holdout_fraction)]
                    flags += [x for k, v in setting.items() for x in (f"--{k}", v)]
                    log(f"[tune {method} {i}/{n}" + (f" seed {seed}]" if several else "]") + f" {_settings_text(setting)}")
                    tag = "-".join(f"{k}{v}" for k, v in setting.items()) + (f"-seed{seed}" if several else "")
                    result = run_one(args, f"tune-{method}-{tag}", flags, setting, log, runner)
                    return method, setting, {**result, "seed": seed}
                tasks.append(task)
    chosen = {m: settings[0] for m, settings in combinations.items()}  # one combination (or none): as it is
    tuning, scores, failures, stability = {}, {}, [], {}
    sign = -1 if args.lower_is_better else 1  # scores: higher is better
    for method, setting, result in _run_all(args, tasks):
        tuning.setdefault(method, []).append(result)
        if "failed" not in result:
            scores.setdefault(method, {}).setdefault(_settings_text(setting), {})[result["seed"]] = (
                sign * result["metrics"][args.metric])
    for method in tuning:
        by_text = {_settings_text(s): s for s in combinations[method]}
        complete = {text: seeds for text, seeds in scores.get(method, {}).items() if len(seeds) == len(args.tuning_seeds)}
        if not complete:
            chosen[method] = None
            why = (f"all {len(tuning[method])} tuning runs failed" if not scores.get(method) else
                   "no combination ran on every tuning seed")
            failures.append({"name": f"tune-{method}", "method": method, "failed": f"{why}; {method} is not run"})
            log(f"[tune {method}] {why}: {method} is left out of the table (see the logs above)")
            continue
        # first of equal means wins, in grid order; so does each seed's own best
        order = [text for text in by_text if text in complete]
        means = {text: sum(complete[text].values()) / len(args.tuning_seeds) for text in order}
        best = max(order, key=lambda text: means[text])
        own = {seed: max(order, key=lambda text: complete[text][seed]) for seed in args.tuning_seeds}
        chosen[method] = by_text[best]
        stability[method] = {"seeds": list(args.tuning_seeds), "agree": sum(own[s] == best for s in own),
                             "each_seed_chose": {str(s): by_text[t] for s, t in own.items()},
                             "mean_scores": {t: sign * means[t] for t in order}}
        log(f"[tune {method}] chose {best}" + (f" (the best of {stability[method]['agree']} of "
                                                f"{len(args.tuning_seeds)} tuning seeds on their own)" if several else ""))
    return chosen, tuning, stability, failures


def compare(args, log, runner):
    """Tune, run every method and seed, write the table; the exit status (see the module docstring)."""
    os.makedirs(args.output_dir, exist_ok=True)
    chosen, tuning, stability, failures = _tune(args, log, runner)
    scores, runs, warnings = {m: {} for m in args.methods}, [], {}
    todo = [(seed, m) for seed in args.seeds for m in args.methods if chosen[m] is not None]

    def task(done, seed, method):
        log(f"[{done}/{len(todo)}] {method} seed {seed} {_settings_text(chosen[method])}")
        flags = ["--flat_method", method, "--seed", str(seed)]
        flags += [x for k, v in chosen[method].items() for x in (f"--{k}", v)]
        return {"method": method, "seed": seed,
                **run_one(args, f"{method}-seed{seed}", flags, chosen[method], log, runner)}

    runs = _run_all(args, [lambda d=d, s=s, m=m: task(d, s, m) for d, (s, m) in enumerate(todo, 1)])
    for result in runs:
        method = result["method"]
        if "failed" in result:
            failures.append(result)
            continue
        scores[method][result["seed"]] = result["metrics"][args.metric]
        for message in run_warnings(method, result["metrics"]):
            warnings.setdefault(method, {}).setdefault(message, []).append(result["name"])

    rows = table(scores, args.lower_is_better)
    scale = percent_scale(args.metric, [v for vs in scores.values() for v in vs.values()], args.percent)
    text = report(args, rows, scale, chosen, warnings, failures, runs, tuning, stability)
    print(text)
    with open(os.path.join(args.output_dir, "comparison.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as f:
        json.dump({"metric": args.metric, "threads": args.threads, "jobs": args.jobs,
                   "fresh_processes": args.fresh_processes, "shown_in_percent": scale == 100, "bold_uses": "paired SE",
                   "legend": LEGEND, "pairing_notes": pairing_notes(rows), "table": rows, "chosen": chosen,
                   "warnings": warnings, "tuning_seeds": args.tuning_seeds, "tuning": tuning, "stability": stability,
                   "runs": runs, "failures": failures}, f, indent=2)
    with open(os.path.join(args.output_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "status", args.metric, "settings", "reused", "folder"])
        for r in runs:
            writer.writerow([r["method"], r["seed"], r.get("failed", "ok"), r.get("metrics", {}).get(args.metric, ""),
                             json.dumps(r["settings"]), "reused" if r.get("reused") else "", r["folder"]])
    return 1 if failures else 0


def main(argv=None):
    """`hf-flat compare ...`; returns the exit status (see the module docstring)."""
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        runner = Runner(args)
        try:
            check_command(args, log, runner)
            return compare(args, log, runner)
        finally:
            runner.close()
    except UserError as error:
        print(f"hf-flat compare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-flat compare: interrupted; the finished runs are reused when the same command runs again",
              file=sys.stderr)
        return 130
