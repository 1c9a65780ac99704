#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need when missing, starts the real
# servers on 127.0.0.1 (nginx for HTTP ranges, s3s-fs for S3, NFS-Ganesha for NFS), runs the whole
# test suite, and stops the servers by PID.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- some_filter  # extra arguments go to `cargo test`
#
# Tests read the servers' addresses from TS_* variables exported here; run alone (plain
# `cargo test`), a test that needs a server starts a private one itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[test.sh] %s\n' "$*" >&2; }

# ---- install -------------------------------------------------------------------------------
# Network steps get three tries (a mirror mid-sync or a registry hiccup must not fail a run).
retry() {
  local n
  for n in 1 2 3; do
    "$@" && return 0
    [ $n = 3 ] || { log "failed (try $n of 3): $*; again in $((n * 10)) s"; sleep $((n * 10)); }
  done
  return 1
}
export CARGO_NET_RETRY=${CARGO_NET_RETRY:-10}
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
apt_pkgs=()
have nginx || apt_pkgs+=(nginx-light)
have ganesha.nfsd || apt_pkgs+=(nfs-ganesha nfs-ganesha-vfs)
have nfs-cat || apt_pkgs+=(libnfs-utils)
have python3 || apt_pkgs+=(python3)  # scripts/test_gpu_check.py (the GPU check's judging), tests/support/no_io_uring.py
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  log "installing ${apt_pkgs[*]}"
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  retry $SUDO apt-get -o Acquire::Retries=5 update -qq
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y -qq \
    --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
  log "installing s3s-fs 0.14.1 (cargo install, a few minutes)"
  retry cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
GANESHA=$(command -v ganesha.nfsd || echo /usr/bin/ganesha.nfsd)

# ---- disk ----------------------------------------------------------------------------------
# A full run builds about 3.2 GiB under target/ (and the tests write fixtures to the temporary
# directory). A disk that fills mid-build fails with scattered "No space left on device" errors
# from cargo, mkdir and Python; say so plainly first.
need_kib=$((4 * 1024 * 1024))
tdir=${CARGO_TARGET_DIR:-target}
mkdir -p "$tdir" 2>/dev/null || true
for d in "$tdir" "${TMPDIR:-/tmp}"; do
  free_kib=$(df -Pk "$d" 2>/dev/null | awk 'NR == 2 { print $4 }')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
    log "WARNING: only $((free_kib / 1024)) MiB free on the disk holding $d; a full run needs about" \
      "$((need_kib / 1024)) MiB. Free some space (for instance \`cargo clean\`) if the build or tests" \
      "fail with \"No space left on device\"."
  fi
done

# ---- servers ----------------------------------------------------------------------------
# shellcheck source=scripts/servers.sh
. scripts/servers.sh
start_servers

# ---- tests ---------------------------------------------------------------------------------
extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
log "cargo test --workspace --all-features ${extra[*]}"
status=0
cargo test --workspace --all-features --no-fail-fast "${extra[@]}" 2>&1 || status=$?
if [ ${#extra[@]} -eq 0 ]; then
  # The GPU tests again, uncaptured, so their "skipped: no CUDA device" lines show on machines
  # without a GPU (and their results on machines with one).
  log "GPU tests (uncaptured):"
  for t in "-p tensorstream-cuda --test device" "-p tensorstream --test gpu"; do
    # shellcheck disable=SC2086
    cargo test $t --all-features --quiet -- --nocapture --test-threads=1 2>&1 | grep -E "skipped|test result|panicked|FAILED" || status=1
  done
  # The GPU tests once more against fakecuda (cuda/tests/fakecuda: a CPU stand-in for the CUDA
  # driver, strict about contexts, device ranges and the order of events): every GPU code path
  # runs here, none may skip. Twice: with registration allowed, and refused (pageable staging,
  # the mapped route's pread fallback). A logic check: it measures nothing about GPUs.
  log "GPU tests against fakecuda (a CPU stand-in for the CUDA driver; no GPU is used):"
  for reg in ok refuse; do
    for t in "-p tensorstream-cuda --test device" "-p tensorstream --test gpu"; do
      # shellcheck disable=SC2086
      out=$(FAKECUDA_REGISTER=$reg FAKECUDA_DELAY_US=20 FAKECUDA_STATS=1 \
        scripts/fakecuda.sh run cargo test $t --all-features --quiet -- --nocapture 2>&1) || status=1
      summary=$(grep -E "^test result|panicked|FAILED|VIOLATION|^fakecuda:" <<<"$out" || true)
      printf '  [registration %s, %s]\n%s\n' "$reg" "${t##* }" "$summary"
      # (Here-strings, not pipes: under pipefail, `grep -q` closing a pipe early fails it.)
      if grep -q "skipped: no CUDA device" <<<"$out" || ! grep -q "^test result: ok" <<<"$out"; then
        log "FAILED: the GPU tests did not all run and pass against fakecuda:"
        printf '%s\n' "$out" | tail -40
        status=1
      fi
    done
  done
  # The GPU check's judging (scripts/gpu_check.py), on made-up rows: no GPU needed.
  log "python3 scripts/test_gpu_check.py"
  PYTHONDONTWRITEBYTECODE=1 python3 scripts/test_gpu_check.py 2>&1 || status=1
fi
exit $status
