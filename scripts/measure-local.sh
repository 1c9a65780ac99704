#!/usr/bin/env bash
# Foundation measurements on this machine (root needed to drop the page cache):
#  1. cold-cache load of a >= 2 GiB safetensors file to host memory vs `dd iflag=direct`, same run;
#  2. warm-cache load vs std::fs::read, same run;
#  3. peak RSS of `load` minus the model's bytes.
# dd is timed by the wall clock around the process (a few ms of start-up, under 1 % at 2 GiB, in
# tensorstream's favour); tensorstream by its own timer. The model is written once per SIZE and
# kept under DIR/measure-local-SIZE/.
# Usage: scripts/measure-local.sh [SIZE (default 2GiB)] [DIR (default target/)] [REPEAT (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2GiB}
DIR=${2:-$PWD/target}
REPEAT=${3:-3}
cargo build --release --quiet
TS=${CARGO_TARGET_DIR:-$PWD/target}/release/tensorstream  # where `cargo build` just put it
DIR="$DIR/measure-local-$SIZE"
mkdir -p "$DIR"
FILE=$(ls -d "$DIR"/tensorstream-demo-*/model.safetensors 2>/dev/null | head -1 || true)
if [ -z "$FILE" ]; then
  "$TS" demo --size "$SIZE" --dir "$DIR" --keep --quiet | tee /dev/stderr | grep -q "every byte matches"
  FILE=$(ls -d "$DIR"/tensorstream-demo-*/model.safetensors | head -1)
fi
BYTES=$(stat -c %s "$FILE")
echo "file: $FILE ($BYTES bytes)"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
gbps() { python3 -c "import sys; print(f'{$1/$2/1e9:.3f}')"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

rows=()
for i in $(seq "$REPEAT"); do
  drop
  t0=$(date +%s.%N); dd if="$FILE" of=/dev/null bs=16M iflag=direct status=none; t1=$(date +%s.%N)
  dd_s=$(python3 -c "print($t1-$t0)")
  drop
  out=$("$TS" load "$FILE" --json --quiet)
  ts_s=$(echo "$out" | json_field seconds); rss=$(echo "$out" | json_field peak_rss_bytes)
  tb=$(echo "$out" | json_field bytes)
  rows+=("cold  run $i: dd iflag=direct $(gbps "$BYTES" "$dd_s") GB/s | tensorstream $(gbps "$tb" "$ts_s") GB/s | ratio $(python3 -c "print(f'{($tb/$ts_s)/($BYTES/$dd_s):.3f}')") | RSS-model $(( (rss - tb) / 1048576 )) MiB")
done
cat "$FILE" > /dev/null
for i in $(seq "$REPEAT"); do
  out=$("$TS" bench "$FILE" --warm --repeat 1 --quiet)
  ts=$(echo "$out" | grep '"tensorstream"' | json_field gbps); fr=$(echo "$out" | grep std_fs_read | json_field gbps)
  out2=$("$TS" load "$FILE" --json --quiet)
  rss=$(echo "$out2" | json_field peak_rss_bytes); tb=$(echo "$out2" | json_field bytes)
  rows+=("warm  run $i: std::fs::read $(printf %.3f "$fr") GB/s | tensorstream $(printf %.3f "$ts") GB/s | ratio $(python3 -c "print(f'{$ts/$fr:.3f}')") | RSS-model $(( (rss - tb) / 1048576 )) MiB")
done
echo
printf '%s\n' "${rows[@]}"
