# Sourced by scripts/test.sh and scripts/measure-remote.sh: starts nginx (HTTP ranges), s3s-fs
# (S3; a second one without credentials for public-bucket reads) and NFS-Ganesha (NFSv4) on free 127.0.0.1 ports, exports their addresses as TS_* variables,
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
# Whether GET / on 127.0.0.1:$1 answers something matching the (grep -i) pattern $2.
http_answers() {
  local out
  out=$(exec 2>/dev/null; exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && timeout 2 cat <&3) || true
  grep -qi -- "$2" <<<"$out"
}
wait_port() { # name port pid [pattern: the server's own answer to GET /, not just a listener]
  for _ in $(seq 200); do
    kill -0 "$3" 2>/dev/null || { log "$1 exited during start-up"; return 1; }
    if [ -n "${4:-}" ]; then
      http_answers "$2" "$4" && return 0
    elif (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      # Still running a moment later: a foreign listener that took the port would answer the
      # connect while the server exits for want of it.
      sleep 0.2
      kill -0 "$3" 2>/dev/null && return 0
      log "$1 exited during start-up (port $2 taken?)"; return 1
    fi
    sleep 0.1
  done
  log "$1 did not answer on port $2"; return 1
}

# Starts server $1 with function $2 (which picks a fresh port, starts the server, and returns 1
# if it did not come up); up to three tries, since a free port can be taken before the server
# binds it.
start_retrying() {
  local try
  for try in 1 2 3; do
    "$2" && return 0
    log "$1 did not start (try $try of 3)"
  done
  exit 1
}

# Forgets (and stops) the server started last, after a failed start.
drop_last() {
  kill "${PIDS[-1]}" 2>/dev/null || true
  wait "${PIDS[-1]}" 2>/dev/null || true
  unset 'PIDS[-1]'
}

start_nginx() { # nginx: static files with range support, ETags.
  rm -rf "$RUN/nginx"
  mkdir -p "$RUN/nginx/root" "$RUN/nginx/tmp"
  NGINX_PORT=$(free_port)
  cat >"$RUN/nginx/nginx.conf" <<CONF
daemon off;
worker_processes 2;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 1024; }
http {
  log_format ranges '\$request_method \$uri \$status range=\$http_range';
  access_log $RUN/nginx/access.log ranges;
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
    # Directory listings (an HTML page, as a URL to a folder instead of a file gets).
    location /listing/ { autoindex on; }
  }
}
CONF
  "$NGINX" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log" >"$RUN/nginx/out.log" 2>&1 &
  PIDS+=($!)
  wait_port nginx "$NGINX_PORT" $! "^Server: nginx" || { cat "$RUN/nginx/out.log" "$RUN/nginx/error.log" >&2; drop_last; return 1; }
  export TS_NGINX_URL="http://127.0.0.1:$NGINX_PORT" TS_NGINX_ROOT="$RUN/nginx/root" \
    TS_NGINX_ACCESS_LOG="$RUN/nginx/access.log"
  log "nginx on $TS_NGINX_URL (pid ${PIDS[-1]})"
}

start_s3s() { # s3s-fs: a bucket is a directory under its root.
  rm -rf "$RUN/s3"
  mkdir -p "$RUN/s3/root"
  S3_PORT=$(free_port)
  export TS_S3_ACCESS_KEY=tensorstream TS_S3_SECRET_KEY=tensorstream-secret
  s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$TS_S3_ACCESS_KEY" --secret-key "$TS_S3_SECRET_KEY" \
  "$RUN/s3/root" >"$RUN/s3/out.log" 2>&1 &
  PIDS+=($!)
  wait_port s3s-fs "$S3_PORT" $! "<Error><Code>" || { cat "$RUN/s3/out.log" >&2; drop_last; return 1; }
  export TS_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" TS_S3_ROOT="$RUN/s3/root"
  log "s3s-fs on $TS_S3_ENDPOINT (pid ${PIDS[-1]})"
}

start_s3s_public() { # s3s-fs without credentials: serves unsigned requests, as a public bucket does.
  rm -rf "$RUN/s3-public"
  mkdir -p "$RUN/s3-public/root"
  S3P_PORT=$(free_port)
  s3s-fs --host 127.0.0.1 --port "$S3P_PORT" "$RUN/s3-public/root" >"$RUN/s3-public/out.log" 2>&1 &
  PIDS+=($!)
  wait_port s3s-fs "$S3P_PORT" $! "<ListAllMyBucketsResult" || { cat "$RUN/s3-public/out.log" >&2; drop_last; return 1; }
  export TS_S3_PUBLIC_ENDPOINT="http://127.0.0.1:$S3P_PORT" TS_S3_PUBLIC_ROOT="$RUN/s3-public/root"
  log "s3s-fs (no credentials) on $TS_S3_PUBLIC_ENDPOINT (pid ${PIDS[-1]})"
}

start_ganesha() { # NFS-Ganesha: NFSv4 on loopback, no rpcbind, export at pseudo path /export.
  rm -rf "$RUN/nfs"
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
  # GETATTR sees the file as it is now: a change made underneath the server (in TS_NFS_ROOT) is
  # visible to the client's version check at once, as in backends/tests/support/ganesha.rs.
  Attr_Expiration_Time = 0;
  FSAL { Name = VFS; }
}
CONF
  "$GANESHA" -F -f "$RUN/nfs/ganesha.conf" -L "$RUN/nfs/ganesha.log" -p "$RUN/nfs/ganesha.pid" >"$RUN/nfs/out.log" 2>&1 &
  PIDS+=($!)
  wait_port ganesha "$NFS_PORT" $! || { cat "$RUN/nfs/out.log" "$RUN/nfs/ganesha.log" >&2; drop_last; return 1; }
  for _ in $(seq 300); do
    grep -q "NFS SERVER INITIALIZED" "$RUN/nfs/ganesha.log" 2>/dev/null && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q "NFS SERVER INITIALIZED" "$RUN/nfs/ganesha.log" || ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
    log "ganesha did not finish start-up"; cat "$RUN/nfs/ganesha.log" >&2; drop_last; return 1
  fi
  export TS_NFS_PORT="$NFS_PORT" TS_NFS_ROOT="$RUN/nfs/export" TS_NFS_URL="nfs://127.0.0.1:$NFS_PORT/export"
  log "nfs-ganesha on 127.0.0.1:$NFS_PORT (pid ${PIDS[-1]})"
}

start_servers() {
  RUN=$(mktemp -d "${TMPDIR:-/tmp}/ts-test.XXXXXX")
  chmod 755 "$RUN"   # nginx's workers (an unprivileged user when started as root) must read it
  PIDS=()
  trap cleanup EXIT INT TERM
  start_retrying nginx start_nginx
  start_retrying s3s-fs start_s3s
  start_retrying "s3s-fs (public)" start_s3s_public
  start_retrying nfs-ganesha start_ganesha
}
