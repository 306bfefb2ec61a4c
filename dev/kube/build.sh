#!/usr/bin/env bash
# Build (or reuse) the Kubernetes test-harness binaries pinned in versions.env.
#
# Why: hubml is tested against a real control plane (kube-apiserver, etcd,
# controller-manager, scheduler) with kwok-simulated GPU nodes, built from the
# Go module proxy with this machine's Go, so no container runtime or prebuilt
# download site is needed. Binaries land in
#   ${HUBML_KUBE_CACHE:-${HUBML_CACHE:-~/.cache/hubml}}/kube-$KUBE_VERSION/bin/
# with one stamp file per binary (module@version + Go version): a binary whose
# stamp is missing or different (partial build, version bump) is rebuilt, any
# other is reused, so running this twice is cheap.
#
# Usage: bash dev/kube/build.sh [name ...]   (default: all binaries)
# Exit status is non-zero with the reason (and the tail of the Go log) when a
# build fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${HUBML_KUBE_CACHE:-${HUBML_CACHE:-$HOME/.cache/hubml}}
dir=$cache_root/kube-$KUBE_VERSION
bin=$dir/bin
src=$dir/src
logs=$dir/logs
mkdir -p "$bin" "$src" "$logs"

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: 'go' is not on PATH; install Go >= 1.26 (k8s.io/kubernetes $KUBE_VERSION needs it) and retry." >&2
    exit 2
fi
go_version=$(go env GOVERSION)
export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN=local
# Go's module and build caches for these builds stay in the harness cache while a build is
# needed (a failed run keeps them, so the retry is quick) and are removed once every binary
# is built: together about 10 GB, while the stamped binaries are all that is ever reused, and
# the real node's images need that disk. Caches the caller names (GOMODCACHE, GOCACHE) are
# theirs: used as they are and never removed.
own_go_caches=0
if [ -z "${GOMODCACHE:-}" ] && [ -z "${GOCACHE:-}" ]; then
    export GOMODCACHE=$dir/go-mod GOCACHE=$dir/go-build
    own_go_caches=1
fi

fail() {
    echo "build.sh: FAILED: $*" >&2
    exit 1
}

