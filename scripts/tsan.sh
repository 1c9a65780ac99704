#!/usr/bin/env bash
# Runs `cargo test ARGS...` under ThreadSanitizer (nightly, rust-src: std is rebuilt with
# -Zbuild-std), with fakecuda (cuda/tests/fakecuda/fakecuda.c) compiled with -fsanitize=thread as
# the process's libcuda.so. The test binaries are linked with --export-dynamic, so that the
# instrumented fakecuda finds the TSan runtime (and its memcpy/pthread interceptors) in them: its
# stream threads' reads of pinned staging slots are then checked against the engine's reader
# threads writing the next read into them. A slot handed back before its copy's event completed
# is reported as a data race (checked: InFlight::wait returning the source without waiting is
# reported at once in `--test device`).
#
#   scripts/tsan.sh -p tensorstream-cuda --lib --test device
#   FAKECUDA_DELAY_US=200 scripts/tsan.sh -p tensorstream --no-default-features --features cli --test gpu
#
# Kernel writes (io_uring, O_DIRECT) are invisible to TSan; the pread paths are checked
# (TSan intercepts pread). Builds into $CARGO_TARGET_DIR (default target/tsan).
#
# Known false positive: TSan does not model standalone fences. Arena::exclusive and
# PinnedRegion::slots take a region back from windows dropped on other threads with a relaxed
# Arc count plus an Acquire fence (correct: Miri checks it, see mem::handoff_tests). Where that
# is the only edge (a new load taking slots that a dropped one let go of, the arena read while
# no join or channel orders it), TSan reports a race between the old window's last access and
# the new one's first.
#
# TSan's allocator aborts the whole test binary on a request above its 1 TiB limit, where the
# system allocator returns null (and the engine reports "out of host memory", which tests
# check: engine/tests/tensorizer.rs a_tiny_file_declaring_huge_zero_tensors_fails_cleanly_…);
# allocator_may_return_null=1 makes it return null too. Set TSAN_OPTIONS to override.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/tsan}
lib=$CARGO_TARGET_DIR/fakecuda-tsan
mkdir -p "$lib"
src=$root/cuda/tests/fakecuda/fakecuda.c
if [ ! -f "$lib/libcuda.so" ] || [ "$src" -nt "$lib/libcuda.so" ]; then
  # Instrumented objects, linked WITHOUT -fsanitize: the runtime comes from the test binary.
  cc -O1 -g -fsanitize=thread -fPIC -pthread -c "$src" -o "$lib/fakecuda.o"
  cc -shared -pthread -o "$lib/libcuda.so" "$lib/fakecuda.o"
fi
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="-Zsanitizer=thread -Clink-arg=-Wl,--export-dynamic"
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0:second_deadlock_stack=1:allocator_may_return_null=1}
exec cargo +nightly test -Zbuild-std --target "$(rustc -vV | sed -n 's/^host: //p')" "$@"
