#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)
# from the Go module proxy once per machine, into a versioned cache directory outside the repository,
# and prints that directory. Exits at once when the binaries are there; `--check` only tells whether
# they are (status 1 when not) and never builds.
set -euo pipefail

K8S=${SHIPHOOK_K8S_VERSION:-1.36.3}
ETCD=${SHIPHOOK_ETCD_VERSION:-3.6.16}
KWOK=${SHIPHOOK_KWOK_VERSION:-0.8.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/shiphook
OUT=$CACHE/k8s-$K8S-etcd-$ETCD-kwok-$KWOK
BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

complete() {
  local b
  for b in "${BINS[@]}"; do [ -x "$OUT/bin/$b" ] || return 1; done
  [ -d "$OUT/kwok-stages" ]
}

say() { echo "$(date -u +%H:%M:%S) $*" >&2; }

build() {
  command -v go >/dev/null || { echo "building the test control plane needs Go (1.26 for Kubernetes 1.36)" >&2; exit 1; }
  rm -rf "$OUT".partial.*  # left by a build that was killed; the lock says none is running
  TMP=$(mktemp -d "$OUT.partial.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  trap 'exit 1' INT TERM HUP
  # A dependency wanting a newer Go fails loudly instead of downloading a toolchain.
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
  mkdir -p "$TMP/src/k8s" "$TMP/src/etcd" "$TMP/bin"

  say "kubernetes v$K8S, kwok v$KWOK: resolving modules"
  cd "$TMP/src/k8s"
  go mod init local.invalid/shiphook-k8s-test-bins 2>/dev/null
  local gomod m kv p
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S" |
    python3 -c 'import sys, json; print(json.load(sys.stdin)["GoMod"])')
  # k8s.io/kubernetes replaces its staging modules by ./staging paths; their published tag is v0.X.Y.
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace "$m=$m@v0.${K8S#1.}"
  done
  grep '^godebug ' "$gomod" | while read -r _ kv; do go mod edit -godebug "$kv"; done
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S" "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S" \
    "k8s.io/kubernetes/cmd/kube-scheduler@v$K8S" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK"
  go mod tidy

  # Without these /version reports v0.0.0-master, and clients warn about the skew.
  local minor=${K8S#*.}
  minor=${minor%%.*}
  local flags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $p.gitVersion=v$K8S -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    flags+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  say "kubernetes: building"
  nice -n 10 go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$flags" -o "$TMP/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler sigs.k8s.io/kwok/cmd/kwok
  cp -r "$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage" "$TMP/kwok-stages"
  chmod -R u+w "$TMP/kwok-stages"

  # etcd's server/go.mod has ../ replaces of its own: a separate wrapper module keeps them apart.
  say "etcd v$ETCD: resolving modules"
  cd "$TMP/src/etcd"
  go mod init local.invalid/shiphook-etcd-bin 2>/dev/null
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD"
  go mod tidy
  say "etcd: building"
  nice -n 10 go build -trimpath -ldflags "-s -w" -o "$TMP/bin/etcd" go.etcd.io/etcd/server/v3

  rm -rf "$TMP/src"
  # Only a build that got this far is renamed into place: an interrupted one never looks complete.
  rm -rf "$OUT"
  mv "$TMP" "$OUT"
  trap - EXIT
  say "done"
}

main() {
  complete && { echo "$OUT"; return 0; }
  [ "${1:-}" = --check ] && { echo "$OUT"; return 1; }
  mkdir -p "$CACHE"
  # Two builds at once (two CI jobs, two terminals) would do the same long work twice.
  exec 9>"$CACHE/k8s-build.lock"
  flock 9
  if ! complete; then build; fi  # not `complete || build`: that would switch off set -e in build
  echo "$OUT"
}

# Read whole before it runs: editing this file during a build cannot change what the build does.
main "$@"
exit
