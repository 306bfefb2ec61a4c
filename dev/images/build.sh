#!/usr/bin/env bash
# Build hubml's container images from their real Dockerfiles without a registry,
# as image archives that `ctr -n k8s.io images import FILE` takes (docker-archive,
# the tag kept as the image name), for test clusters that run the images.
#
#   bash dev/images/build.sh [base|hub|singleuser|serving ...]   (default: all)
#
# Prints one line per image on stdout: `IMAGE_NAME ARCHIVE_PATH`; progress goes
# to stderr. Why it is built this way:
# - No base image can be pulled, so `base` makes a stand-in for
#   python:3.11.14-slim-bookworm: a Debian bookworm rootfs from mmdebstrap
#   (dev/images/base.env says what goes in), tagged with the name the
#   Dockerfiles' FROM asks for, in a buildah store of our own.
# - No Python index is reachable inside a build either: RUN steps see the
#   project's wheelhouse (dev/bootstrap builds it from pyproject.toml) and an
#   image-only one (the pins of the Dockerfiles that the first lacks, fetched
#   here with pip on the host) under /wheels, and dev/images/pip.conf at
#   /etc/pip.conf, all bind mounts that leave nothing but empty mount points
#   in the image. The Dockerfiles stay the ones a machine with a registry uses.
# - Each archive is cached under ${HUBML_CACHE:-~/.cache/hubml}/images, named by
#   a hash of all that goes into it (Dockerfile, the files it COPYs, the base,
#   the wheel sets, this script), so a run with nothing changed does nothing;
#   only the newest archive of each image is kept, since they are GiB-sized.
# Every missing tool or package stops the run with the reason: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${HUBML_CACHE:-$HOME/.cache/hubml}
OUT=$CACHE/images
STORE=$CACHE/buildah
mkdir -p "$OUT" "$STORE"

