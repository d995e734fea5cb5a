#!/usr/bin/env bash
# Create a Python virtualenv at DIR (nothing to do if DIR already holds one). When python3 has no venv module (Debian's python3 without python3-venv), install python3-venv first, as root or through sudo. Usage: scripts/venv.sh DIR
set -euo pipefail

die() { echo "venv.sh: ERROR: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: scripts/venv.sh DIR"
DIR=$1
[ -x "$DIR/bin/python" ] && exit 0

# shellcheck source=scripts/as_root.sh
source "$(dirname "${BASH_SOURCE[0]}")/as_root.sh"

python3 -m venv "$DIR" >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || die "python3 -m venv $DIR failed and apt-get is missing"
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }
{ apt_get install -y -qq python3-venv || { apt_get update -qq && apt_get install -y -qq python3-venv; }; } >/dev/null 2>&1 \
    || die "could not install python3-venv"
python3 -m venv "$DIR" || die "python3 -m venv $DIR failed"
