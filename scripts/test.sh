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
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
apt_pkgs=()
have nginx || apt_pkgs+=(nginx-light)
have ganesha.nfsd || apt_pkgs+=(nfs-ganesha nfs-ganesha-vfs)
have nfs-cat || apt_pkgs+=(libnfs-utils)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  log "installing ${apt_pkgs[*]}"
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
  log "installing s3s-fs 0.14.1 (cargo install, a few minutes)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
GANESHA=$(command -v ganesha.nfsd || echo /usr/bin/ganesha.nfsd)

# ---- servers -------------------------------------------------------------------------------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/ts-test.XXXXXX")
chmod 755 "$RUN"   # nginx's workers (an unprivileged user when started as root) must read it
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$RUN"
  exit $rc
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { # name port pid
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    kill -0 "$3" 2>/dev/null || { log "$1 exited during start-up"; return 1; }
    sleep 0.1
  done
  log "$1 did not open port $2"; return 1
}

# nginx: static files with range support, ETags.
mkdir -p "$RUN/nginx/root" "$RUN/nginx/tmp"
NGINX_PORT=$(free_port)
cat >"$RUN/nginx/nginx.conf" <<CONF
daemon off;
worker_processes 2;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx/tmp/body;
  proxy_temp_path $RUN/nginx/tmp/proxy;
  fastcgi_temp_path $RUN/nginx/tmp/fastcgi;
  uwsgi_temp_path $RUN/nginx/tmp/uwsgi;
  scgi_temp_path $RUN/nginx/tmp/scgi;
  sendfile on;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    root $RUN/nginx/root;
  }
}
CONF
"$NGINX" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log" >"$RUN/nginx/out.log" 2>&1 &
PIDS+=($!)
wait_port nginx "$NGINX_PORT" $! || { cat "$RUN/nginx/out.log" "$RUN/nginx/error.log" >&2; exit 1; }
export TS_NGINX_URL="http://127.0.0.1:$NGINX_PORT" TS_NGINX_ROOT="$RUN/nginx/root"
log "nginx on $TS_NGINX_URL (pid ${PIDS[-1]})"

# s3s-fs: a bucket is a directory under its root.
mkdir -p "$RUN/s3/root"
S3_PORT=$(free_port)
export TS_S3_ACCESS_KEY=tensorstream TS_S3_SECRET_KEY=tensorstream-secret
s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$TS_S3_ACCESS_KEY" --secret-key "$TS_S3_SECRET_KEY" \
  "$RUN/s3/root" >"$RUN/s3/out.log" 2>&1 &
PIDS+=($!)
wait_port s3s-fs "$S3_PORT" $! || { cat "$RUN/s3/out.log" >&2; exit 1; }
export TS_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" TS_S3_ROOT="$RUN/s3/root"
log "s3s-fs on $TS_S3_ENDPOINT (pid ${PIDS[-1]})"

# NFS-Ganesha: NFSv4 on loopback, no rpcbind, export at pseudo path /export.
mkdir -p "$RUN/nfs/export" "$RUN/nfs/recovery"
NFS_PORT=$(free_port)
cat >"$RUN/nfs/ganesha.conf" <<CONF
NFS_CORE_PARAM {
  Bind_addr = 127.0.0.1;
  NFS_Port = $NFS_PORT;
  Protocols = 4;
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Enable_UDP = false;
}
NFSV4 { Graceless = true; RecoveryBackend = fs; RecoveryRoot = $RUN/nfs/recovery; }
EXPORT {
  Export_Id = 1;
  Path = $RUN/nfs/export;
  Pseudo = /export;
  Access_Type = RW;
  Squash = No_Root_Squash;
  SecType = sys;
  Protocols = 4;
  FSAL { Name = VFS; }
}
LOG { Default_Log_Level = WARN; }
CONF
"$GANESHA" -F -f "$RUN/nfs/ganesha.conf" -L "$RUN/nfs/ganesha.log" -p "$RUN/nfs/ganesha.pid" >"$RUN/nfs/out.log" 2>&1 &
PIDS+=($!)
wait_port ganesha "$NFS_PORT" $! || { cat "$RUN/nfs/out.log" "$RUN/nfs/ganesha.log" >&2; exit 1; }
export TS_NFS_PORT="$NFS_PORT" TS_NFS_ROOT="$RUN/nfs/export" TS_NFS_URL="nfs://127.0.0.1:$NFS_PORT/export"
log "nfs-ganesha on 127.0.0.1:$NFS_PORT (pid ${PIDS[-1]})"

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
  cargo test -p tensorstream-cuda --test device --quiet -- --nocapture --test-threads=1 2>&1 | grep -E "skipped|test result|panicked|FAILED" || status=1
fi
exit $status
