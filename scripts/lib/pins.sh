# shellcheck shell=bash
# The pinned versions of the guest lab. Sourced by common.sh; part of every recipe's cache
# key, so changing a pin builds fresh artifacts.
# The guest kernel, its headers and its source must match exactly.
LAB_SUITE=trixie
LAB_QEMU_VERSION='1:11.1.3+ds-1~bpo13+1'
LAB_KERNEL_VERSION='6.12.117-1'
LAB_KERNEL_ABI='6.12.117+deb13-amd64'
LAB_KERNEL_SOURCE_PACKAGE='linux-source-6.12'
