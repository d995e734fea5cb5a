# Sourced by the setup scripts: `as_root CMD...` runs CMD as root, directly when the script
# already runs as root, else through sudo; without either it calls the sourcing script's `die`.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root privileges (or sudo) to run: $*"
    fi
}
