#!/usr/bin/env bash
# Clean-room check of the README's first command.
#
# A warm machine hides missing install steps (a green CI once passed while the README's first command
# failed on a fresh machine). This script builds a fresh Debian 12 root with debootstrap, gives it its
# own libvirt state (its own /var/lib/libvirt, /run, libvirtd and virtlogd in a private PID and mount
# namespace), bind-mounts the machine's Rust toolchain read-only, copies this checkout in, and runs
# exactly the README's command there:
#
#     bash scripts/setup-host.sh && bash scripts/demo.sh
#
# then `klab status`, `klab ssh node1 -- …`, `klab ssh-config` and `klab down local`, and checks that the
# room's libvirt holds no domain, network or pool of the lab afterwards. Exit status 0 only when all of that worked.
#
# The room shares the host's network namespace (apt and cargo need the package registries), so its
# lab bridges live next to the host's: the script takes the same lock as the QEMU tests
# (/tmp/klab-qemu.lock) and refuses to start while the host has a lab named `local`.
#
# Environment: KLAB_CLEAN_ROOM (work dir, default /var/tmp/klab-clean-room), KLAB_CLEAN_ROOM_KEEP=1
# (keep the root afterwards for inspection), KLAB_CLEAN_ROOM_MIRROR (Debian mirror).
set -euo pipefail