# write_module DIR MODULE VERSION [replace lines...]: a throwaway main module
# that requires MODULE@VERSION, so `go build` can build its commands with the
# dependency versions MODULE itself pins (go install pkg@v refuses modules
# whose go.mod has replace directives, as k8s.io/kubernetes does).
write_module() {
    local mdir=$1 module=$2 version=$3
    shift 3
    mkdir -p "$mdir"
    {
        echo "module hubml.local/kubebuild/$(basename "$mdir")"
        echo
        echo "go 1.26.0"
        echo
        echo "godebug default=go1.26"
        echo
        echo "require $module $version"
        if [ $# -gt 0 ]; then
            echo
            echo "replace ("
            printf '\t%s\n' "$@"
            echo ")"
        fi
    } > "$mdir/go.mod.new"
    if ! cmp -s "$mdir/go.mod.new" "$mdir/go.mod.want" 2>/dev/null; then
        cp "$mdir/go.mod.new" "$mdir/go.mod"
        cp "$mdir/go.mod.new" "$mdir/go.mod.want"
        rm -f "$mdir/go.sum"
    fi
    rm -f "$mdir/go.mod.new"
}

built=()
reused=()

# up_to_date NAME STAMP: the binary exists and its stamp matches.
up_to_date() {
    [ -x "$bin/$1" ] && [ -f "$bin/.$1.stamp" ] && [ "$(cat "$bin/.$1.stamp")" = "$2" ]
}

# build_one NAME MODULE_DIR PACKAGE STAMP [LDFLAGS]
build_one() {
    local name=$1 mdir=$2 pkg=$3 stamp_value=$4 ldflags=${5:-}
    local stamp=$bin/.$name.stamp
    if up_to_date "$name" "$stamp_value"; then
        echo "reuse  $name ($stamp_value)"
        reused+=("$name")
        return 0
    fi
    rm -f "$stamp"
    echo "build  $name from $pkg ($stamp_value) ..."
    local t0=$SECONDS
    if ! (cd "$mdir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.partial" "$pkg") \
            > "$logs/$name.log" 2>&1; then
        tail -n 40 "$logs/$name.log" >&2
        fail "go build of $name ($pkg) failed after $((SECONDS - t0)) s; full log: $logs/$name.log"
    fi
    mv -f "$bin/$name.partial" "$bin/$name"
    echo "$stamp_value" > "$stamp"
    echo "done   $name in $((SECONDS - t0)) s"
    echo "$(date -u +%FT%TZ) $name $stamp_value $((SECONDS - t0))s" >> "$dir/build-times.txt"
    built+=("$name")
}

want() {  # want NAME: true when NAME is selected on the command line (or none given)
    [ ${#selected[@]} -eq 0 ] && return 0
    local s
    for s in "${selected[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}
selected=("$@")
for s in "${selected[@]}"; do
    case $s in
        etcd|kwok|kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|kubelet|kube-proxy|coredns|helm) ;;
        *) fail "unknown binary '$s'; choose from etcd kwok kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy coredns helm" ;;
    esac
done

start=$SECONDS
echo "hubml kube harness: Go $go_version, cache $dir"

# --- etcd ---------------------------------------------------------------
if want etcd; then
    write_module "$src/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
    build_one etcd "$src/etcd" go.etcd.io/etcd/server/v3 "go.etcd.io/etcd/server/v3@$ETCD_VERSION $go_version"
fi

# --- Kubernetes ------------------------------------------------------------
k8s_stamp="k8s.io/kubernetes@$KUBE_VERSION $go_version"
k8s_wanted=0
for n in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    if want $n; then
        if up_to_date $n "$k8s_stamp"; then
            echo "reuse  $n ($k8s_stamp)"
            reused+=("$n")
        else
            k8s_wanted=1
        fi
    fi
done
if [ $k8s_wanted = 1 ]; then
    # The staging modules k8s.io/kubernetes requires as v0.0.0 (replaced by
    # ./staging/... in its own go.mod) must be replaced by their releases.
    modfile=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    [ -f "$modfile" ] || fail "could not download k8s.io/kubernetes@$KUBE_VERSION from the Go proxy ($(go env GOPROXY))"
    mapfile -t staging < <(sed -n 's/^[[:space:]]*\(k8s\.io\/[a-z0-9-]*\) v0\.0\.0$/\1/p' "$modfile")
    [ ${#staging[@]} -gt 10 ] || fail "found no staging modules in $modfile"
    replaces=()
    for m in "${staging[@]}"; do replaces+=("$m => $m $KUBE_STAGING_VERSION"); done
    write_module "$src/kubernetes" k8s.io/kubernetes "$KUBE_VERSION" "${replaces[@]}"
    minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
    kld="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    for n in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
        if want $n && ! up_to_date $n "$k8s_stamp"; then
            build_one $n "$src/kubernetes" "k8s.io/kubernetes/cmd/$n" "$k8s_stamp" "$kld"
        fi
    done
fi

# --- kwok ------------------------------------------------------------------
if want kwok; then
    write_module "$src/kwok" sigs.k8s.io/kwok "$KWOK_VERSION"
    build_one kwok "$src/kwok" sigs.k8s.io/kwok/cmd/kwok "sigs.k8s.io/kwok@$KWOK_VERSION $go_version" \
        "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
fi

# --- CoreDNS (cluster DNS for the real node's pods) -------------------------
if want coredns; then
    write_module "$src/coredns" github.com/coredns/coredns "$COREDNS_VERSION"
    build_one coredns "$src/coredns" github.com/coredns/coredns "github.com/coredns/coredns@$COREDNS_VERSION $go_version"
fi

# --- helm ------------------------------------------------------------------
if want helm; then
    write_module "$src/helm" helm.sh/helm/v3 "$HELM_VERSION"
    build_one helm "$src/helm" helm.sh/helm/v3/cmd/helm "helm.sh/helm/v3@$HELM_VERSION $go_version" \
        "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
fi

if [ $own_go_caches = 1 ] && { [ -d "$GOMODCACHE" ] || [ -d "$GOCACHE" ]; }; then
    go clean -modcache
    rm -rf "$GOCACHE"
fi
echo "built: ${built[*]:-none}; reused: ${reused[*]:-none}; $((SECONDS - start)) s in all"
echo "binaries: $bin ($(du -sh "$bin" | cut -f1)); cache incl. sources: $(du -sh "$dir" | cut -f1)"
