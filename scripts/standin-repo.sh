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
# The packages hold STAND-INS, not Kubernetes. kubeadm, kubelet and kubectl are python3 programs
# (scripts/standin/*.py, each built as common.py + its own file; the guests' python3 and
# python3-yaml — cloud-init's dependencies — run them; kubeadm also needs openssl); crictl is a
# POSIX sh script. Together they are a small simulated cluster that klab's real phases check:
#   kubeadm  checks --config against kubeadm v1beta4 (unknown fields refused), writes pki,
#            kubeconfigs, static-pod manifests, /var/lib/kubelet/kubeadm-flags.env and config.yaml;
#            `init` starts the stand-in API server, `join` discovers the CA from it (caCertHashes
#            pinned), and a control plane's join is serialized by it (etcd's one-learner rule).
#   apiserver /usr/lib/klab-standin/apiserver (in the kubeadm package) with the unit
#            klab-standin-apiserver.service (shipped disabled; kubeadm init/join enable and start
#            it): HTTPS on :6443, state in /var/lib/klab-standin/{cluster,objects}.json.
#   kubelet  under systemd registers the node (InternalIP = --node-ip, else the default route's
#            address; all its IPv4 addresses) and posts its status every 2 s.
#   kubectl  answers the command shapes klab uses (get --raw, apply -k, get nodes/-o jsonpath,
#            wait, rollout status, drain, delete node) with real kubectl's formats; anything else
#            fails with `kubectl (stand-in): unsupported: …`.
# Nodes are Ready once registered and the calico-node DaemonSet is applied; each node's
# projectcalico.org/IPv4Address is what calico-node's IP_AUTODETECTION_METHOD would pick. Every
# program records its calls under /var/log/klab-standin/ (calls.log and <prog>.log);
# KLAB_STANDIN_ROOT moves all paths under a directory (tests on a host; see common.py for the
# other test-only variables). The signing key is made for this build and thrown away; only its
# public half is kept, armored, as `Release.key` (as pkgs.k8s.io serves it).
#
# Needs: dpkg-deb (dpkg), apt-ftparchive (apt-utils), gpg (gnupg).
set -euo pipefail

standin=$(cd "$(dirname "$0")/standin" && pwd)

die() { printf 'standin-repo: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
out=$1
for t in dpkg-deb apt-ftparchive gpg gpgconf; do
  command -v "$t" >/dev/null || die "\`$t\` is not installed (apt-get install dpkg apt-utils gnupg)"
done
for f in common kubeadm kubelet kubectl apiserver; do
  [ -f "$standin/$f.py" ] || die "$standin/$f.py is missing"
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

# crictl's prologue (the python stand-ins have theirs in scripts/standin/common.py): where calls are
# recorded (KLAB_STANDIN_ROOT moves everything, for tests on a host), and `record`, which appends
# one line per call.
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

# python_program NAME VERSION: the python stand-in NAME for upstream VERSION (1.36.4, no v) on stdout.
python_program() {
  printf '#!/usr/bin/python3\n'
  sed "s/@VERSION@/$2/" "$standin/common.py"
  cat "$standin/$1.py"
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
      grep -E '^io\.containerd\.(grpc\.v1|cri\.v1)[[:space:]]+(cri|runtime)[[:space:]].*[[:space:]]ok[[:space:]]*$' >/dev/null ||
      { echo "crictl (stand-in): containerd's CRI plugin is not running" >&2; exit 1; }
    echo '{"status":{"conditions":[{"type":"RuntimeReady","status":true}]},"klab":"stand-in"}'
    exit 0 ;;
esac
exit 0
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

apiserver_unit() {
  cat <<'UNIT'
[Unit]
Description=klab stand-in API server (not Kubernetes): the simulated cluster behind :6443
Documentation=file:///usr/lib/klab-standin/apiserver
Wants=network-online.target
After=network-online.target
ConditionPathExists=/var/lib/klab-standin/apiserver.json

[Service]
ExecStart=/usr/lib/klab-standin/apiserver
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
}

# The real packages' maintainer scripts make systemd read their units; so do the stand-ins' (a
# kubelet.service loaded without kubeadm's drop-in would run without its flags).
postinst() {
  cat <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl --system daemon-reload >/dev/null 2>&1 || true
fi
SH
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
    echo " A stand-in for klab's end-to-end test: it simulates what klab checks and records its calls."
  } > "$root/DEBIAN/control"
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$repo/$arch/${name}_${version}_${arch}.deb" >/dev/null
}

install_script() {  # install_script ROOT PATH < content
  mkdir -p "$(dirname "$1$2")"
  cat > "$1$2"
  chmod 0755 "$1$2"
  # A python stand-in that does not even parse would only fail on the guests: check it here.
  if head -n 1 "$1$2" | grep -q python3 && command -v python3 >/dev/null; then
    python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$1$2" ||
      die "$2 (from $standin) does not parse"
  fi
}

cri_upstream=${cri_version%%-*}
r="$work/root-cri-tools-$cri_version"
crictl_script "$cri_upstream" | install_script "$r" /usr/bin/crictl
pkg cri-tools "$cri_version" "" "Command-line utility for interacting with a container runtime"

for v in $kube_versions; do
  up=${v%%-*}
  r="$work/root-kubectl-$v"
  python_program kubectl "$up" | install_script "$r" /usr/bin/kubectl
  pkg kubectl "$v" "" "Command-line utility for interacting with a Kubernetes cluster"

  r="$work/root-kubelet-$v"
  python_program kubelet "$up" | install_script "$r" /usr/bin/kubelet
  mkdir -p "$r/usr/lib/systemd/system"
  kubelet_unit > "$r/usr/lib/systemd/system/kubelet.service"
  mkdir -p "$r/DEBIAN"
  postinst | install_script "$r" /DEBIAN/postinst
  pkg kubelet "$v" "" "Node agent for Kubernetes clusters"

  r="$work/root-kubeadm-$v"
  python_program kubeadm "$up" | install_script "$r" /usr/bin/kubeadm
  python_program apiserver "$up" | install_script "$r" /usr/lib/klab-standin/apiserver
  mkdir -p "$r/usr/lib/systemd/system/kubelet.service.d"
  kubeadm_dropin > "$r/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf"
  apiserver_unit > "$r/usr/lib/systemd/system/klab-standin-apiserver.service"
  postinst | install_script "$r" /DEBIAN/postinst
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
