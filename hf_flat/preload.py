"""A worker that runs a training script many times without paying its imports each time.

`hf-flat compare` trains dozens of short runs. Started as ``python SCRIPT ...``, each would spend
about 7 seconds importing torch, transformers and datasets before training for a few seconds. This
worker imports them once: it executes the script's own top-level ``import`` statements, then
serves one run per request by forking a child that runs the script as ``__main__`` with its
arguments (`runpy.run_path`), its output in the run's log file. Torch has run nothing in the
worker when it forks, so each child starts from the state a fresh interpreter would reach after
the same imports: same seeds, same thread count (`OMP_NUM_THREADS` is set before the imports),
same results (tested against fresh processes).

Protocol (one JSON object per line): compare writes ``{"argv": [SCRIPT, ARG, ...], "log": PATH}``
to the worker's stdin; the worker answers ``{"code": EXIT_STATUS}`` on the file descriptor given as
its first argument once the run has ended. A run that raises exits 1 with its traceback in the log.

    python hf_flat/preload.py FD SCRIPT      # started by compare, one per --jobs (imports only the stdlib)
"""

import ast
import json
import os
import runpy
import sys
import traceback


def preload(script):
    """Execute the script's top-level absolute imports (those that fail are left to the run)."""
    with open(script) as f:
        tree = ast.parse(f.read(), script)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            try:
                exec(compile(ast.Module([node], []), script, "exec"), {})
            except Exception as error:  # noqa: BLE001  (each run meets it again and reports it in its log)
                print(f"preload: {ast.unparse(node)} failed: {error!r}", file=sys.stderr)
    del sys.path[0]


def run_child(argv, log):
    """In the forked child: the script as `python SCRIPT ARGS...` would run it; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)  # fd 0 is the worker's request pipe: not for the run
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(os.devnull)
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  (what python itself would print)
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(answer_fd, script):
    """Import what `script` imports, then fork one child per request on stdin."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA initialisation before a fork
    preload(script)
    answers = os.fdopen(answer_fd, "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()  # the answer pipe is the worker's: a run (or what it starts) must not hold it open
            run_child(request["argv"], request["log"])
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
