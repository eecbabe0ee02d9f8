# shellcheck shell=bash
# Resolves the lab's pins (pins.sh: upstream series) to the Debian versions the archive offers
# today. Sourced by common.sh.
#
# The decisions (resolve_qemu_version, resolve_kernel_version) read the archive only through
# lab_apt_cache: apt-cache over a private package index of the lab's suites, kept in the cache
# and refreshed by lab_refresh_apt_index; or, in the resolver's own tests, the command named by
# LAB_APT_CACHE_COMMAND, which answers from recorded apt-cache output without the network.

lab_apt_dir() { echo "$LAB_CACHE/apt-index"; }

# apt options that point apt at the private index instead of the host's own sources and state.
lab_apt_options() {
    local dir
    dir=$(lab_apt_dir)
    printf '%s\n' -o "Dir::Etc=$dir/etc" -o "Dir::Etc::SourceParts=$dir/etc/sources.list.d" \
        -o "Dir::State=$dir/state" -o "Dir::State::Lists=$dir/lists" \
        -o "Dir::State::status=$dir/state/status" -o "Dir::Cache=$dir/cache" \
        -o "Dir::Cache::pkgcache=$dir/cache/pkgcache.bin" \
        -o "Dir::Cache::srcpkgcache=$dir/cache/srcpkgcache.bin" \
        -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Debug::NoLocking=1 \
        -o Acquire::Retries=3 -o Acquire::Languages=none \
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false
}

lab_apt_cache() {
    if [ -n "${LAB_APT_CACHE_COMMAND:-}" ]; then
        "$LAB_APT_CACHE_COMMAND" "$@"
        return
    fi
    local options
    mapfile -t options < <(lab_apt_options)
    apt-cache "${options[@]}" "$@"
}

# Fetches the package indices of the lab's suites (a few seconds; apt asks only for what
# changed). Retries network trouble; a final failure names the suites that failed.
lab_refresh_apt_index() {
    [ -z "${LAB_APT_CACHE_COMMAND:-}" ] || return 0
    local dir mirror suite options attempt log
    dir=$(lab_apt_dir)
    mirror=$(debian_mirror)
    mkdir -p "$dir/etc/sources.list.d" "$dir/etc/preferences.d" "$dir/state" \
        "$dir/lists/partial" "$dir/cache/archives/partial"
    : >"$dir/state/status"
    for suite in "${LAB_SUITES[@]}"; do
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
    done >"$dir/etc/sources.list"
    mapfile -t options < <(lab_apt_options)
    log="$dir/update.log"
    for attempt in 1 2 3; do
        if apt-get "${options[@]}" -q --error-on=any update >"$log" 2>&1; then
            return 0
        fi
        step "fetching the package index of ${LAB_SUITES[*]} from $mirror failed (attempt $attempt of 3)"
        [ "$attempt" -lt 3 ] && sleep "${LAB_RETRY_PAUSE:-10}"
    done
    printf 'error: could not fetch the package index from %s:\n' "$mirror" >&2
    grep -E '^(Err|E|W):' "$log" | head -n 10 >&2 || tail -n 10 "$log" >&2
    return 1
}

# "VERSION SUITE" for each version of package $1 the archive offers, newest first as apt
# lists them (apt-cache madison: "pkg | version | mirror suite/component arch Packages").
offered_versions() {
    lab_apt_cache madison "$1" 2>/dev/null |
        awk -F'|' -v pkg="$1" '{
            name = $1; gsub(/ /, "", name); version = $2; gsub(/ /, "", version)
            split($3, where, " "); suite = where[2]; sub(/\/.*/, "", suite)
            if (name == pkg && version != "") print version, suite
        }'
}

