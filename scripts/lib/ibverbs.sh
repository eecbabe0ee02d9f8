# shellcheck shell=bash
# rdma-core's libibverbs headers, as the lab's guests run rdma-core, for the ABI check of the
# hand-written libibverbs declarations (backend/tests/rdma_abi.rs). Sourced by common.sh.
#
# The server never needs them to build: it loads libibverbs at run time. The test compiles a
# small C program against them and compares every size and offset with the Rust side.

# Prints the include folder of libibverbs-dev of the lab's suite, downloaded (never installed)
# and unpacked into the cache. The version is the one the archive offers today, printed as
# resolved; when the package index cannot be fetched, the newest copy in the cache is used.
ibverbs_headers() {
    local version dir options cached
    if lab_refresh_apt_index; then
        version=$(lab_apt_cache policy libibverbs-dev | awk '/Candidate:/ { print $2 }')
        [ -n "$version" ] && [ "$version" != "(none)" ] ||
            die "the package index of ${LAB_SUITES[*]} has no libibverbs-dev"
    else
        cached=$(find "$LAB_CACHE" -maxdepth 1 -name 'ibverbs-dev-*' -type d 2>/dev/null | sort -V | tail -n 1)
        [ -n "$cached" ] && [ -e "$cached/complete" ] ||
            die "the package index is unreachable and no libibverbs-dev was fetched before; check the network or LAB_DEBIAN_MIRROR."
        step "the package index is unreachable: using $(basename "$cached") from the cache"
        echo "$cached/root/usr/include"
        return 0
    fi
    dir="$LAB_CACHE/ibverbs-dev-${version//[:~+]/_}"
    if [ ! -e "$dir/complete" ]; then
        rm -rf "$dir"
        mkdir -p "$dir/download"
        mapfile -t options < <(lab_apt_options)
        (cd "$dir/download" &&
            run_fetching "$dir/download.log" "libibverbs-dev $version" "" \
                apt-get "${options[@]}" -q download "libibverbs-dev=$version")
        dpkg-deb -x "$dir"/download/libibverbs-dev_*.deb "$dir/root" ||
            die "could not unpack $(ls "$dir"/download/*.deb)"
        touch "$dir/complete"
    fi
    step "resolved: libibverbs-dev $version (rdma-core's headers, for the libibverbs ABI check)"
    echo "$dir/root/usr/include"
}
