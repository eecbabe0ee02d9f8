# shellcheck shell=bash
# Shared settings and helpers of the lab scripts. Source it; it sets `-euo pipefail`.
#
# Everything the lab builds lives in LAB_CACHE (outside the checkout), in folders named after
# the resolved versions (pins.sh, versions.sh) and a recipe hash, so a second run finds its artifacts and a
# change of version or recipe builds fresh ones beside the old.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/pins.sh"
source "$(dirname "${BASH_SOURCE[0]}")/versions.sh"
source "$(dirname "${BASH_SOURCE[0]}")/ibverbs.sh"

lab_top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# A recipe's key is a hash of the files that decide what it produces, so editing one of them
# builds a fresh artifact instead of reusing a stale one.
recipe_key() {
    (cd "$lab_top" && cat "$@" scripts/lib/pins.sh) | sha256sum | cut -c1-12
}
LAB_QEMU_RECIPE=$(recipe_key qemu/provision)
LAB_GUEST_RECIPE=$(recipe_key guest-tests/image/build guest-tests/image/init)

LAB_CACHE=${VFIO_USER_PVRDMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-user-pvrdma}
LAB_ENV_FILE="$LAB_CACHE/lab.env"

# The artifact folders, named after the resolved versions (lab_resolve_versions) and the
# recipe: a new Debian revision or an edited recipe builds beside the old, never over it.
lab_set_dirs() {
    LAB_QEMU_DIR="$LAB_CACHE/qemu-${LAB_QEMU_VERSION//[:~+]/_}-r$LAB_QEMU_RECIPE"
    LAB_GUEST_DIR="$LAB_CACHE/guest-${LAB_KERNEL_VERSION//[:~+]/_}-r$LAB_GUEST_RECIPE"
}

# One clock for a script and the scripts it runs, so progress lines read as one timeline.
export LAB_STARTED_AT=${LAB_STARTED_AT:-$(date +%s)}

# A progress line on stderr: "[lab +12s] message".
step() {
    printf '[lab +%ds] %s\n' "$(($(date +%s) - LAB_STARTED_AT))" "$*" >&2
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root (it builds Debian roots with mmdebstrap); run it as root or with sudo."
}

require_supported_host() {
    [ "$(uname -m)" = x86_64 ] || die "the lab runs x86_64 guests and needs an x86_64 Debian host (this is $(uname -m))."
    [ -r /etc/debian_version ] || die "the lab scripts use apt and mmdebstrap: run them on Debian 12 or newer."
}

# Installs the host packages the build needs, from the host's own apt sources.
require_host_packages() {
    local missing=() package command
    for pair in "$@"; do
        package=${pair%%:*}
        command=${pair#*:}
        command -v "$command" >/dev/null 2>&1 || missing+=("$package")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    require_root "installing ${missing[*]}"
    step "installing host packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q update >/dev/null ||
        die "apt-get update failed: the Debian package mirror is unreachable."
    DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        die "could not install ${missing[*]} with apt-get."
}

# The Debian mirror the host's apt already uses (override with LAB_DEBIAN_MIRROR).
debian_mirror() {
    if [ -n "${LAB_DEBIAN_MIRROR:-}" ]; then
        echo "$LAB_DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' |
        grep -E '/debian/?$' | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' |
            grep -E '/debian/?$' | head -n 1 || true)
    fi
    [ -n "$uri" ] || die "cannot find a Debian mirror in /etc/apt/sources*; set LAB_DEBIAN_MIRROR."
    echo "${uri%/}"
}

# Fails early when DIR's file system has less than MIB MiB free.
require_free_space() {
    local dir=$1 mib=$2 free
    mkdir -p "$dir"
    free=$(df -Pm "$dir" | awk 'NR == 2 { print $4 }')
    [ "$free" -ge "$mib" ] || die "$dir has ${free} MiB free; the lab build needs about ${mib} MiB."
}

# Runs a long command with its output in LOG; on failure shows the log's tail.
run_logged() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 || explain_failure "$log" "$1"
}

# Runs a command that downloads packages, with its output in LOG. Network trouble is retried
# (3 attempts, a pause between); a final failure says what was being fetched, and from where.
# RESET, when not empty, is a folder removed before each attempt (mmdebstrap wants a new one).
#
# Usage: run_fetching LOG WHAT RESET command...
run_fetching() {
    local log=$1 what=$2 reset=$3 attempt
    shift 3
    for attempt in 1 2 3; do
        [ -z "$reset" ] || rm -rf "$reset"
        "$@" >"$log" 2>&1 && return 0
        network_trouble "$log" || break
        step "fetching $what: network trouble (attempt $attempt of 3)"
        [ "$attempt" -eq 3 ] || sleep "${LAB_RETRY_PAUSE:-10}"
    done
    explain_failure "$log" "fetching $what"
}

network_trouble() {
    grep -qiE 'could not resolve|connection (refused|timed out|failed)|failed to fetch|unable to connect|temporary failure|hash sum mismatch|503|504' "$1"
}

explain_failure() {
    local log=$1 what=$2
    printf 'error: %s failed; the last lines of %s:\n' "$what" "$log" >&2
    tail -n 25 "$log" >&2
    if network_trouble "$log"; then
        printf 'error: %s: the Debian package mirror %s did not answer (after retries):\n' "$what" "$(debian_mirror)" >&2
        grep -iE 'failed to fetch|^err:' "$log" | head -n 5 >&2 || true
    fi
    if grep -qi 'no space left' "$log"; then
        printf 'error: the disk is full.\n' >&2
    fi
    exit 1
}
