#!/usr/bin/env bash
# Build a local, signed apt repository of STAND-IN Kubernetes packages, laid out like pkgs.k8s.io
# (`<OUT>/v1.NN/deb/` with InRelease, Release, Release.gpg, Release.key, Packages and the .debs), so
# `[kubernetes] package-repo = "http://HOST:PORT/<prefix>"` points klab at it exactly as at a mirror.
#
#   scripts/standin-repo.sh OUT_DIR
#
# Environment (defaults in brackets):
#   KUBE_VERSIONS  deb versions of kubeadm/kubelet/kubectl ["1.36.3-1.1 1.36.4-1.1"] — one minor
#   CRI_VERSION    deb version of cri-tools ["1.36.0-1.1"]
#   ARCH           package architecture [dpkg --print-architecture]
#
# The packages hold POSIX sh stand-ins, not Kubernetes: they answer the version queries klab's
# phases make, record every call under /var/log/klab-standin/ and write what the real kubeadm would
# (admin.conf, kubelet.conf, pki, static-pod manifests). The signing key is made for this build and
# thrown away; only its public half is kept, armored, as `Release.key` (as pkgs.k8s.io serves it).
#
# Needs: dpkg-deb (dpkg), apt-ftparchive (apt-utils), gpg (gnupg).
set -euo pipefail

die() { printf 'standin-repo: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
out=$1
for t in dpkg-deb apt-ftparchive gpg gpgconf; do
  command -v "$t" >/dev/null || die "\`$t\` is not installed (apt-get install dpkg apt-utils gnupg)"
done

kube_versions=${KUBE_VERSIONS:-"1.36.3-1.1 1.36.4-1.1"}
cri_version=${CRI_VERSION:-1.36.0-1.1}
arch=${ARCH:-$(dpkg --print-architecture)}
# Reproducible .deb timestamps.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1764547200}

minor=
for v in $kube_versions; do
  case "$v" in
    [0-9]*.[0-9]*.[0-9]*-*) ;;
    *) die "KUBE_VERSIONS entry \`$v\` is not like 1.36.4-1.1" ;;
  esac
  m="v$(printf '%s' "$v" | cut -d. -f1-2)"
  [ -z "$minor" ] || [ "$minor" = "$m" ] || die "KUBE_VERSIONS mixes minors ($minor and $m)"
  minor=$m
done
[ -n "$minor" ] || die "KUBE_VERSIONS is empty"

repo="$out/$minor/deb"
rm -rf "$repo"
mkdir -p "$repo/$arch"
work=$(mktemp -d /tmp/klab-standin.XXXXXX)
export GNUPGHOME="$work/gnupg"
cleanup() {
  gpgconf --kill gpg-agent >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- the stand-in programs ---------------------------------------------------------------------

# Shared prologue: where calls are recorded and files written (KLAB_STANDIN_ROOT moves everything,
# for tests on a host), and `record`, which appends one line per call.
prologue() {
  cat <<'SH'
#!/bin/sh
# klab STAND-IN: not Kubernetes. Records its calls for klab's end-to-end test.
set -eu
R=${KLAB_STANDIN_ROOT:-}
LOG="$R/var/log/klab-standin"
STATE="$R/var/lib/klab-standin"
mkdir -p "$LOG" "$STATE"
record() {
  prog=$1; shift
  line=$prog
  for a in "$@"; do line="$line '$(printf '%s' "$a" | sed "s/'/'\\\\''/g")'"; done
  printf '%s\n' "$line" >> "$LOG/calls.log"
  printf '%s\n' "$line" >> "$LOG/$prog.log"
}
SH
}

# $1 = upstream version without the v (1.36.4)
kubectl_script() {
  prologue
  cat <<SH
VERSION=v$1
SH
  cat <<'SH'
record kubectl "$@"
for a in "$@"; do
  case "$a" in
    version)
      echo "Client Version: $VERSION"
      echo "Kustomize Version: v5.7.1"
      exit 0 ;;
    --version|--version=*) echo "Client Version: $VERSION"; exit 0 ;;
  esac
done
exit 0
SH
}

kubelet_script() {
  prologue
  cat <<SH
VERSION=v$1
SH
  cat <<'SH'
record kubelet "$@"
case "${1:-}" in
  --version|version) echo "Kubernetes $VERSION"; exit 0 ;;