T0=$SECONDS
log() { printf '[images %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf 'dev/images/build.sh: error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed ($2)"; }
hash16() { sha256sum | cut -c1-16; }

APT_HINT="apt-get update && apt-get install -y --no-install-recommends buildah mmdebstrap uidmap"
need buildah "$APT_HINT"
need mmdebstrap "$APT_HINT"
need flock "util-linux"
need sha256sum "coreutils"
[ "$(id -u)" = 0 ] || die "run as root: buildah's chroot isolation and mmdebstrap's root mode need it here"

# shellcheck source=dev/images/base.env
. dev/images/base.env

declare -A TAGS=(
  [hub]=ghcr.io/hubml/k8s-hub-hubml:0.1.0
  [singleuser]=ghcr.io/hubml/singleuser:0.1.0
  [serving]=ghcr.io/hubml/serving:0.1.0
)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(base hub singleuser serving)
for t in "${targets[@]}"; do
  [ "$t" = base ] || [ -n "${TAGS[$t]:-}" ] || die "unknown image '$t' (base, hub, singleuser, serving)"
done

# One build at a time per cache: two would fight over the store and the archives.
exec 9>"$OUT/.lock"
flock 9

# --- buildah store -------------------------------------------------------------
# overlay where the kernel lets us mount it (fast commits), vfs otherwise
# (a full copy per layer). The choice is kept: a store cannot change driver.
storage_driver() {
  if [ -n "${HUBML_BUILDAH_DRIVER:-}" ]; then echo "$HUBML_BUILDAH_DRIVER"; return; fi
  if [ -f "$STORE/driver" ]; then cat "$STORE/driver"; return; fi
  local p; p=$(mktemp -d "$STORE/probe.XXXXXX")
  mkdir -p "$p/l" "$p/u" "$p/w" "$p/m"
  local d=vfs
  if mount -t overlay overlay -o "lowerdir=$p/l,upperdir=$p/u,workdir=$p/w" "$p/m" 2>/dev/null; then
    umount "$p/m"; d=overlay
  fi
  rm -rf "$p"; echo "$d" >"$STORE/driver"; echo "$d"
}
DRIVER=$(storage_driver)
cat >"$STORE/storage.conf" <<EOF
[storage]
driver = "$DRIVER"
graphroot = "$STORE/root"
runroot = "$STORE/run"
EOF
export CONTAINERS_STORAGE_CONF=$STORE/storage.conf
# chroot: the OCI runtime needs cgroups and namespaces a sandbox may not give.
ISOLATION=${HUBML_BUILDAH_ISOLATION:-chroot}

image_label() {  # image label -> value, empty when the image or label is absent
  buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

keep_newest() {  # keep_newest PREFIX KEEP: delete the other archives of one image
  local f
  for f in "$OUT/$1"-*.tar; do
    [ -e "$f" ] && [ "$f" != "$2" ] && { log "removing the older archive $f"; rm -f "$f"; }
  done
  return 0
}

# --- base ---------------------------------------------------------------------
build_base() {
  local rootfs=$1
  local srcs=(
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE main"
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main"
    "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main"
  )
  # shellcheck disable=SC2086
  mmdebstrap --variant=apt --include="$(echo $BASE_PACKAGES | tr ' ' ,)" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf /usr/bin/python3 "$1"/usr/local/bin/python3 && ln -sf python3 "$1"/usr/local/bin/python && ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip3 && ln -sf pip3 "$1"/usr/local/bin/pip' \
    --customize-hook='"$1"/usr/bin/python3 -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"' \
    "$DEBIAN_SUITE" "$rootfs" "${srcs[@]}" >&2
  local c; c=$(buildah from scratch)
  buildah add --quiet "$c" "$rootfs" / >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PYTHON_VERSION=3.11 \
    --label hubml.base.key="$BKEY" --label hubml.base.epoch="$DEBIAN_EPOCH" \
    --cmd '["python3"]' "$c"
  buildah commit --quiet --disable-compression --rm "$c" "$BASE_IMAGE" >/dev/null
}
BKEY=$({ cat dev/images/base.env; declare -f build_base; } | hash16)
BASE_ARCHIVE=$OUT/python-base-$BKEY.tar

ensure_base() {
  if [ "$(image_label "$BASE_IMAGE" hubml.base.key)" = "$BKEY" ] && [ -f "$BASE_ARCHIVE" ]; then return; fi
  if [ -f "$BASE_ARCHIVE" ]; then
    log "base: loading $BASE_ARCHIVE into the buildah store"
    local id; id=$(buildah pull --quiet "docker-archive:$BASE_ARCHIVE")
    buildah tag "$id" "$BASE_IMAGE"
    return
  fi
  log "base: mmdebstrap $DEBIAN_SUITE ($BASE_PACKAGES) -> $BASE_IMAGE (cold: a few minutes)"
  local rootfs; rootfs=$(mktemp "$OUT/rootfs.XXXXXX.tar")
  build_base "$rootfs" || { rm -f "$rootfs"; die "base: mmdebstrap or the buildah import failed (see above)"; }
  rm -f "$rootfs"
  buildah push --quiet "$BASE_IMAGE" "docker-archive:$BASE_ARCHIVE.tmp:$BASE_IMAGE" >&2
  mv "$BASE_ARCHIVE.tmp" "$BASE_ARCHIVE"
  keep_newest python-base "$BASE_ARCHIVE"
  log "base: done"
}

base_python_version() {  # Debian's python3 in the base, e.g. 3.11.2 (asked once per base)
  local f=$OUT/python-base-$BKEY.pyversion
  if [ ! -s "$f" ]; then
    local c; c=$(buildah from --pull=never "$BASE_IMAGE")
    buildah run --isolation "$ISOLATION" "$c" -- python3 -c 'import platform; print(platform.python_version())' >"$f.tmp" \
      || { buildah rm "$c" >/dev/null; die "cannot run python3 in $BASE_IMAGE"; }
    buildah rm "$c" >/dev/null
    mv "$f.tmp" "$f"
  fi
  cat "$f"
}

# --- wheelhouses --------------------------------------------------------------
PROJ_KEY=$(sha256sum pyproject.toml | cut -c1-16)   # as dev/bootstrap keys it
PROJ_WHEELS=$CACHE/wheels/py311-$PROJ_KEY
# name==version pins of the Dockerfiles' pip lines (comments left out).
PINS=$(grep -hv '^[[:space:]]*#' helm-values/images/*.Dockerfile \
  | grep -oE '[A-Za-z0-9][A-Za-z0-9_.-]*==[0-9][0-9A-Za-z.+!-]*' | sort -u)
IMG_KEY=$(printf '%s\n' "$PROJ_KEY" "$BKEY" $PINS | hash16)
IMG_WHEELS=$CACHE/image-wheels/$IMG_KEY

host_python() {
  local py
  for py in "$ROOT/.venv/bin/python" python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  die "Python 3.11 is needed on the host to fetch the image-only wheels (they must match the images' cp311)"
}

ensure_wheels() {
  if [ ! -f "$PROJ_WHEELS/.complete" ]; then
    log "the project wheelhouse $PROJ_WHEELS is missing: dev/bootstrap python builds it"
    bash dev/bootstrap python >&2
    [ -f "$PROJ_WHEELS/.complete" ] || die "dev/bootstrap python ran but $PROJ_WHEELS/.complete is missing"
  fi
  [ -f "$IMG_WHEELS/.complete" ] && return
  # Pins that the project wheelhouse cannot satisfy, fetched with their
  # dependencies; torch & co. are in it already, so this downloads megabytes.
  local missing=() pin name ver have
  have=$(ls "$PROJ_WHEELS" | tr 'A-Z.-' 'a-z__')
  for pin in $PINS; do
    name=$(echo "${pin%%==*}" | tr 'A-Z.-' 'a-z__'); ver=${pin#*==}
    grep -q "^${name}_${ver//./_}_" <<<"$have" || missing+=("$pin")
  done
  log "image-only wheelhouse $IMG_WHEELS: pip download ${missing[*]:-(nothing)}"
  local tmp="$IMG_WHEELS.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  if [ ${#missing[@]} -gt 0 ]; then
    local py; py=$(host_python)
    PIP_FIND_LINKS="" "$py" -m pip download --quiet --disable-pip-version-check \
      --dest "$tmp" --find-links "$PROJ_WHEELS" "${missing[@]}" >&2 \
      || { rm -rf "$tmp"; die "pip download of ${missing[*]} failed (see above)"; }
    local f
    for f in "$tmp"/*; do [ -e "$PROJ_WHEELS/${f##*/}" ] && rm -f "$f"; done
  fi
  # The stand-in's Python is Debian's 3.11 (older patch release than the
  # python image's), and the project wheelhouse was resolved on the host: for
  # each wheel whose Requires-Python leaves the base's version out, fetch the
  # newest release that takes it, so pip in the build can fall back to it.
  local pyver py
  pyver=$(base_python_version)
  py=$(host_python)
  local olds; olds=$("$py" - "$pyver" "$PROJ_WHEELS" "$tmp" <<'PY'
import email.parser, pathlib, sys, zipfile
from pip._vendor.packaging.specifiers import SpecifierSet
version, dirs = sys.argv[1], sys.argv[2:]
for d in dirs:
    for whl in sorted(pathlib.Path(d).glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = email.parser.HeaderParser().parsestr(z.read(meta).decode())
        spec = msg.get("Requires-Python")
        if spec and version not in SpecifierSet(spec):
            print(msg["Name"])
PY
  )
  olds=$(printf '%s\n' $olds | sort -u) || { rm -rf "$tmp"; die "reading the wheels' Requires-Python failed"; }
  if [ -n "$olds" ]; then
    log "wheels that need a newer Python than the base's $pyver: $(echo $olds); fetching releases that take $pyver"
    # shellcheck disable=SC2086
    for name in $olds; do
      PIP_FIND_LINKS="" "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest "$tmp" --python-version "$pyver" --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: "$name" >&2 \
        || { rm -rf "$tmp"; die "no release of $name takes Python $pyver"; }
    done
  fi
  touch "$tmp/.complete"
  rm -rf "$IMG_WHEELS"; mv "$tmp" "$IMG_WHEELS"
  find "$CACHE/image-wheels" -mindepth 1 -maxdepth 1 -type d ! -path "$IMG_WHEELS" -exec rm -rf {} +
}

# --- the images -----------------------------------------------------------------
copy_sources() {  # the repository paths a Dockerfile COPYs (no --from/--chown/... flags)
  awk 'toupper($1) == "COPY" { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$1" | sort -u
}

content_key() {  # content_key NAME: everything that goes into that image
  local df=helm-values/images/$1.Dockerfile src
  {
    echo "tag ${TAGS[$1]} base $BKEY"
    sha256sum "$df"
    for src in $(copy_sources "$df"); do
      [ -e "$src" ] || die "$df COPYs '$src', which is not in the repository"
      # README.md is COPYed only because pyproject.toml names it as the package's long
      # description: no code reads it, so an edit of the docs must not rebuild 6 GB images.
      [ "$src" = README.md ] && continue
      find "$src" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    done
    ls "$PROJ_WHEELS" "$IMG_WHEELS"
    declare -f build_image; cat dev/images/pip.conf
  } | hash16
}

build_image() {  # build_image NAME ARCHIVE
  local name=$1 archive=$2 tag=${TAGS[$1]}
  local df=helm-values/images/$name.Dockerfile
  log "$name: buildah build -f $df -t $tag (isolation $ISOLATION, storage $DRIVER)"
  local t=$SECONDS
  buildah build --isolation "$ISOLATION" --network host --pull=never --layers=false \
    --disable-compression --quiet=false \
    --volume "$PROJ_WHEELS:/wheels/project:ro" \
    --volume "$IMG_WHEELS:/wheels/image:ro" \
    --volume "$ROOT/dev/images/pip.conf:/etc/pip.conf:ro" \
    -f "$df" -t "$tag" "$ROOT" >&2 || die "$name: buildah build of $df failed (see above)"
  log "$name: built in $((SECONDS - t))s; writing $archive"
  t=$SECONDS
  rm -f "$archive.tmp"
  buildah push --quiet "$tag" "docker-archive:$archive.tmp:$tag" >&2 || { rm -f "$archive.tmp"; die "$name: buildah push to $archive failed"; }
  mv "$archive.tmp" "$archive"
  log "$name: archive written in $((SECONDS - t))s ($(du -h "$archive" | cut -f1))"
  # The archive is what is kept: the store's copy would double the disk used.
  buildah rmi "$tag" >/dev/null 2>&1 || true
}

# All of the run is in main, which bash parses whole before it starts: an edit
# of this file during a long build then cannot change what the build runs.
main() {
local t key slug archive results=()
for t in "${targets[@]}"; do
  if [ "$t" = base ]; then
    ensure_base
    results+=("$BASE_IMAGE $BASE_ARCHIVE")
    continue
  fi
  # The content key needs the wheel sets, which only exist once fetched; the
  # image-only one depends on the base's Python.
  ensure_base
  ensure_wheels
  key=$(content_key "$t")
  slug=$(echo "${TAGS[$t]}" | tr '/:' '__')
  archive=$OUT/$slug-$key.tar
  if [ -f "$archive" ]; then
    log "$t: up to date ($archive)"
  else
    # The older archive is of no use once the content changed, and a single-user build
    # needs ~20 GB free (its layers, the commit's copy, the archive): free it first.
    keep_newest "$slug" "$archive"
    build_image "$t" "$archive"
  fi
  results+=("${TAGS[$t]} $archive")
done
printf '%s\n' "${results[@]}"
log "done"
}
main "$@"; exit
