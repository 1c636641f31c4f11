#!/usr/bin/env bash
# Builds the test-bed binaries from Go modules: etcd, the control plane, kubelet, kube-proxy, kwok, helm, the CNCF
# distribution registry, the JobSet and Kueue controllers (with their CRDs and webhook manifests) and CoreDNS, plus
# the pause binary (Kubernetes' own pause.c) of the real node's pod sandboxes.
# Usage: build-binaries.sh CACHE_DIR. Rebuilds only when the pinned versions change (a stamp file decides).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.33.13}
ETCD_VERSION=${ETCD_VERSION:-v3.5.21}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.19.5}
REGISTRY_VERSION=${REGISTRY_VERSION:-v3.1.2}
# Kueue v0.17.0 is built against JobSet v0.11.1's API: the pair a cluster would run together.
JOBSET_VERSION=${JOBSET_VERSION:-v0.11.1}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}

cache=$(realpath -m "${1:?usage: build-binaries.sh CACHE_DIR}")
bin="$cache/bin"
stamp="$bin/.versions"
want="k8s=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION registry=$REGISTRY_VERSION"
want="$want jobset=$JOBSET_VERSION kueue=$KUEUE_VERSION coredns=$COREDNS_VERSION"
tools="etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause kwok kwokctl helm registry"
tools="$tools jobset kueue coredns"
files="kwok-stages.yaml jobset-crds.yaml jobset-webhooks.yaml kueue-crds.yaml kueue-webhooks.yaml"

all_present() { for t in $tools; do [ -x "$bin/$t" ] || return 1; done; for f in $files; do [ -s "$bin/$f" ] || return 1; done; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && all_present; then
  echo "test-bed binaries up to date ($want)"; exit 0
fi
mkdir -p "$bin" "$cache/src"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf '==> %s\n' "$*" >&2; }

build_kubernetes() {
  # k8s.io/kubernetes replaces its staging modules with ./staging paths, which only the main module may do;
  # a wrapper module pins each staging module to its published v0.Y.Z instead.
  local src="$cache/src/kubernetes" minor staging_version kdir
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  staging_version="v0.${K8S_VERSION#v1.}"
  kdir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | jq -r .Dir)
  rm -rf "$src"; mkdir -p "$src"
  cd "$src"
  go mod init kubetune.local/k8sbins >/dev/null 2>&1
  go mod edit -go="$(awk '/^go /{print $2; exit}' "$kdir/go.mod")" -require="k8s.io/kubernetes@$K8S_VERSION"
  awk '/^godebug/{print}' "$kdir/go.mod" >>go.mod
  # Every staging module is listed in the real go.mod as `k8s.io/X v0.0.0`; derive the list from it.
  awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$kdir/go.mod" | sort -u | while read -r m; do
    go mod edit -replace="$m=$m@$staging_version"
  done
  cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  go mod tidy
  local V=k8s.io/component-base/version
  go build -trimpath -o "$bin/" \
    -ldflags "-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=$minor -X $V.gitTreeState=clean" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  # The pod sandbox's process, from the same release's source (a static binary: the image holds nothing else).
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$bin/pause" "$kdir/build/pause/linux/pause.c"
}

build_etcd() {
  # etcd's server module also replaces its siblings with relative paths: same wrapper trick.
  local src="$cache/src/etcd"
  rm -rf "$src"; mkdir -p "$src"; cd "$src"
  go mod init kubetune.local/etcdbin >/dev/null 2>&1
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >tools.go
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  GOBIN="$bin" go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  # The kwok controller needs Stage objects to move fake nodes and pods along; take kwok's own "fast" set.
  local kwok_dir; kwok_dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | jq -r .Dir)
  {
    for f in "$kwok_dir"/kustomize/stage/node/fast/*.yaml "$kwok_dir"/kustomize/stage/pod/fast/*.yaml; do
      [ "$(basename "$f")" = kustomization.yaml ] && continue
      printf -- '---\n'; cat "$f"
    done
  } >"$bin/kwok-stages.yaml"
}

build_helm() {
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  GOBIN="$bin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_registry() {
  GOBIN="$bin" go install -trimpath \
    -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
}

concatenated() {
  # Every YAML file of the given paths as one multi-document stream.
  for f in "$@"; do printf -- '---\n'; cat "$f"; done
}

build_jobset() {
  # `go install sigs.k8s.io/jobset@V` asks the proxy for the module's version list, which it refuses: a wrapper module
  # pins the exact version instead.
  local src="$cache/src/jobset" dir
  rm -rf "$src"; mkdir -p "$src"; cd "$src"
  go mod init kubetune.local/jobsetbin >/dev/null 2>&1
  printf '//go:build tools\n\npackage tools\n\nimport _ "sigs.k8s.io/jobset"\n' >tools.go
  go mod edit -require="sigs.k8s.io/jobset@$JOBSET_VERSION"
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$bin/jobset" sigs.k8s.io/jobset
  dir=$(go mod download -json "sigs.k8s.io/jobset@$JOBSET_VERSION" | jq -r .Dir)
  concatenated "$dir"/config/components/crd/bases/*.yaml >"$bin/jobset-crds.yaml"
  cp "$dir/config/components/webhook/manifests.yaml" "$bin/jobset-webhooks.yaml"
}

build_kueue() {
  local dir
  GOBIN="$bin" go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  dir=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | jq -r .Dir)
  concatenated "$dir"/config/components/crd/bases/*.yaml >"$bin/kueue-crds.yaml"
  cp "$dir/config/components/webhook/manifests.yaml" "$bin/kueue-webhooks.yaml"
}

build_coredns() {
  # The cluster's DNS (pod hostnames, Services) with the plugins a test cluster needs, built the way CoreDNS documents
  # for a custom plugin set: a main package that sets the directive list (in CoreDNS's own order) and runs coremain.
  local src="$cache/src/coredns"
  rm -rf "$src"; mkdir -p "$src"; cd "$src"
  go mod init kubetune.local/coredns >/dev/null 2>&1
  cat >main.go <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func init() { dnsserver.Directives = []string{"bind", "errors", "kubernetes"} }

func main() { coremain.Run() }
GO
  go mod edit -require="github.com/coredns/coredns@$COREDNS_VERSION"
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$bin/coredns" .
}

start=$(date +%s)
for part in etcd kwok helm registry jobset kueue coredns kubernetes; do
  log "building $part"; t0=$(date +%s)
  "build_$part"
  log "$part built in $(( $(date +%s) - t0 ))s"
done
echo "$want" >"$stamp"
log "test-bed binaries ready in $(( $(date +%s) - start ))s: $bin"
