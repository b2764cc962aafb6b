#!/usr/bin/env bash
# Builds, or reuses, the Debian root filesystem the systemd tests boot in
# systemd-nspawn containers (issue 11), and prints the directory it is unpacked in.
#
#   bash .ci/rootfs.sh            # prints e.g. /var/cache/directord-ci/rootfs-bookworm-3f2a…
#
# The rootfs is a debootstrap minbase of $SUITE with systemd as PID 1, D-Bus and
# python3 (the node runs the host's bind-mounted Python; python3 is there for
# ad-hoc use). It is cached as a .tar.zst under $CACHE, keyed by a hash of the suite,
# the package list and this script's layout version, so a change to either builds a
# new one and an unchanged list reuses it: building takes 75-90 s and about 295 MB,
# unpacking the 123 MB tarball about 2 s. The unpacked directory is kept next to the
# tarball and reused as is; containers boot it with --volatile=overlay, so it is
# never written to.
#
# The machine id is emptied (/etc/machine-id) and removed (/var/lib/dbus/machine-id):
# each container is booted with its own --uuid and systemd takes its machine id
# from that, so containers from one rootfs do not share one. /etc/hostname (the
# host's, copied by debootstrap) is removed for the same reason: each container
# keeps the --hostname nspawn gives it.
#
# Installs systemd-container, debootstrap and zstd with apt-get when they are absent.
# Progress goes to stderr; stdout carries only the directory. Concurrent runs wait
# for each other (flock on $CACHE/rootfs.lock).
#
# Environment:
#   DIRECTORD_CI_CACHE   cache directory (default /var/cache/directord-ci)
#   DIRECTORD_CI_SUITE   Debian suite (default bookworm)
#   DIRECTORD_CI_MIRROR  Debian mirror (default: the first URIs of the stanza in
#                        /etc/apt/sources.list.d/debian.sources that lists the suite,
#                        else http://deb.debian.org/debian)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CACHE=${DIRECTORD_CI_CACHE:-/var/cache/directord-ci}
SUITE=${DIRECTORD_CI_SUITE:-bookworm}
PACKAGES=(systemd systemd-sysv dbus python3 libpam-systemd)
# Bump when what this script does to the rootfs changes (not only its package list).
LAYOUT=2

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'rootfs.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: debootstrap and systemd-nspawn need it"

# ---- host tools ------------------------------------------------------------------------
missing=()
for pkg in systemd-container debootstrap zstd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >&2
fi

# ---- mirror ----------------------------------------------------------------------------
mirror_from_sources() {
    # The URIs of the first deb822 stanza whose Suites lists $SUITE exactly.
    local file=/etc/apt/sources.list.d/debian.sources
    [[ -r $file ]] || return 0
    awk -v suite="$SUITE" '
        /^[[:space:]]*$/ { if (uris != "" && hit) { print uris; exit } uris = ""; hit = 0; next }
        /^URIs:/   { uris = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
        END        { if (uris != "" && hit) print uris }
    ' "$file" | head -n1
}
MIRROR=${DIRECTORD_CI_MIRROR:-$(mirror_from_sources)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# ---- cache key -------------------------------------------------------------------------
KEY=$(printf '%s\n' "suite=$SUITE" "layout=$LAYOUT" "${PACKAGES[@]}" | sha256sum | cut -c1-16)
NAME=rootfs-$SUITE-$KEY
TARBALL=$CACHE/$NAME.tar.zst
ROOT=$CACHE/$NAME
STAMP=.directord-ci-rootfs   # written last, inside ROOT: a directory without it is partial

mkdir -p "$CACHE"
exec 9>"$CACHE/rootfs.lock"
flock 9

if [[ -f $ROOT/$STAMP ]]; then
    log "reusing $ROOT"
    printf '%s\n' "$ROOT"
    exit 0
fi
rm -rf "$ROOT" "$ROOT.tmp"

if [[ ! -f $TARBALL ]]; then
    log "building $NAME: debootstrap $SUITE from $MIRROR (75-90 s)"
    started=$SECONDS
    build=$CACHE/$NAME.build
    rm -rf "$build"
    include=$(IFS=,; echo "${PACKAGES[*]}")
    if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$build" "$MIRROR" >&2; then
        rm -rf "$build"
        die "debootstrap failed (see above)"
    fi
    # One machine id per container (from --uuid), not one for every container.
    : >"$build/etc/machine-id"
    rm -f "$build/var/lib/dbus/machine-id"
    # debootstrap copies the host's /etc/hostname, and systemd would set it at boot over
    # nspawn's --hostname: without the file each container keeps its machine name.
    rm -f "$build/etc/hostname"
    # debootstrap's apt caches are of no use inside a throwaway container.
    rm -rf "$build"/var/cache/apt/archives/*.deb "$build"/var/lib/apt/lists/*_Packages
    printf 'suite=%s\nlayout=%s\npackages=%s\nmirror=%s\n' \
        "$SUITE" "$LAYOUT" "${PACKAGES[*]}" "$MIRROR" >"$build/$STAMP"
    log "debootstrap took $((SECONDS - started)) s; packing $TARBALL"
    tar --numeric-owner --xattrs --xattrs-include='*' --acls -C "$build" \
        -I 'zstd -T0 -3 -q' -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    mv "$build" "$ROOT"
    log "built $ROOT in $((SECONDS - started)) s ($(du -h "$TARBALL" | cut -f1) packed)"
    printf '%s\n' "$ROOT"
    exit 0
fi

log "unpacking $TARBALL"
started=$SECONDS
mkdir "$ROOT.tmp"
if ! tar --numeric-owner --xattrs --xattrs-include='*' --acls -C "$ROOT.tmp" \
        -I 'zstd -q' -xf "$TARBALL"; then
    rm -rf "$ROOT.tmp"
    die "could not unpack $TARBALL: delete it to build it again"
fi
[[ -f $ROOT.tmp/$STAMP ]] || { rm -rf "$ROOT.tmp"; die "$TARBALL is incomplete: delete it"; }
mv "$ROOT.tmp" "$ROOT"
log "unpacked in $((SECONDS - started)) s"
printf '%s\n' "$ROOT"
