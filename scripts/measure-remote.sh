#!/usr/bin/env bash
# Remote-backend measurements over loopback (issue "Remote storage"): a >= 1 GiB safetensors
# object loaded to host memory through each backend, next to a plain client of the same server in
# the same run:  HTTP vs `curl -s -o /dev/null`,  S3 vs one single-stream GET (curl --aws-sigv4),
# NFS vs `nfs-cp`; for HTTP also curl writing into tmpfs (fresh memory, as a load must).  Usage: scripts/measure-remote.sh [SIZE (1GiB)] [ROUNDS (3)]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SIZE=${1:-1GiB}
ROUNDS=${2:-3}
log() { printf '[measure] %s\n' "$*" >&2; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
GANESHA=$(command -v ganesha.nfsd || echo /usr/bin/ganesha.nfsd)
command -v nfs-cp >/dev/null && command -v curl >/dev/null || { log "needs curl and nfs-cp (libnfs-utils)"; exit 1; }
cargo build --release --quiet
TS=${CARGO_TARGET_DIR:-$PWD/target}/release/tensorstream  # where `cargo build` just put it
. scripts/servers.sh
start_servers

# One model file, shared by all three servers (hard links where possible).
"$TS" demo --size "$SIZE" --dir "$RUN" --keep --quiet >/dev/null
SRC=$(ls "$RUN"/tensorstream-demo-*/model.safetensors)
BYTES=$(stat -c %s "$SRC")
ln "$SRC" "$TS_NGINX_ROOT/model.safetensors" 2>/dev/null || cp "$SRC" "$TS_NGINX_ROOT/model.safetensors"
ln "$SRC" "$TS_NFS_ROOT/model.safetensors" 2>/dev/null || cp "$SRC" "$TS_NFS_ROOT/model.safetensors"
SIGV4=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$TS_S3_ACCESS_KEY:$TS_S3_SECRET_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
curl -sf "${SIGV4[@]}" -X PUT "$TS_S3_ENDPOINT/bench" >/dev/null || true
curl -sf "${SIGV4[@]}" -T "$SRC" "$TS_S3_ENDPOINT/bench/model.safetensors" >/dev/null
export AWS_ACCESS_KEY_ID=$TS_S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$TS_S3_SECRET_KEY AWS_REGION=us-east-1
cat "$SRC" >/dev/null   # server side from the page cache for everyone

now() { date +%s.%N; }
gbps() { python3 -c "print(f'{$1/($3-$2)/1e9:.3f}')"; }
# curl's own transfer time (-w %{time_total}), not the wall clock around the process.
curl_s() { curl -sf -w '%{time_total}' "$@"; }
tsload() { "$TS" load "$1" --json --quiet "${@:2}" | python3 -c "import json,sys; o=json.load(sys.stdin); print(f\"{o['gbps']:.3f}\")"; }
rows=()
for r in $(seq "$ROUNDS"); do
  secs=$(curl_s -o /dev/null "$TS_NGINX_URL/model.safetensors")
  c=$(gbps "$BYTES" 0 "$secs"); t=$(tsload "$TS_NGINX_URL/model.safetensors")
  # Second baseline: curl landing the bytes in (fresh) memory too, as a load must.
  secs=$(curl_s -o /dev/shm/ts-curl.out "$TS_NGINX_URL/model.safetensors"); rm -f /dev/shm/ts-curl.out
  m=$(gbps "$BYTES" 0 "$secs")
  rows+=("round $r  http  curl $c GB/s | tensorstream $t GB/s | ratio $(python3 -c "print(f'{$t/$c:.2f}')") | curl -o tmpfs $m GB/s, ratio $(python3 -c "print(f'{$t/$m:.2f}')")")
  secs=$(curl_s "${SIGV4[@]}" -o /dev/null "$TS_S3_ENDPOINT/bench/model.safetensors")
  c=$(gbps "$BYTES" 0 "$secs"); t=$(tsload s3://bench/model.safetensors --s3-endpoint "$TS_S3_ENDPOINT")
  rows+=("round $r  s3    one GET $c GB/s | tensorstream $t GB/s | ratio $(python3 -c "print(f'{$t/$c:.2f}')")")
  rm -f /dev/shm/ts-nfs-cp.out
  # nfs-cp has no timer of its own: wall clock (its start-up counts against it, ~ms).
  t0=$(now); nfs-cp "nfs://127.0.0.1/export/model.safetensors?version=4&nfsport=$TS_NFS_PORT" /dev/shm/ts-nfs-cp.out >/dev/null; t1=$(now)
  rm -f /dev/shm/ts-nfs-cp.out
  c=$(gbps "$BYTES" "$t0" "$t1"); t=$(tsload "$TS_NFS_URL/model.safetensors")
  rows+=("round $r  nfs   nfs-cp $c GB/s | tensorstream $t GB/s | ratio $(python3 -c "print(f'{$t/$c:.2f}')")")
done
echo "object: $BYTES bytes, loopback, server files in the page cache"
printf '%s\n' "${rows[@]}"
