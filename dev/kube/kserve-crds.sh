#!/usr/bin/env bash
# Fetch (or reuse) KServe's real CRDs for the releases pinned in versions.env.
#
# Why: hub_ext creates InferenceServices and detects from the CRD's schema
# whether Standard-mode named canaries (spec.canary[], KServe >= 0.20) exist,
# so the test control plane must serve KServe's own CRDs, not a hand-written
# subset. They come from the Go module proxy (github.com/kserve/kserve is a Go
# module; config/crd/full/ is in its zip), land in
#   ${HUBML_KUBE_CACHE:-${HUBML_CACHE:-~/.cache/hubml}}/kserve-<version>/
# and are reused while their stamp matches.
#
# Usage: bash dev/kube/kserve-crds.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache_root=${HUBML_KUBE_CACHE:-${HUBML_CACHE:-$HOME/.cache/hubml}}
files=(serving.kserve.io_inferenceservices.yaml serving.kserve.io_servingruntimes.yaml
       serving.kserve.io_clusterservingruntimes.yaml)

command -v go >/dev/null 2>&1 || {
    echo "kserve-crds.sh: 'go' is not on PATH; install Go (it fetches github.com/kserve/kserve from the module proxy) and retry." >&2
    exit 2
}
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

for version in "$KSERVE_VERSION" "$KSERVE_PREVIOUS_VERSION"; do
    out=$cache_root/kserve-$version
    stamp="github.com/kserve/kserve@$version ${files[*]}"
    if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
        echo "reuse  KServe $version CRDs ($out)"
        continue
    fi
    echo "fetch  KServe $version CRDs from the Go module proxy ..."
    # `go mod download -json` prints the module's extracted directory as "Dir".
    json=$(cd /tmp && go mod download -json "github.com/kserve/kserve@$version") || {
        echo "kserve-crds.sh: FAILED: go mod download github.com/kserve/kserve@$version: $json" >&2
        exit 1
    }
    moddir=$(printf '%s' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
    [ -d "$moddir/config/crd/full" ] || {
        echo "kserve-crds.sh: FAILED: github.com/kserve/kserve@$version has no config/crd/full (got '$moddir')" >&2
        exit 1
    }
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    for f in "${files[@]}"; do
        [ -f "$moddir/config/crd/full/$f" ] || {
            echo "kserve-crds.sh: FAILED: KServe $version lacks config/crd/full/$f" >&2
            exit 1
        }
        cp "$moddir/config/crd/full/$f" "$out.tmp/$f"
    done
    chmod -R u+w "$out.tmp"
    echo "$stamp" > "$out.tmp/.stamp"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    echo "done   KServe $version CRDs: $out"
done
