#!/usr/bin/env bash
# The GPU check, as one command (at most about 9 minutes on one H100/H200):
# 1. the CUDA tests (tests/test_cuda.py: fp16 with the real GradScaler, an overflow in pass 1,
#    bf16, SAM / ASAM / averaging / SAF / MESA against the CPU references, peak GPU memory);
# 2. the step-time benchmark (benchmarks/gpu_step_time.py: every method against the plain Trainer
#    on ViT-B/16 at batch 32 and RoBERTa-base, a subset on ViT-B/16 at batch 100 and a 124M causal
#    LM with and without LoRA, SAM and MESA in fp16; 30 timed steps per method after 5 warm-up
#    steps, 3 rounds interleaved across methods, CUDA events; the noise check none vs plain;
#    the issue's targets with pass/fail). BUDGET_MINUTES (default 7.5) caps it.
# 3. only with PAPER_SCALE=1: the paper-scale runs (benchmarks/paper_scale.py; about 3 more minutes).
#
#   bash benchmarks/gpu_check.sh [RESULT_DIR]      # default benchmarks/results/gpu_check
#
# RESULT_DIR receives gpu_check.md (everything, as Markdown), gpu_step_time.{md,json} (and with
# PAPER_SCALE=1 paper_scale_cuda.{md,json}). Without a CUDA device it still runs to the end: it says
# so, the CUDA tests report as skipped, and the benchmark runs its CPU dry run (tiny models, every
# code path, no measurement; gpu_step_time_dry_run.{md,json}). PYTHON picks the interpreter
# (default python3); hf_flat is imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
dir="${1:-benchmarks/results/gpu_check}"
result="$dir/gpu_check.md"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$dir"
start=$(date +%s)

{
  echo "# hf-flat GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  "$python" - <<'PY'
import torch, transformers, accelerate
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"- device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"transformers {transformers.__version__}; accelerate {accelerate.__version__}")
PY
} > "$result"

# The benchmark's noise check and targets, appended to gpu_check.md (its own files hold every table).
summarise() {
  awk '/^## /{h=1; keep=($0 ~ /^## (Noise check|Targets)/)} !h && /^(- |\*\*)/ {print} h && keep {print}' "$1" >> "$result"
}

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "- no CUDA device here: the CUDA tests are skipped and the GPU benchmark runs only its CPU dry run." | tee -a "$result"
  "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 3 | tee -a "$result"
  status=0
  {
    echo
    echo "## Step-time benchmark: CPU dry run (benchmarks/gpu_step_time.py --dry_run; no measurement)"
    echo
  } >> "$result"
  timeout 300 "$python" benchmarks/gpu_step_time.py --dry_run --markdown "$dir/gpu_step_time_dry_run.md" \
    --output "$dir/gpu_step_time_dry_run.json" 2> "$dir/gpu_step_time_dry_run.log" || status=1
  grep -E "^gpu_step_time|FAILED|Error" "$dir/gpu_step_time_dry_run.log" | tee -a "$result"
  [ -f "$dir/gpu_step_time_dry_run.md" ] && summarise "$dir/gpu_step_time_dry_run.md"
  echo >> "$result"
  echo "- total time: $(( $(date +%s) - start )) s; exit status $status" | tee -a "$result"
  exit $status
fi

status=0
{
  echo
  echo "## CUDA tests"
  echo
  echo '```'
} >> "$result"
timeout 120 "$python" -m pytest -q -p no:cacheprovider -s tests/test_cuda.py 2>&1 \
  | grep -E "passed|failed|error|SAM peak|FAILED|Error" | tee -a "$result"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo '```' >> "$result"

budget="${BUDGET_MINUTES:-7.5}"
{
  echo
  echo "## Step time (benchmarks/gpu_step_time.py; every table in gpu_step_time.md)"
  echo
} >> "$result"
# the script stops starting rounds past its budget and stops a process at 1.5 times its share;
# this timeout (budget + 3 minutes) is the last resort, and the script writes what it has on SIGTERM
timeout "$(awk -v b="$budget" 'BEGIN { printf "%d", 60 * b + 180 }')" "$python" benchmarks/gpu_step_time.py \
  --budget_minutes "$budget" --markdown "$dir/gpu_step_time.md" --output "$dir/gpu_step_time.json" \
  2> "$dir/gpu_step_time.log" || status=1
grep -E "^gpu_step_time|^\[|FAILED|stopped" "$dir/gpu_step_time.log" | tee -a "$result"
[ -f "$dir/gpu_step_time.md" ] && summarise "$dir/gpu_step_time.md"

if [ "${PAPER_SCALE:-0}" = 1 ]; then
  {
    echo
    echo "## Paper-scale runs (benchmarks/paper_scale.py), the paper's batch, bf16"
    echo
  } >> "$result"
  timeout 300 "$python" benchmarks/paper_scale.py --steps 4 --warmup 1 --markdown "$dir/paper_scale_cuda.md" \
    --output "$dir/paper_scale_cuda.json" > /dev/null 2> "$dir/paper_scale_cuda.log" || status=1
  grep -E "^  [a-z]+ [a-z_0-9]+:|failed" "$dir/paper_scale_cuda.log" | tee -a "$result"
  [ -f "$dir/paper_scale_cuda.md" ] && sed -n '/^| architecture | method | params/,/^$/p' "$dir/paper_scale_cuda.md" >> "$result"
fi
echo >> "$result"
echo "- total time: $(( $(date +%s) - start )) s; exit status $status" | tee -a "$result"
exit $status
