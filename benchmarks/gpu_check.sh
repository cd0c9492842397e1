#!/usr/bin/env bash
# The GPU check, as one command: the CUDA tests (tests/test_cuda.py: fp16 with the real GradScaler,
# an overflow in pass 1, bf16, SAM / ASAM / averaging / SAF / MESA against the CPU references, peak
# GPU memory) and the step-time benchmark (plain Trainer vs each method, bf16 and fp16, a
# ViT-B/16 built from a config, random 224x224 images). Everything goes to one Markdown file.
#
#   bash benchmarks/gpu_check.sh [RESULT_FILE]      # default benchmarks/results/gpu_check.md
#   PRECISIONS=bf16 bash benchmarks/gpu_check.sh    # the benchmark in bf16 only (default: bf16 fp16)
#
# Without a CUDA device it still runs to the end: it says so, and the CUDA tests report as skipped.
# PYTHON picks the interpreter (default python3); hf_flat is imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
result="${1:-benchmarks/results/gpu_check.md}"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$result")" benchmarks/results
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

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "- no CUDA device here: the CUDA tests are skipped and the GPU benchmark is not run." | tee -a "$result"
  "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 3 | tee -a "$result"
  exit 0
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

for precision in ${PRECISIONS:-bf16 fp16}; do
  {
    echo
    echo "## Step time and peak memory, ViT-B/16 (hidden 768, 12 layers, patch 16), batch 32, $precision"
    echo
  } >> "$result"
  timeout 300 "$python" benchmarks/step_time.py --model vit --hidden 768 --layers 12 --batch 32 \
    --steps 10 --warmup 3 --rounds 1 --memory_steps 3 --epoch_steps 5 --"$precision" \
    --methods plain sam asam swa ema wasam saf mesa gsam looksam esam --output "benchmarks/results/gpu_step_time_$precision.json" \
    2>/dev/null | tee -a "$result"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo >> "$result"
echo "- total time: $(( $(date +%s) - start )) s; exit status $status" | tee -a "$result"
exit $status
