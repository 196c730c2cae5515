#!/usr/bin/env bash
# Provides a real kube-apiserver and a matching kubectl for the Kubernetes backend's tests.
#
#   ./scripts/kube-apiserver.sh        # prints two lines: KUBE_APISERVER=<path> and KUBECTL=<path>
#
# The binaries are cached under ${XDG_CACHE_HOME:-$HOME/.cache}/pixiu-metadata/, outside the
# checkout, so only the first run on a machine builds (a few minutes on 2 cores); later runs
# print the cached paths at once. Delete that directory to force a rebuild.
#
# How: Debian bookworm's source package of Kubernetes 1.20.2 (`apt-get source`, with deb-src
# added next to the existing Debian sources), built as Debian's debian/rules does (a GOPATH
# with a symlink to the tree, `make WHAT=cmd/kube-apiserver`, CGO off), with Go 1.19 from
# golang-go. The vendored github.com/modern-go/reflect2 does not work with Go 1.19, so Debian's
# packaged copy replaces it. kubectl comes from Debian's kubernetes-client 1.20, unpacked into the
# cache (not installed: /usr/bin/kubectl may belong to another package).
# Needs root (or sudo) for apt-get when something is missing. Progress goes to stderr.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/pixiu-metadata/kubernetes-1.20.2"
BIN="$CACHE/bin"
APISERVER="$BIN/kube-apiserver"
KUBECTL="$BIN/kubectl"

log() { printf 'kube-apiserver.sh: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        log "need root (or sudo) for: $*"
        return 1
    fi
}

APT_UPDATED=
apt_update() {
    if [ -z "$APT_UPDATED" ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}
apt_install() {
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

works() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

# deb-src entries: a copy of the Debian sources with the type changed, so no host is named here.
ensure_deb_src() {
    if grep -rqs '^\(Types:.*deb-src\|deb-src \)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    log "adding deb-src entries for the Debian sources"
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources |
            as_root tee /etc/apt/sources.list.d/pixiu-deb-src.sources >/dev/null
    elif [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list |
            as_root tee /etc/apt/sources.list.d/pixiu-deb-src.list >/dev/null
    else
        log "no Debian apt sources found to derive deb-src entries from"
        return 1
    fi
    APT_UPDATED=
}

build_apiserver() {
    ensure_deb_src
    local missing=()
    command -v go >/dev/null || missing+=(golang-go)
    command -v rsync >/dev/null || missing+=(rsync)
    command -v jq >/dev/null || missing+=(jq)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
    command -v make >/dev/null || missing+=(make)
    [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] ||
        missing+=(golang-github-modern-go-reflect2-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    apt_update

    local work="$CACHE/build"
    rm -rf "$work"
    mkdir -p "$work"
    log "fetching Debian's kubernetes 1.20.2 source into $work"
    (cd "$work" && apt-get source -qq kubernetes >&2)
    local src
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [ -n "$src" ] || { log "apt-get source produced no kubernetes-* directory"; return 1; }

    log "replacing vendor/github.com/modern-go/reflect2 with Debian's copy"
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/"

    mkdir -p "$src/.go/src/k8s.io"
    ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
    log "building cmd/kube-apiserver (minutes on 2 cores)"
    (
        cd "$src/.go/src/k8s.io/kubernetes"
        export GOPATH="$src/.go" GOCACHE="$CACHE/gocache"
        CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2
    )
    local out
    out=$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
    [ -n "$out" ] || { log "the build produced no kube-apiserver"; return 1; }
    mkdir -p "$BIN"
    cp "$out" "$APISERVER.tmp"
    mv "$APISERVER.tmp" "$APISERVER"
    rm -rf "$work" "$CACHE/gocache"
}

unpack_kubectl() {
    apt_update
    local tmp
    tmp=$(mktemp -d)
    log "unpacking Debian's kubernetes-client"
    (cd "$tmp" && apt-get download -qq kubernetes-client >&2)
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/root"
    mkdir -p "$BIN"
    cp "$tmp/root/usr/bin/kubectl" "$KUBECTL.tmp"
    mv "$KUBECTL.tmp" "$KUBECTL"
    rm -rf "$tmp"
}

started=$SECONDS
if ! works "$APISERVER"; then
    build_apiserver
    log "kube-apiserver built in $((SECONDS - started))s"
fi
if ! [ -x "$KUBECTL" ] || ! "$KUBECTL" version --client >/dev/null 2>&1; then
    unpack_kubectl
fi
echo "KUBE_APISERVER=$APISERVER"
echo "KUBECTL=$KUBECTL"
