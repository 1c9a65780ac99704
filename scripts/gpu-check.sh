#!/usr/bin/env bash
# GPU check (issue 3), run ON THE GPU MACHINE from the checkout root with .gpu/ carried along
# (filled here by scripts/prepare-gpu-check.sh). Needs root (drops the page cache), python3 with
# torch + safetensors (present there), ~15 GB free disk (see the work folder below).
# Budget: ≤ 6 minutes for the required steps (TS_GPU_BUDGET=330), a hard end at TS_GPU_HARD=500 s
# (give the device call timeout_s ≈ 560). Writes gpu-check.log, results.jsonl and peers.log (the
# peers' own output) to $OUT as they
# grow, so even a run killed from outside leaves them; the table is printed last in any case.
# Rehearsal without a GPU (checks the script; loads go to host memory): TS_GPU_DRY=1 TS_GPU_GB=0.5
# Rehearsal of the GPU steps against fakecuda, a CPU stand-in for the driver (scripts/fakecuda.sh
# first; device digests checked, peers skipped, nothing judged): TS_GPU_FAKE=1 TS_GPU_GB=0.5
# Short run for a lease's last minutes (required steps only, few sweep rows; ~170 s on the H200
# before the GPU test suites, the A/B rows and the warm confirmation were added; the suites may
# take up to 90 s each, so allow ~330 s):
#   TS_GPU_QUICK=1 TS_GPU_HARD=360 TS_GPU_BUDGET=300 (device call timeout_s ≈ 400)
# On a fresh 15-minute lease, prefer the full run (timeout_s 560): it leaves ~2 minutes for the
# machine's start.
#   (a) every fixture -> cuda:0, device digests vs manifest; the GPU test suites (tests/gpu.rs,
#       cuda/tests/device.rs, built in release into .gpu/bin), none skipped
#   (b) a fresh ≥ 6 GB bf16 safetensors file -> cuda:0, device digests vs digests Python
#       computes from the file itself
#   (c) cold (page cache dropped) and warm loads, raw O_DIRECT baseline, pinned h2d ceiling,
#       peers_baseline.py on the same file in the same run; then the warm sweep, whose fastest
#       configuration is timed again and judged on those samples
#   (d) table last: tensorstream vs each peer, cold/warm GB/s, peak RSS, time to first tensor
# Stale binaries (.gpu/SOURCES differ from the checkout) stop the run at once unless
# TS_GPU_ALLOW_STALE=1. The hard limit is a real stop (SIGALRM): running steps are killed with
# their process groups, and the targets and the table are still printed. The work folder is
# the first of /tmp/ts-gpu, /var/tmp/ts-gpu, .gpu-work that is on a disk with room, unless
# TS_GPU_WORK is set.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu/bin/ts-gpu-bench ] || { echo "no .gpu/ here: run scripts/prepare-gpu-check.sh on the dev machine and carry .gpu" >&2; exit 2; }
chmod +x .gpu/bin/* # in case the carry dropped the mode bits
export PYTHONUNBUFFERED=1
# The check's clock starts here (the wheels' install counts against the hard limit too).
TS_GPU_T0=$(date +%s.%N)
export TS_GPU_T0
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  # All at once (one pip start); if that fails, one at a time, so that a wheel this Python
  # refuses does not keep the others out.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl >/dev/null 2>&1 ||
  for w in .gpu/wheels/*.whl; do
    if ! msg=$(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$w" 2>&1); then
      echo "wheel $(basename "$w") NOT installed (that peer will be missing):" >&2
      printf '%s\n' "$msg" | tail -5 >&2
    fi
  done
  export PYTHONPATH=/tmp/site
fi
exec python3 scripts/gpu_check.py "$@"
