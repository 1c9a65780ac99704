#!/usr/bin/env bash
# Builds fakecuda (cuda/tests/fakecuda/fakecuda.c: a CPU stand-in for the CUDA driver API calls
# tensorstream makes) as target/fakecuda/libcuda.so, and optionally runs a command with it first
# on LD_LIBRARY_PATH, so that the GPU code paths run on a machine without a GPU. A logic test
# only: nothing timed against it measures a GPU. Settings (FAKECUDA_DELAY_US, FAKECUDA_REGISTER,
# FAKECUDA_MEM, FAKECUDA_DEVICES, FAKECUDA_STATS) are described at the top of the C file.
#
#   scripts/fakecuda.sh                       # build; prints the library's folder
#   scripts/fakecuda.sh run CMD [ARGS...]     # build, then run CMD against it
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/cuda/tests/fakecuda/fakecuda.c
dir=${CARGO_TARGET_DIR:-$root/target}/fakecuda
mkdir -p "$dir"
dir=$(cd "$dir" && pwd) # absolute: test binaries run from other folders
if [ ! -f "$dir/libcuda.so" ] || [ "$src" -nt "$dir/libcuda.so" ]; then
  command -v cc >/dev/null || { echo "fakecuda.sh: no C compiler (cc) to build $src" >&2; exit 2; }
  # Built under a name of this process's own, then renamed into place: tests that build it
  # side by side (each a whole library, the last rename wins) never see a partial one.
  tmp=$dir/libcuda.so.tmp.$$
  trap 'rm -f "$tmp"' EXIT
  cc -O2 -g -Wall -Wextra -Werror -shared -fPIC -pthread -o "$tmp" "$src"
  mv -f "$tmp" "$dir/libcuda.so"
fi
if [ "${1:-}" = run ]; then
  shift
  export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  exec "$@"
fi
echo "$dir"
