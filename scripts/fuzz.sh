#!/usr/bin/env bash
# Fuzzes the actors crate's parsers with cargo-fuzz (libFuzzer) for a bounded time.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS is per target (default 60); TARGETs default to all of fuzz/fuzz_targets/
# (upload_image, stream_entry). Not run in CI. Needs `cargo install cargo-fuzz` and
# a nightly toolchain; without one, stable is used with RUSTC_BOOTSTRAP=1. The fuzz
# crate is its own workspace (fuzz/Cargo.toml) and builds into fuzz/target, so the
# rest of the project never needs nightly.
#
# Each target starts from its checked-in seeds (fuzz/seeds/<target>, read-only) and
# grows a working corpus in fuzz/corpus/<target> (git-ignored, kept between runs).
# Crashes, timeouts and OOMs land in fuzz/artifacts/<target>/; the script lists the
# new ones and exits 1 if there are any. To keep one as a regression case:
#
#   cd fuzz && cargo +nightly fuzz tmin <target> artifacts/<target>/<file>
#   cp artifacts/<target>/minimized-from-* ../actors/tests/fuzz-regressions/<target>/<name>
#   cargo test -p media-clustering-actors --test fuzz_regressions
#
# Environment: FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT (seconds per input, default 10),
# FUZZ_ARGS (extra libFuzzer flags, e.g. "-max_len=65536", or
# "-fork=1 -ignore_crashes=1 -ignore_ooms=1" to go on past a known finding).
set -euo pipefail

secs="${1:-60}"
shift || true
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$root/fuzz"
cd "$fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
  exit 2
fi

# Nightly if there is one, else stable with the bootstrap escape hatch for -Z flags.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  cargo=(cargo +nightly)
else
  echo "no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo)
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
  done
fi

for t in "${targets[@]}"; do
  "${cargo[@]}" fuzz build "$t"
done

rss="${FUZZ_RSS_MB:-2048}"
timeout="${FUZZ_TIMEOUT:-10}"
logs="$fuzz/target/fuzz-logs"
mkdir -p "$logs"
found=0
summary=()

for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before="$(find "artifacts/$t" -type f -printf '%f\n' | sort)"
  dict=()
  [ -f "$t.dict" ] && dict=("-dict=$t.dict")
  log="$logs/$t.log"
  echo "== $t: ${secs}s (log: $log)"
  set +e
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  "${cargo[@]}" fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb="$rss" -timeout="$timeout" \
    -print_final_stats=1 "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  stats="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
  execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)"
  new="$(comm -13 <(echo "$before") <(find "artifacts/$t" -type f -printf '%f\n' | sort) | sed '/^$/d')"
  if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
    found=1
    summary+=("$t: FINDING (exit $rc), executions ${execs:-?}")
    grep -E '^==[0-9]+== ?ERROR|panicked at|^SUMMARY|out-of-memory|timeout' "$log" | head -n 5 || true
    for a in $new; do
      summary+=("    fuzz/artifacts/$t/$a")
    done
  else
    summary+=("$t: ok, executions ${execs:-?}, last: ${stats:-?}")
  fi
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "$found" -ne 0 ]; then
  echo "findings above: minimise with 'cargo +nightly fuzz tmin <target> <artifact>' (see $0)" >&2
  exit 1
fi
