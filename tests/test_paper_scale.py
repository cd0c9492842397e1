"""benchmarks/paper_scale.py --tiny: the paper-scale benchmark's code path, with tiny configs, so it cannot rot."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "paper_scale.py")


def test_paper_scale_tiny(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import paper_scale

    out, md = tmp_path / "ps.json", tmp_path / "ps.md"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--output", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["arch"], r["method"]): r for r in data["results"]}
    expected = {(a, m) for a in paper_scale.ARCHS for m in paper_scale.METHODS
                if not (a == "fid" and m in paper_scale.FID_REFUSED)}
    assert set(rows) == expected
    for key, r in rows.items():
        for name in ("ratio", "step_s", "peak_extra_mb", "extra_over_plain_mb", "seconds_per_sample"):
            assert isinstance(r[name], (int, float)) and math.isfinite(r[name]), (key, name, r[name])
        assert r["ratio"] > 0 and r["batch"] == 2 and len(r["steps_s"]) == 2
        e = r["extrapolation"]
        assert math.isfinite(e["paper_peak_mb"]) and all(math.isfinite(x["hours"]) for x in e["runs"])
    assert rows[("vit", "plain")]["ratio"] == 1.0
    assert rows[("fid", "plain")]["passages"] == 2
    assert rows[("roberta", "sam_interval2")]["perturbed_steps"] == [1]
    assert math.isfinite(rows[("roberta", "sam_interval2")]["ratio_interval5_estimate"])
    # the Markdown table has a row per architecture x method, and states the batch used and the paper's
    text = md.read_text()
    for arch, method in expected:
        assert f"| {arch} | {method} |" in text
    assert "paper: 100" in text and "paper: 16" in text and "x 100 passages x grad accum 64" in text
    assert "Extrapolation" in text and "TINY" in text


def test_paper_scale_failed_reading_keeps_the_others(tmp_path):
    """One reading that fails (here: sam, by an injected error) is reported; the others are still
    measured and written, and the run ends non-zero. A failed `plain` drops its architecture.
    (In a fresh process: the script forks its readings, which a process that has already run torch
    must not do.)"""
    out = tmp_path / "ps.json"
    runner = tmp_path / "inject.py"
    runner.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
        "import paper_scale\n"
        "real = paper_scale.measure\n"
        "def measure(opts, arch, method, what):\n"
        "    if method == 'sam' or (arch == 'roberta' and method == 'plain'):\n"
        "        raise RuntimeError(f'injected failure of {arch} {method}')\n"
        "    return real(opts, arch, method, what)\n"
        "paper_scale.measure = measure  # the forked children inherit it\n"
        "paper_scale.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, str(runner), "--tiny", "--archs", "vit", "roberta", "--methods", "plain",
                           "sam", "saf", "--output", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0, "a failed reading must end the run non-zero"
    assert "vit sam" in proc.stderr and "roberta plain" in proc.stderr.splitlines()[-1]
    assert "injected failure of vit sam" in proc.stderr
    rows = {(r["arch"], r["method"]) for r in json.loads(out.read_text())["results"]}
    assert rows == {("vit", "plain"), ("vit", "saf")}
