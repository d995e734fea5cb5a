#!/usr/bin/env bash
# Runs the benchmarks in scripts/ one after another (what `make bench` runs). A benchmark NAME is
# scripts/bench_NAME.sh if present (a wrapper that prepares and runs it), else scripts/bench_NAME.py
# (run with the benchmark venv's Python). Usage: scripts/bench.sh [NAME...] [-- args for each]
#   scripts/bench.sh                      # all of them
#   scripts/bench.sh cluster -- --sizes 1000,5000
# Env: BENCH_PYTHON=interpreter for bench_*.py (default: /tmp/bench-venv/bin/python, created
#      with numpy and scikit-learn from PyPI if missing; BENCH_PY_VENV moves it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

selected=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        *) selected+=("$1"); shift ;;
    esac
done

VENV="${BENCH_PY_VENV:-/tmp/bench-venv}"
python_for_bench() {
    if [ -n "${BENCH_PYTHON:-}" ]; then
        echo "$BENCH_PYTHON"
        return
    fi
    if ! "$VENV/bin/python" -c 'import numpy, sklearn' >/dev/null 2>&1; then
        echo "bench: preparing $VENV with numpy and scikit-learn" >&2
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet numpy scikit-learn >&2
    fi
    echo "$VENV/bin/python"
}

shopt -s nullglob
names=()
for f in scripts/bench_*.sh scripts/bench_*.py; do
    name="${f#scripts/bench_}"
    name="${name%.*}"
    [[ " ${names[*]} " == *" $name "* ]] || names+=("$name")
done
if [ ${#selected[@]} -gt 0 ]; then
    for name in "${selected[@]}"; do
        [[ " ${names[*]} " == *" $name "* ]] || { echo "bench: no benchmark '$name' (have: ${names[*]})" >&2; exit 2; }
    done
    names=("${selected[@]}")
fi
if [ ${#names[@]} -eq 0 ]; then
    echo "bench: no scripts/bench_*.sh or scripts/bench_*.py found"
    exit 0
fi

failed=()
for name in "${names[@]}"; do
    if [ -f "scripts/bench_$name.sh" ]; then
        printf '\n==> scripts/bench_%s.sh %s\n' "$name" "$*"
        bash "scripts/bench_$name.sh" "$@" || failed+=("$name")
    else
        printf '\n==> scripts/bench_%s.py %s\n' "$name" "$*"
        "$(python_for_bench)" "scripts/bench_$name.py" "$@" || failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench: failed: ${failed[*]}" >&2
    exit 1
fi
