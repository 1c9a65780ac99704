#!/usr/bin/env bash
# Fills the git-ignored folder .gpu/ with everything scripts/gpu-check.sh needs on the GPU machine
# (which has no Rust, no network and no ../shared): release binaries, fixtures, the peer script and
# the peers' wheels. Keep it under the 64 MiB a device call may carry.
# Usage: scripts/prepare-gpu-check.sh   then run `bash scripts/gpu-check.sh` there, carrying .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
[ -f "$SHARED/fixtures/manifest.json" ] || { echo "missing $SHARED/fixtures" >&2; exit 1; }
cargo build --release --quiet --bin tensorstream
cargo build --release --quiet -p tensorstream-cuda --features bench --bin ts-gpu-bench
mkdir -p .gpu/bin .gpu/fixtures .gpu/wheels
for b in tensorstream ts-gpu-bench; do
  cp "$CARGO_TARGET_DIR/release/$b" .gpu/bin/
  strip .gpu/bin/$b 2>/dev/null || true
done
# The GPU test suites (tests/gpu.rs, cuda/tests/device.rs), built in release, to run there: here
# they can only report "skipped: no CUDA device".
test_bin() { # NAME CARGO-ARGS...: build one test target, copy its executable to .gpu/bin/test-NAME
  local name=$1; shift
  local exe
  # (`if !`: under `set -e -o pipefail` a failed build would end the script here, silently.)
  if ! exe=$(cargo test --release --no-run --message-format=json "$@" 2>/tmp/prepare-gpu-test-build.log | python3 -c '
import json, sys
for line in sys.stdin:
    j = json.loads(line)
    if j.get("reason") == "compiler-artifact" and j.get("executable") and "test" in j["target"]["kind"]:
        print(j["executable"])') || [ ! -x "$exe" ]; then
    echo "building the $name test binary failed:" >&2
    tail -30 /tmp/prepare-gpu-test-build.log >&2
    exit 1
  fi
  cp "$exe" ".gpu/bin/test-$name"
  strip ".gpu/bin/test-$name" 2>/dev/null || true
}
test_bin gpu --test gpu
test_bin device -p tensorstream-cuda --test device
cp "$SHARED"/fixtures/* .gpu/fixtures/
cp "$SHARED/bench/peers_baseline.py" .gpu/
if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$SHARED/bench/get-wheels.sh" .gpu/wheels
fi
# The sources the binaries were built from, so the GPU machine (no git there) can tell stale
# binaries from current ones: gpu_check.py hashes these files again and fails if any differ.
# (The crates' sources and manifests, and the tests built into the test binaries: a change to
# other tests or to docs does not make them stale.)
git ls-files -z -co --exclude-standard -- 'src/*.rs' 'engine/src/*.rs' 'backends/src/*.rs' 'cuda/src/*.rs' '*Cargo.toml' \
  'tests/gpu.rs' 'tests/support/*.rs' 'cuda/tests/*.rs' \
  Cargo.lock | xargs -0 sha256sum > .gpu/SOURCES
# The commit the binaries were built from (-dirty: with uncommitted changes).
{ git rev-parse --short HEAD | tr -d '\n'; git diff --quiet HEAD -- . ':!.gpu' || printf -- '-dirty'; echo; } > .gpu/COMMIT
size=$(du -sm .gpu | cut -f1)
echo ".gpu/ holds ${size} MiB (commit $(cat .gpu/COMMIT))"
ls -la .gpu/bin
[ "$size" -le 60 ] || { echo "too large to carry (> 60 MiB)" >&2; exit 1; }
