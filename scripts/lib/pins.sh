# shellcheck shell=bash
# What the guest lab depends on: upstream series, not Debian revisions. Debian's archive keeps
# only the current revision of a package, so an exact pin breaks the day it is superseded.
# scripts/lib/versions.sh resolves each series to the newest version the archive offers at
# build time; the resolved versions name the cache folders, so a new Debian revision builds
# fresh artifacts and an unchanged one reuses them.
#
# To force exact versions (reproducing a failure), set LAB_QEMU_VERSION and/or
# LAB_KERNEL_VERSION to Debian versions, for example LAB_KERNEL_VERSION=6.12.117-1.
LAB_SUITE=trixie
# The suites the lab's roots use, searched for the versions below.
LAB_SUITES=("$LAB_SUITE" "$LAB_SUITE-updates" "$LAB_SUITE-backports")

# QEMU: vfio-user-pci first shipped in 10.1; the tests were written against the 11.1 series,
# which trixie-backports carries (trixie itself has 10.0, without vfio-user-pci).
LAB_QEMU_PACKAGE=qemu-system-x86
LAB_QEMU_SERIES=11.1
LAB_QEMU_MINIMUM=10.1

# The guest kernel: trixie's 6.12 series, amd64 flavour. The image, its headers and
# linux-source-6.12 must be of one version (vmw_pvrdma.ko is built from that source).
LAB_KERNEL_SERIES=6.12
LAB_KERNEL_FLAVOUR=amd64
LAB_KERNEL_SOURCE_PACKAGE="linux-source-$LAB_KERNEL_SERIES"
