# Sourced by scripts/test.sh and scripts/measure-remote.sh: starts nginx (HTTP ranges), s3s-fs
# (S3) and NFS-Ganesha (NFSv4) on free 127.0.0.1 ports, exports their addresses as TS_* variables,
# and stops them by PID on exit. Needs: log(), NGINX, GANESHA, s3s-fs on PATH.

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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { # name port pid
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    kill -0 "$3" 2>/dev/null || { log "$1 exited during start-up"; return 1; }
    sleep 0.1
  done
  log "$1 did not open port $2"; return 1
}

start_servers() {
  RUN=$(mktemp -d "${TMPDIR:-/tmp}/ts-test.XXXXXX")
  chmod 755 "$RUN"   # nginx's workers (an unprivileged user when started as root) must read it
  PIDS=()
  trap cleanup EXIT INT TERM

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
CONF
  "$GANESHA" -F -f "$RUN/nfs/ganesha.conf" -L "$RUN/nfs/ganesha.log" -p "$RUN/nfs/ganesha.pid" >"$RUN/nfs/out.log" 2>&1 &
  PIDS+=($!)
  wait_port ganesha "$NFS_PORT" $! || { cat "$RUN/nfs/out.log" "$RUN/nfs/ganesha.log" >&2; exit 1; }
  for _ in $(seq 300); do grep -q "NFS SERVER INITIALIZED" "$RUN/nfs/ganesha.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "NFS SERVER INITIALIZED" "$RUN/nfs/ganesha.log" || { log "ganesha did not finish start-up"; cat "$RUN/nfs/ganesha.log" >&2; exit 1; }
  export TS_NFS_PORT="$NFS_PORT" TS_NFS_ROOT="$RUN/nfs/export" TS_NFS_URL="nfs://127.0.0.1:$NFS_PORT/export"
  log "nfs-ganesha on 127.0.0.1:$NFS_PORT (pid ${PIDS[-1]})"
}
