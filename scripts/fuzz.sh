#!/usr/bin/env bash
# Runs every fuzz target of the workspace (cargo-fuzz, libFuzzer), each for SECONDS, seeded
# with small valid inputs, with debug assertions on (integer overflow panics), and prints a
# table last. Exits 1 if any target found a crash; its input is kept under
# {engine,backends}/fuzz/artifacts/TARGET/ (replay: cd engine && cargo +nightly fuzz run -O -a
# TARGET fuzz/artifacts/TARGET/crash-…). Corpora grow under {engine,backends}/fuzz/corpus/
# (ignored by git) and are reused by the next run.
#
#   scripts/fuzz.sh                 every target, 60 s each
#   scripts/fuzz.sh 600 load        one target for 10 minutes
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz if
# missing. Not part of the test suite (CI has no nightly): the crashes it finds become unit
# tests there.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
engine_targets=(safetensors_header tensorizer_index plan load convert sharded_index)
backend_targets=(nfs_replies remote_fields)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${engine_targets[@]}" "${backend_targets[@]}")

cargo +nightly --version >/dev/null 2>&1 || {
    echo "fuzz.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
}
cargo +nightly fuzz --version >/dev/null 2>&1 ||
    cargo install cargo-fuzz --version 0.13.2 --locked

crate_of() {
    case " ${engine_targets[*]} " in *" $1 "*) echo engine; return ;; esac
    case " ${backend_targets[*]} " in *" $1 "*) echo backends; return ;; esac
    echo "fuzz.sh: unknown target $1 (targets: ${engine_targets[*]} ${backend_targets[*]})" >&2
    exit 2
}
for t in "${targets[@]}"; do crate_of "$t" >/dev/null; done

# Seeds, once: a small safetensors file in several dtypes, its tensorizer conversions (plain
# and encrypted with the key the targets use, 32 bytes of 0x07), the shared mixed-dtype
# fixture when present, and well-formed NFS replies.
if [ ! -d engine/fuzz/corpus/load ] || [ ! -d backends/fuzz/corpus/nfs_replies ]; then
    echo "fuzz.sh: writing seeds" >&2
    cargo build --release --quiet --bin tensorstream
    models=$(mktemp -d)
    trap 'rm -rf "$models"' EXIT
    python3 scripts/fuzz_seeds.py model "$models/small.safetensors"
    printf '\007%.0s' $(seq 32) >"$models/key"
    ts=${CARGO_TARGET_DIR:-target}/release/tensorstream  # where `cargo build` just put it
    "$ts" convert --quiet "$models/small.safetensors" "$models/small.tensors" >/dev/null
    "$ts" convert --quiet --encrypt-key-file "$models/key" "$models/small.safetensors" \
        "$models/small_encrypted.tensors" >/dev/null
    rm "$models/key"
    [ ! -f ../shared/fixtures/mixed.safetensors ] ||
        cp ../shared/fixtures/mixed.safetensors "$models/"
    python3 scripts/fuzz_seeds.py seeds "$models" engine/fuzz/corpus backends/fuzz/corpus
fi

declare -A runs result
status=0
for t in "${targets[@]}"; do
    crate=$(crate_of "$t")
    log=$(mktemp)
    echo "fuzz.sh: $t for ${secs}s ($crate/fuzz)" >&2
    mkdir -p "$crate/fuzz/corpus/$t"
    set +e
    (cd "$crate" && cargo +nightly fuzz run -O -a "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -max_len=65536) >"$log" 2>&1
    rc=$?
    set -e
    runs[$t]=$(grep -o '^Done [0-9]* runs' "$log" | awk '{print $2}' || true)
    if [ $rc -eq 0 ]; then
        result[$t]=ok
    else
        status=1
        art=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/.* to //')
        case $art in /*) art=${art#"$PWD/"} ;; ?*) art=$crate/$art ;; esac
        result[$t]="FAILED (rc $rc${art:+, input $art})"
        grep -E 'panicked|ERROR|SUMMARY|error\[|^error' "$log" | head -5 >&2 || true
        mkdir -p "$crate/fuzz/artifacts"
        cp "$log" "$crate/fuzz/artifacts/$t.log"
        echo "fuzz.sh: $t's log: $crate/fuzz/artifacts/$t.log" >&2
    fi
    rm -f "$log"
done

echo
printf '%-20s %-12s %-10s %s\n' target runs corpus result
for t in "${targets[@]}"; do
    crate=$(crate_of "$t")
    n=$(find "$crate/fuzz/corpus/$t" -type f | wc -l)
    printf '%-20s %-12s %-10s %s\n' "$t" "${runs[$t]:-?}" "$n" "${result[$t]}"
done
exit $status