log() { printf '[clean-room %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
trap 'log "FAILED: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, namespaces)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${KLAB_CLEAN_ROOM:-/var/tmp/klab-clean-room}"
mirror="${KLAB_CLEAN_ROOM_MIRROR:-http://deb.debian.org/debian}"
root="$work/root"
debs="/var/cache/klab-clean-room/debs"   # downloaded .debs only; the root itself is new every run
rust_home="${RUSTUP_HOME:-$HOME/.rustup}"
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"

# What a fresh machine of this kind has before any project step: a Debian 12 base, a C toolchain
# (rustc links with cc), TLS roots, git/curl, and the Rust toolchain (bind-mounted below). Everything
# else must come from scripts/setup-host.sh.
base_pkgs="build-essential,ca-certificates,git,curl,iproute2,procps,openssh-client,xz-utils,file,e2fsprogs"

command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
command -v unshare >/dev/null || die "unshare (util-linux) is missing"
[ -x "$cargo_bin/cargo" ] || die "no Rust toolchain at $cargo_bin"

unmount_all() {
  # Deepest first; lazy so a busy mount cannot wedge the cleanup.
  if [ -d "$root" ]; then
    { findmnt -rn -o TARGET | grep -F "$root" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
}
cleanup() {
  unmount_all
  if [ "${KLAB_CLEAN_ROOM_KEEP:-}" != 1 ]; then rm -rf "$root"; fi
}

exec 9>/tmp/klab-qemu.lock
log "waiting for /tmp/klab-qemu.lock (QEMU tests and clean rooms run one at a time)"
flock 9

if command -v virsh >/dev/null && virsh -c qemu:///system list --all --name 2>/dev/null | grep -q '^klab-local-'; then
  die "the host has a lab named local (its bridges would clash with the room's); run \`klab down local\` first"
fi

t0=$SECONDS
unmount_all
rm -rf "$root"
mkdir -p "$root" "$debs"
trap cleanup EXIT

log "debootstrap bookworm into $root"
debootstrap --variant=minbase --include="$base_pkgs" --cache-dir="$debs" bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap"; }
# The same apt sources a fresh machine has (setup-host.sh adds backports itself).
cat >"$root/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The machine's TLS trust (a workplace may add its own CA for the package registries) is part of
# the machine, not of klab's install steps: carry it over as a local CA so package updates keep it.
cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-trust.crt"
chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the room"
[ -f /etc/apt/apt.conf.d/99artifact-registry ] && cp /etc/apt/apt.conf.d/99artifact-registry "$root/etc/apt/apt.conf.d/"
log "root ready after $((SECONDS - t0)) s"

# libvirt gives each QEMU a private /dev built from the parent's; from a chroot whose /dev is the
# host's, bind-mounted, that copy misses nodes (QEMU: "Could not open '/dev/urandom'"). A machine has
# its own /dev, so this is the room's limit, not an install step: run the room's QEMUs without that
# namespace. A conffile present before the package is kept (setup-host.sh installs with confold).
mkdir -p "$root/etc/libvirt"
cat >"$root/etc/libvirt/qemu.conf" <<'CONF'
# clean room: the room's /dev is the host's (bind mount); see scripts/clean-room.sh
namespaces = [ ]
CONF

log "copying the checkout (tracked and untracked files, no target/)"
mkdir -p "$root/root/klab"
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$root/root/klab"
mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin"

cat >"$root/root/run-readme.sh" <<'INNER'
#!/usr/bin/env bash
# Runs inside the room: the README's first command, then use and removal of the lab.
set -euo pipefail
mount -t proc proc /proc
mkdir -p /run/lock && chmod 1777 /tmp
export HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export CARGO_HOME=/root/.cargo CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
cd /root/klab
teardown() {
  # Only the room's own libvirtd answers here; remove whatever it still holds so no bridge of the
  # room outlives it in the shared network namespace.
  if command -v virsh >/dev/null && virsh -c qemu:///system version >/dev/null 2>&1; then
    for d in $(virsh -c qemu:///system list --all --name); do virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true; virsh -c qemu:///system undefine "$d" --nvram >/dev/null 2>&1 || true; done
    for n in $(virsh -c qemu:///system net-list --all --name); do virsh -c qemu:///system net-destroy "$n" >/dev/null 2>&1 || true; virsh -c qemu:///system net-undefine "$n" >/dev/null 2>&1 || true; done
  fi
}
trap teardown EXIT
echo "== README: bash scripts/setup-host.sh && bash scripts/demo.sh"
start=$SECONDS
bash scripts/setup-host.sh && bash scripts/demo.sh
echo "== README command finished in $((SECONDS - start)) s"
klab=./target/release/klab
step() { echo "== $*"; "$@" || { rc=$?; echo "== FAILED (exit $rc): $*"; exit "$rc"; }; }
step $klab status local
step $klab ssh node1 -- 'test "$(hostname)" = node1'
$klab ssh-config local > /tmp/ssh_config
grep -qE '^Host (.+ )?node1( |$)' /tmp/ssh_config || { echo "== FAILED: no Host entry for node1 in klab ssh-config:"; cat /tmp/ssh_config; exit 1; }
step $klab down local
# libvirt's own `default` network (libvirt-daemon-config-network) is not the lab's: only klab's count.
left="$( { virsh -c qemu:///system list --all --name; virsh -c qemu:///system net-list --all --name; virsh -c qemu:///system pool-list --all --name; } | grep '^klab-' || true)"
if [ -n "$left" ]; then echo "klab down left objects behind:"; echo "$left"; exit 1; fi
if ls /var/lib/klab/pools/local /var/lib/klab/labs/local >/dev/null 2>&1; then echo "klab down left the lab's pool or state directory"; exit 1; fi
echo "== clean room: README command, status, ssh, down all worked"
INNER
chmod +x "$root/root/run-readme.sh"

log "running the README's first command in the room (own PID/mount namespace, own libvirt)"
trap - ERR
set +e
unshare --mount --pid --fork --propagation private -- bash -c '
  set -e
  r="$1"
  # The room'"'"'s / must be a mount point, as on a machine: libvirt runs each QEMU in its own mount
  # namespace and makes / a slave mount first, which fails with EINVAL on a plain directory.
  mount --bind "$r" "$r"
  mount --rbind /sys "$r/sys"
  mount --rbind /dev "$r/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$r/run"
  mount --bind "$2" "$r/root/.rustup" && mount -o remount,bind,ro "$r/root/.rustup"
  mount --bind "$3" "$r/root/.cargo/bin" && mount -o remount,bind,ro "$r/root/.cargo/bin"
  exec chroot "$r" env -i TERM=dumb /root/run-readme.sh
' clean-room "$root" "$rust_home" "$cargo_bin" 2>&1 | tee "$work/room.log"
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - t0))
if [ "$status" -ne 0 ]; then
  die "the README's first command (or using/removing its lab) failed in a fresh Debian 12 root after ${elapsed} s; log: $work/room.log"
fi
log "passed in ${elapsed} s (fresh root, setup-host.sh, demo.sh, status, ssh, down)"
