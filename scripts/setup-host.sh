#!/usr/bin/env bash
# Prepare a Debian 12 host for klab: libvirt, QEMU (bookworm-backports), build deps,
# image-build tools and test validators; start libvirtd when there is no systemd.
# Idempotent: safe to run again.
set -euo pipefail

log() { printf '[setup-host] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh must run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# bookworm-backports: the machine's qemu-utils 10 comes from there, and the stock
# qemu-system-x86 7.2 conflicts with it.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding the bookworm-backports suite"
  cat > /etc/apt/sources.list.d/klab-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

need_update=1
if [ -n "${KLAB_SKIP_APT_UPDATE:-}" ]; then need_update=0; fi
if [ "$need_update" = 1 ]; then
  log "apt-get update"
  apt-get update -qq
fi

log "installing packages"
apt-get install -y -qq -o Dpkg::Options::=--force-confold \
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
  debootstrap dosfstools mtools e2fsprogs \
  cloud-init iproute2 openssh-client bc libxml2-utils procps apt-utils >/dev/null
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null

# libvirt writes every network's `<bridge>.macs` file into /var/lib/libvirt/dnsmasq when a domain
# starts on it, but creates that directory only when it starts a dnsmasq. klab's networks start none,
# and without systemd nothing starts libvirt's `default` network, so on a fresh host the directory is
# missing and every domain fails to start (`Failed to create file '…/dnsmasq/kl-….macs.new'`).
install -d -m 0755 /var/lib/libvirt/dnsmasq

# No systemd as PID 1 in containers/CI: start the daemons ourselves.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  log "starting libvirtd"
  mkdir -p /run/libvirt
  if ! pgrep -x virtlogd >/dev/null; then virtlogd -d || true; fi
  if ! pgrep -x libvirtd >/dev/null; then libvirtd -d; fi
  for _ in $(seq 1 60); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
fi
virsh -c qemu:///system version >/dev/null
log "libvirt is ready: $(virsh -c qemu:///system version | tr '\n' ' ')"