# The upstream part of a Debian version: 1:11.1.3+ds-2~bpo13+1 -> 11.1.3.
upstream_version() {
    local version=$1
    [[ "$version" == *:* ]] && version=${version#*:}
    echo "${version%%[+~-]*}"
}

# True when upstream version $2 belongs to series $1 (11.1.3 is in 11.1; 11.10.0 is not).
in_series() {
    [ "$2" = "$1" ] || [[ "$2" == "$1".* ]]
}

# Reads lines whose first word is a Debian version; prints the line with the newest one.
newest_line() {
    local best='' best_version='' line version
    while read -r line; do
        [ -n "$line" ] || continue
        version=${line%% *}
        if [ -z "$best" ] || dpkg --compare-versions "$version" gt "$best_version"; then
            best=$line best_version=$version
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# A one-line list of what the archive offers: "v1 (suite), v2 (suite)".
describe_offers() {
    awk 'NF { printf "%s%s (%s)", sep, $1, $2; sep = ", " } END { if (!sep) printf "nothing" }'
}

# Prints "VERSION SUITE": the forced LAB_QEMU_VERSION if the archive has it, else the newest
# qemu-system-x86 of LAB_QEMU_SERIES that is at least LAB_QEMU_MINIMUM.
resolve_qemu_version() {
    local offers line version upstream chosen
    offers=$(offered_versions "$LAB_QEMU_PACKAGE")
    if [ -n "${LAB_QEMU_VERSION:-}" ]; then
        line=$(awk -v want="$LAB_QEMU_VERSION" '$1 == want' <<<"$offers" | head -n 1)
        [ -n "$line" ] || die "LAB_QEMU_VERSION=$LAB_QEMU_VERSION: $LAB_QEMU_PACKAGE $LAB_QEMU_VERSION is not in the archive (${LAB_SUITES[*]}); it offers: $(describe_offers <<<"$offers")."
        upstream=$(upstream_version "$LAB_QEMU_VERSION")
        dpkg --compare-versions "$upstream" ge "$LAB_QEMU_MINIMUM" ||
            die "LAB_QEMU_VERSION=$LAB_QEMU_VERSION: QEMU $upstream is older than $LAB_QEMU_MINIMUM, the first with vfio-user-pci."
        echo "$line"
        return
    fi
    chosen=$(while read -r version suite; do
        [ -n "$version" ] || continue
        upstream=$(upstream_version "$version")
        in_series "$LAB_QEMU_SERIES" "$upstream" || continue
        dpkg --compare-versions "$upstream" ge "$LAB_QEMU_MINIMUM" || continue
        echo "$version $suite"
    done <<<"$offers" | newest_line) ||
        die "no $LAB_QEMU_PACKAGE of the $LAB_QEMU_SERIES series (at least $LAB_QEMU_MINIMUM) in ${LAB_SUITES[*]}; the archive offers: $(describe_offers <<<"$offers"). Move LAB_QEMU_SERIES in scripts/lib/pins.sh, or force one with LAB_QEMU_VERSION."
    echo "$chosen"
}

# Prints "VERSION ABI": the forced LAB_KERNEL_VERSION, else the newest version of the
# LAB_KERNEL_SERIES kernel at which linux-image-ABI, linux-headers-ABI and the source package
# all exist together (an image without its source cannot get vmw_pvrdma.ko built).
resolve_kernel_version() {
    local sources abis abi images headers version candidates='' report='' chosen
    sources=$(offered_versions "$LAB_KERNEL_SOURCE_PACKAGE" | awk '{ print $1 }' | sort -u)
    abis=$(lab_apt_cache pkgnames "linux-image-$LAB_KERNEL_SERIES." 2>/dev/null |
        grep -E "^linux-image-${LAB_KERNEL_SERIES//./\\.}\.[0-9]+\+deb[0-9]+-$LAB_KERNEL_FLAVOUR\$" |
        sed 's/^linux-image-//' | sort -u || true)
    for abi in $abis; do
        images=$(offered_versions "linux-image-$abi" | awk '{ print $1 }' | sort -u)
        headers=$(offered_versions "linux-headers-$abi" | awk '{ print $1 }' | sort -u)
        report+=$'\n'"  linux-image-$abi: $(echo $images); linux-headers-$abi: $(echo ${headers:-none})"
        for version in $images; do
            grep -qxF -- "$version" <<<"$headers" || continue
            grep -qxF -- "$version" <<<"$sources" || continue
            candidates+="$version $abi"$'\n'
        done
    done
    report+=$'\n'"  $LAB_KERNEL_SOURCE_PACKAGE: $(echo ${sources:-none})"
    if [ -n "${LAB_KERNEL_VERSION:-}" ]; then
        chosen=$(awk -v want="$LAB_KERNEL_VERSION" '$1 == want' <<<"$candidates" | head -n 1)
        [ -n "$chosen" ] || die "LAB_KERNEL_VERSION=$LAB_KERNEL_VERSION: the archive has no linux-image, linux-headers and $LAB_KERNEL_SOURCE_PACKAGE all at $LAB_KERNEL_VERSION; it offers:$report"
        echo "$chosen"
        return
    fi
    chosen=$(newest_line <<<"$candidates") ||
        die "no $LAB_KERNEL_SERIES kernel ($LAB_KERNEL_FLAVOUR) whose image, headers and $LAB_KERNEL_SOURCE_PACKAGE share a version in ${LAB_SUITES[*]}; the archive offers:$report"
    echo "$chosen"
}

# Resolves every pin once per run and exports the result, so the scripts that scripts/lab
# runs see the same versions without asking the archive again. When the index cannot be
# fetched, a lab built before (lab.env) is reused if its artifacts are complete.
lab_resolve_versions() {
    if [ -n "${LAB_VERSIONS_RESOLVED:-}" ]; then
        lab_set_dirs
        return 0
    fi
    local qemu kernel
    if lab_refresh_apt_index; then
        qemu=$(resolve_qemu_version)
        kernel=$(resolve_kernel_version)
        LAB_QEMU_VERSION=${qemu%% *} LAB_QEMU_SUITE=${qemu#* }
        LAB_KERNEL_VERSION=${kernel%% *} LAB_KERNEL_ABI=${kernel#* }
        step "resolved: $LAB_QEMU_PACKAGE $LAB_QEMU_VERSION ($LAB_QEMU_SUITE); kernel $LAB_KERNEL_ABI $LAB_KERNEL_VERSION with $LAB_KERNEL_SOURCE_PACKAGE $LAB_KERNEL_VERSION"
    else
        lab_reuse_previous_versions ||
            die "the package index is unreachable and no complete lab was built before; check the network or LAB_DEBIAN_MIRROR."
    fi
    export LAB_QEMU_VERSION LAB_QEMU_SUITE LAB_KERNEL_VERSION LAB_KERNEL_ABI
    export LAB_VERSIONS_RESOLVED=1
    lab_set_dirs
}

lab_reuse_previous_versions() {
    [ -r "$LAB_ENV_FILE" ] || return 1
    local qemu_version kernel_version
    qemu_version=$(lab_env_value LAB_QEMU_VERSION)
    kernel_version=$(lab_env_value LAB_KERNEL_VERSION)
    [ -z "${LAB_QEMU_VERSION:-}" ] || [ "$LAB_QEMU_VERSION" = "$qemu_version" ] || return 1
    [ -z "${LAB_KERNEL_VERSION:-}" ] || [ "$LAB_KERNEL_VERSION" = "$kernel_version" ] || return 1
    LAB_QEMU_VERSION=$qemu_version
    LAB_QEMU_SUITE=$(lab_env_value LAB_QEMU_SUITE)
    LAB_KERNEL_VERSION=$kernel_version
    LAB_KERNEL_ABI=$(lab_env_value LAB_KERNEL_ABI)
    [ -n "$LAB_QEMU_VERSION" ] && [ -n "$LAB_KERNEL_VERSION" ] && [ -n "$LAB_KERNEL_ABI" ] || return 1
    lab_set_dirs
    [ -e "$LAB_QEMU_DIR/complete" ] && [ -e "$LAB_GUEST_DIR/complete" ] || return 1
    step "warning: the package index is unreachable; reusing the lab resolved before: $LAB_QEMU_PACKAGE $LAB_QEMU_VERSION, kernel $LAB_KERNEL_VERSION"
}

# One value of lab.env, without its quotes.
lab_env_value() {
    sed -n "s/^$1='\\(.*\\)'\$/\\1/p" "$LAB_ENV_FILE"
}