esac
# Under systemd (kubelet.service) idle like a running kubelet; from a shell, return.
if [ -n "${INVOCATION_ID:-}" ]; then exec sleep infinity; fi
exit 0
SH
}

crictl_script() {
  prologue
  cat <<SH
VERSION=v$1
SH
  cat <<'SH'
record crictl "$@"
case "${1:-}" in
  --version|-v) echo "crictl version $VERSION"; exit 0 ;;
  info)
    # Stand-in for a CRI call: containerd's CRI plugin must be loaded and ok.
    ctr --address /run/containerd/containerd.sock plugins ls 2>/dev/null |
      grep -E '^io\.containerd\.(grpc\.v1|cri\.v1)[[:space:]]+(cri|runtime)[[:space:]].*[[:space:]]ok$' >/dev/null ||
      { echo "crictl (stand-in): containerd's CRI plugin is not running" >&2; exit 1; }
    echo '{"status":{"conditions":[{"type":"RuntimeReady","status":true}]},"klab":"stand-in"}'
    exit 0 ;;
esac
exit 0
SH
}

kubeadm_script() {
  prologue
  cat <<SH
VERSION=v$1
SH
  cat <<'SH'
record kubeadm "$@"
K="$R/etc/kubernetes"
PKI="$K/pki"

# --config FILE / --config=FILE, copied beside the log so the test can read what kubeadm was given.
config=
prev=
for a in "$@"; do
  case "$a" in --config=*) config=${a#--config=} ;; esac
  [ "$prev" = --config ] && config=$a
  prev=$a
done
keep_config() {
  [ -n "$config" ] || { echo "kubeadm (stand-in): $1 needs --config" >&2; exit 1; }
  [ -f "$config" ] || { echo "kubeadm (stand-in): config $config: no such file" >&2; exit 1; }
  n=$(( $(ls "$LOG" | grep -c '^config-' || true) + 1 ))
  cp "$config" "$LOG/config-$n-$1.yaml"
}
# First value of a `key: value` line in the config (quotes removed).
field() {
  sed -n "s/^[[:space:]-]*$1:[[:space:]]*//p" "$config" | head -n 1 | tr -d "\"'"
}
pem() {
  # A real key and certificate when openssl is there; the files' names and modes are what matter.
  name=$1 cn=$2
  if command -v openssl >/dev/null; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
      -subj "/CN=$(printf '%s' "$cn" | tr / -)" -keyout "$PKI/$name.key" -out "$PKI/$name.crt" >/dev/null 2>&1 ||
      { echo "kubeadm (stand-in): openssl could not make $PKI/$name.crt" >&2; exit 1; }
  else
    printf -- '-----BEGIN CERTIFICATE-----\nc3RhbmQtaW4=\n-----END CERTIFICATE-----\n' > "$PKI/$name.crt"
    printf -- '-----BEGIN PRIVATE KEY-----\nc3RhbmQtaW4=\n-----END PRIVATE KEY-----\n' > "$PKI/$name.key"
  fi
  chmod 0600 "$PKI/$name.key"
}
b64() { base64 < "$1" | tr -d '\n'; }
kubeconfig() {
  file=$1 user=$2 server=$3
  umask 077
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: $(b64 "$PKI/ca.crt")
    server: https://$server
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: $user
  name: $user@kubernetes
current-context: $user@kubernetes
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$PKI/apiserver-kubelet-client.crt")
    client-key-data: $(b64 "$PKI/apiserver-kubelet-client.key")
preferences: {}
EOF
  umask 022
}
manifests() {
  mkdir -p "$K/manifests"
  for c in "$@"; do
    printf 'apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n  namespace: kube-system\n  annotations:\n    klab.dev/stand-in: "true"\nspec:\n  containers: []\n' \
      "$c" > "$K/manifests/$c.yaml"
  done
}
need_ca() {
  [ -s "$PKI/ca.crt" ] && [ -s "$PKI/ca.key" ] ||
    { echo "kubeadm (stand-in): $PKI/ca.crt and ca.key must exist before init (klab places its CA)" >&2; exit 1; }
}

case "${1:-}" in
  version)
    case "$*" in
      *short*) echo "$VERSION" ;;
      *) echo "kubeadm version: &version.Info{Major:\"1\", GitVersion:\"$VERSION\", Platform:\"linux/amd64\"} (klab stand-in)" ;;
    esac ;;
  config)
    [ "${2:-}" = images ] && [ "${3:-}" = list ] || { echo "kubeadm (stand-in): unsupported: $*" >&2; exit 2; }
    v=$VERSION repo=registry.k8s.io prev=
    for a in "$@"; do
      [ "$prev" = --kubernetes-version ] && v=$a
      [ "$prev" = --image-repository ] && repo=$a
      prev=$a
    done
    for c in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do echo "$repo/$c:$v"; done
    if [ "$repo" = registry.k8s.io ]; then echo "$repo/coredns/coredns:v1.12.1"; else echo "$repo/coredns:v1.12.1"; fi
    echo "$repo/pause:3.10.1"
    echo "$repo/etcd:3.6.5-0" ;;
  init)
    if [ "${2:-}" = phase ]; then
      [ "${3:-}" = upload-certs ] || { echo "kubeadm (stand-in): unsupported: $*" >&2; exit 2; }
      [ -f "$K/admin.conf" ] || { echo "kubeadm (stand-in): upload-certs before init" >&2; exit 1; }
      keep_config upload-certs
      echo "[upload-certs] Storing the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace"
      exit 0
    fi
    keep_config init
    [ ! -e "$K/manifests/kube-apiserver.yaml" ] ||
      { echo "[preflight] error: $K/manifests/kube-apiserver.yaml already exists" >&2; exit 1; }
    need_ca
    endpoint=$(field controlPlaneEndpoint)
    [ -n "$endpoint" ] || { echo "kubeadm (stand-in): no controlPlaneEndpoint in $config" >&2; exit 1; }
    mkdir -p "$PKI/etcd"
    for p in apiserver apiserver-kubelet-client apiserver-etcd-client front-proxy-ca front-proxy-client \
             etcd/ca etcd/server etcd/peer etcd/healthcheck-client; do
      pem "$p" "kubernetes-$p"
    done
    pem sa service-accounts
    if command -v openssl >/dev/null; then openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null; else cp "$PKI/sa.crt" "$PKI/sa.pub"; fi
    rm -f "$PKI/sa.crt"
    kubeconfig "$K/admin.conf" kubernetes-admin "$endpoint"
    kubeconfig "$K/super-admin.conf" kubernetes-super-admin "$endpoint"
    kubeconfig "$K/kubelet.conf" "system:node:$(field name)" "$endpoint"
    kubeconfig "$K/controller-manager.conf" system:kube-controller-manager "$endpoint"
    kubeconfig "$K/scheduler.conf" system:kube-scheduler "$endpoint"
    manifests etcd kube-apiserver kube-controller-manager kube-scheduler
    field token > "$STATE/tokens"
    echo "Your Kubernetes control-plane has initialized successfully! (klab stand-in)" ;;
  token)
    touch "$STATE/tokens"
    case "${2:-}" in
      list)
        [ -f "$K/admin.conf" ] || { echo "kubeadm (stand-in): no cluster here" >&2; exit 1; }
        grep -v '^$' "$STATE/tokens" || true ;;
      create)
        [ -f "$K/admin.conf" ] || { echo "kubeadm (stand-in): no cluster here" >&2; exit 1; }
        t=${3:-}
        case "$t" in
          [a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9].????????????????) ;;
          *) echo "kubeadm (stand-in): token create needs a token like abcdef.0123456789abcdef" >&2; exit 1 ;;
        esac
        echo "$t" >> "$STATE/tokens"
        echo "$t" ;;
      *) echo "kubeadm (stand-in): unsupported: $*" >&2; exit 2 ;;
    esac ;;
  join)
    keep_config join
    [ ! -e "$K/kubelet.conf" ] ||
      { echo "[preflight] error: $K/kubelet.conf already exists" >&2; exit 1; }
    endpoint=$(field apiServerEndpoint)
    [ -n "$endpoint" ] || { echo "kubeadm (stand-in): no discovery.bootstrapToken.apiServerEndpoint in $config" >&2; exit 1; }
    grep -q 'caCertHashes' "$config" || { echo "kubeadm (stand-in): no caCertHashes in $config" >&2; exit 1; }
    mkdir -p "$PKI/etcd"
    # The CA comes from discovery; the stand-in makes its own when it is not there yet.
    [ -s "$PKI/ca.crt" ] || pem ca kubernetes
    pem apiserver-kubelet-client kubelet-client
    kubeconfig "$K/kubelet.conf" "system:node:$(field name)" "$endpoint"
    if grep -q '^controlPlane:' "$config"; then
      for p in apiserver apiserver-etcd-client front-proxy-ca front-proxy-client etcd/ca etcd/server etcd/peer; do
        pem "$p" "kubernetes-$p"
      done
      kubeconfig "$K/admin.conf" kubernetes-admin "$endpoint"
      manifests etcd kube-apiserver kube-controller-manager kube-scheduler
    fi
    echo "This node has joined the cluster (klab stand-in)" ;;
  reset)
    rm -rf "$K/manifests" "$K"/*.conf "$PKI" "$STATE/tokens"
    echo "[reset] stand-in: removed $K" ;;
  *)
    echo "kubeadm (stand-in): unsupported: $*" >&2
    exit 2 ;;
esac
SH
}

kubelet_unit() {
  cat <<'UNIT'
[Unit]
Description=kubelet: The Kubernetes Node Agent (klab stand-in)
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT
}

kubeadm_dropin() {
  cat <<'UNIT'
# Note: This dropin only works with kubeadm and kubelet v1.11+ (klab stand-in copy)
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
UNIT
}

# --- packaging ---------------------------------------------------------------------------------

# pkg NAME VERSION DEPENDS DESCRIPTION: build from $work/root-NAME into the repository.
pkg() {
  name=$1 version=$2 depends=$3 desc=$4
  root="$work/root-$name-$version"
  mkdir -p "$root/DEBIAN"
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: klab stand-in <standin@klab.invalid>"
    [ -z "$depends" ] || echo "Depends: $depends"
    echo "Section: admin"
    echo "Priority: optional"
    echo "Homepage: https://kubernetes.io"
    echo "Description: $desc (klab STAND-IN, not Kubernetes)"
    echo " A shell script that answers klab's version queries and records its calls."
  } > "$root/DEBIAN/control"
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$repo/$arch/${name}_${version}_${arch}.deb" >/dev/null
}

install_script() {  # install_script ROOT PATH < content
  mkdir -p "$(dirname "$1$2")"
  cat > "$1$2"
  chmod 0755 "$1$2"
}

cri_upstream=${cri_version%%-*}
r="$work/root-cri-tools-$cri_version"
crictl_script "$cri_upstream" | install_script "$r" /usr/bin/crictl
pkg cri-tools "$cri_version" "" "Command-line utility for interacting with a container runtime"

for v in $kube_versions; do
  up=${v%%-*}
  r="$work/root-kubectl-$v"
  kubectl_script "$up" | install_script "$r" /usr/bin/kubectl
  pkg kubectl "$v" "" "Command-line utility for interacting with a Kubernetes cluster"

  r="$work/root-kubelet-$v"
  kubelet_script "$up" | install_script "$r" /usr/bin/kubelet
  mkdir -p "$r/usr/lib/systemd/system"
  kubelet_unit > "$r/usr/lib/systemd/system/kubelet.service"
  pkg kubelet "$v" "" "Node agent for Kubernetes clusters"

  r="$work/root-kubeadm-$v"
  kubeadm_script "$up" | install_script "$r" /usr/bin/kubeadm
  mkdir -p "$r/usr/lib/systemd/system/kubelet.service.d"
  kubeadm_dropin > "$r/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf"
  pkg kubeadm "$v" "cri-tools (>= ${cri_upstream%.*}.0)" "Command-line utility for administering a Kubernetes cluster"
done

# --- index and sign ----------------------------------------------------------------------------

mkdir -m 0700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key \
  "klab stand-in repository (throw-away) <standin@klab.invalid>" ed25519 sign 1d 2>/dev/null
(
  cd "$repo"
  apt-ftparchive packages "$arch" > Packages
  gzip -9n -k Packages
  apt-ftparchive \
    -o APT::FTPArchive::Release::Origin="klab stand-in (pkgs.k8s.io layout) $minor" \
    -o APT::FTPArchive::Release::Label=deb \
    -o APT::FTPArchive::Release::Architectures="$arch" \
    release . > "$work/Release"
  mv "$work/Release" Release
  gpg --batch --quiet --yes --clearsign -o InRelease Release
  gpg --batch --quiet --yes --armor --detach-sign -o Release.gpg Release
  gpg --batch --quiet --armor --export > Release.key
)
printf '%s\n' "$repo"
