#!/usr/bin/env bash
# The GPU check, as one command (about 8 minutes on one H100):
# 1. the CUDA tests (tests/test_cuda.py: fp16 with the real GradScaler, an overflow in pass 1,
#    bf16, SAM / ASAM / averaging / SAF / MESA against the CPU references, peak GPU memory);
# 2. the paper-scale runs (benchmarks/paper_scale.py: ViT-B/16, RoBERTa-base and FiD on T5-base at
#    their real size and the paper's batch in bf16, 4 timed steps per method);
# 3. the step-time benchmark (plain Trainer vs each method, ViT-B/16 at batch 32, random 224x224
#    images), in each precision of PRECISIONS (default bf16; "bf16 fp16" adds about 4 minutes).
#
#   bash benchmarks/gpu_check.sh [RESULT_DIR]      # default benchmarks/results/gpu_check
#
# RESULT_DIR receives gpu_check.md (everything, as Markdown), paper_scale_cuda.{md,json} and
# gpu_step_time_<precision>.json. Without a CUDA device it still runs to the end: it says so, and
# the CUDA tests report as skipped. PYTHON picks the interpreter (default python3); hf_flat is
# imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
dir="${1:-benchmarks/results/gpu_check}"
result="$dir/gpu_check.md"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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

{
  echo
  echo "## Paper-scale runs (benchmarks/paper_scale.py), the paper's batch, bf16"
  echo
} >> "$result"
timeout 300 "$python" benchmarks/paper_scale.py --steps 4 --warmup 1 --markdown "$dir/paper_scale_cuda.md" \
  --output "$dir/paper_scale_cuda.json" > /dev/null 2> "$dir/paper_scale_cuda.log" || status=1
grep -E "^  [a-z]+ [a-z_0-9]+:|failed" "$dir/paper_scale_cuda.log" | tee -a "$result"
[ -f "$dir/paper_scale_cuda.md" ] && sed -n '/^| architecture | method | params/,/^$/p' "$dir/paper_scale_cuda.md" >> "$result"

for precision in ${PRECISIONS:-bf16}; do
  {
    echo
    echo "## Step time and peak memory, ViT-B/16 (hidden 768, 12 layers, patch 16), batch 32, $precision"
    echo
  } >> "$result"
  timeout 300 "$python" benchmarks/step_time.py --model vit --hidden 768 --layers 12 --batch 32 \
    --steps 10 --warmup 3 --rounds 1 --memory_steps 3 --epoch_steps 5 --"$precision" \
    --methods plain sam asam swa ema wasam saf mesa gsam looksam esam --output "$dir/gpu_step_time_$precision.json" \
    2>/dev/null | tee -a "$result"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo >> "$result"
echo "- total time: $(( $(date +%s) - start )) s; exit status $status" | tee -a "$result"
exit $status
