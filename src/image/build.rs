//! `klab image build debian-12`: a cloud-init-ready Debian 12 image made from Debian packages with
//! debootstrap, tuned to boot fast under TCG, with its kernel and initrd copied out for direct kernel
//! boot. Needs root (debootstrap, chroot, `mkfs.ext4 -d` preserving ownership).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::command::{self, RunError};
use super::{
    ChecksumKind, ImageCache, ImageError, ImageMeta, Origin, created_by, file_stamp, hash_file,
    now_unix, remove_stale_parts, unique_part_path,
};

/// How long each build step may take before it is killed. Generous: a slow mirror or disk makes a
/// step slow, only a wedged one makes it this slow.
mod bounds {
    use std::time::Duration;

    pub const DEBOOTSTRAP: Duration = Duration::from_secs(45 * 60);
    pub const CHROOT_SHORT: Duration = Duration::from_secs(5 * 60);
    pub const INITRAMFS: Duration = Duration::from_secs(15 * 60);
    pub const MKFS: Duration = Duration::from_secs(15 * 60);
    pub const CONVERT: Duration = Duration::from_secs(20 * 60);
    pub const UMOUNT: Duration = Duration::from_secs(60);
}

/// `45 min`, `90 s`, `0.3 s`: the bound as the error message names it.
fn format_bound(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 120 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else if d.subsec_millis() == 0 {
        format!("{secs} s")
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Kernel command line of the built image (root is the whole virtio disk, no partition table).
pub const DEBIAN12_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 ds=nocloud net.ifnames=0";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";

/// Packages on top of `--variant=minbase`. `systemd-resolved` keeps DNS working: cloud-init renders
/// nameservers into systemd-networkd files, which only resolved turns into `/etc/resolv.conf`.
pub const DEBIAN12_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-base",
    "initramfs-tools",
    "zstd",
    "cloud-init",
    "openssh-server",
    "iproute2",
    "sudo",
    "ca-certificates",
    "netbase",
    "python3-cffi-backend",
    // debootstrap does not resolve resolved's virtual `default-dbus-system-bus` dependency.
    "dbus",
    "systemd-resolved",
    "linux-image-amd64",
];
/// What `--with-containerd` adds: the container runtime the provisioner configures, and the tools a
/// cloud image has that the minimal build lacks (curl fetches the Kubernetes repository key, openssl
/// and keepalived serve the provisioner's end-to-end tests).
pub const CONTAINERD_PACKAGES: &[&str] = &["containerd", "runc", "curl", "openssl", "keepalived"];

/// Units that only cost boot time in a lab VM.
const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "e2scrub_all.timer",
    "e2scrub_all.service",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    // Holds cloud-init's network stage (and so sysinit.target and sshd) until every link is
    // "online"; with static addresses from cloud-init nothing needs to wait for it.
    "systemd-networkd-wait-online.service",
];

/// Modules udev would load for QEMU's emulated PC devices; each costs boot time under TCG and none is
/// used. `blacklist` only stops automatic loading, `modprobe` still works.
const BLACKLISTED_MODULES: &[&str] = &[
    "floppy",
    "pcspkr",
    "kvm",
    "kvm_intel",
    "kvm_amd",
    "psmouse",
    "serio_raw",
    "joydev",
    "i2c_piix4",
    "intel_rapl_msr",
    "intel_rapl_common",
];

/// Module trees a virtio lab guest never loads. Everything netfilter, bridge and overlay stays.
const TRIMMED_MODULE_DIRS: &[&str] = &[
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/bluetooth",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/isdn",
    "kernel/drivers/iio",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/net/bluetooth",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Cache key the image is stored under (`<key>.qcow2`); `debian-12` stands in for the catalog image.
    pub key: String,
    /// Debian mirror; `None`: `$KLAB_DEBIAN_MIRROR`, else `http://deb.debian.org/debian`.
    pub mirror: Option<String>,
    pub extra_packages: Vec<String>,
    /// Add containerd and runc (what the Kubernetes provisioner needs, pre-installed).
    pub with_containerd: bool,
    /// Size of the root filesystem (the qcow2's virtual size).
    pub size_bytes: u64,
    /// `qemu-img convert -c`: about a third of the size, ~6 s more.
    pub compress: bool,
    /// Rebuild even when a built image is already in the cache.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            key: "debian-12".into(),
            mirror: None,
            extra_packages: Vec::new(),
            with_containerd: false,
            size_bytes: 4 << 30,
            compress: false,
            force: false,
        }
    }
}

impl BuildOptions {
    /// The mirror actually used.
    pub fn resolved_mirror(&self) -> String {
        self.mirror
            .clone()
            .or_else(|| std::env::var("KLAB_DEBIAN_MIRROR").ok())
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
    }

    /// Every package passed to debootstrap's `--include`.
    pub fn packages(&self) -> Vec<String> {
        let mut pkgs: Vec<String> = DEBIAN12_PACKAGES.iter().map(|p| p.to_string()).collect();
        if self.with_containerd {
            pkgs.extend(CONTAINERD_PACKAGES.iter().map(|p| p.to_string()));
        }
        for p in &self.extra_packages {
            if !pkgs.contains(p) {
                pkgs.push(p.clone());
            }
        }
        pkgs
    }
}

/// The result of a build (or of finding one already built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub key: String,
    pub path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Size of the qcow2 file on disk.
    pub file_bytes: u64,
    pub sha256: String,
    /// `true`: an existing build was kept (no `force`).
    pub reused: bool,
    pub elapsed: Duration,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn package_name_ok(p: &str) -> bool {
    p.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.')
        })
}

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn find_tool(tool: &str) -> bool {
    let inherited = std::env::var("PATH").unwrap_or_default();
    PATH_ENV
        .split(':')
        .chain(inherited.split(':'))
        .any(|dir| !dir.is_empty() && Path::new(dir).join(tool).is_file())
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Builds (or finds) the Debian 12 image in `cache`. Blocking; takes ~40 s with a warm package cache.
pub fn build_debian12(cache: &ImageCache, opts: &BuildOptions) -> Result<BuiltImage, ImageError> {
    let started = Instant::now();
    let key = opts.key.as_str();
    if !valid_key(key) {
        return Err(ImageError::Build {
            key: key.to_string(),
            what: "the key must be a plain file name (letters, digits, `-`, `_`, `.`)".into(),
        });
    }
    if let Some(bad) = opts.extra_packages.iter().find(|p| !package_name_ok(p)) {
        return Err(ImageError::Build {
            key: key.to_string(),
            what: format!("`{bad}` is not a Debian package name"),
        });
    }
    // Held for the whole build: a second build waits and then finds this one, and a `klab up` that
    // needs the image waits for it instead of downloading over it.
    let lock = cache.lock(key);
    if !opts.force
        && let Some(found) = existing_build(cache, key, opts, started)?
    {
        tracing::info!(
            "image `{key}`: already built at {} (use --force to rebuild)",
            found.path.display()
        );
        return Ok(found);
    }
    if !is_root() {
        return Err(ImageError::NotRoot);
    }
    let _lock = lock?;
    let dest = cache.base_path(key);
    if dest.is_file() {
        cache.refuse_if_in_use(key, &dest, "a rebuild would replace it")?;
    }
    for path in [&dest, &cache.kernel_path(key), &cache.initrd_path(key)] {
        remove_stale_parts(path);
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("chroot", "coreutils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ] {
        if !find_tool(tool) {
            return Err(ImageError::MissingTool { tool, package });
        }
    }
    cache.create_root()?;
    let pkg_cache = cache.debootstrap_cache();
    fs::create_dir_all(&pkg_cache).map_err(|source| ImageError::Write {
        path: pkg_cache.clone(),
        source,
    })?;

    let work = WorkDir::create(
        cache
            .root()
            .join(format!(".build-{key}-{}", std::process::id())),
    )?;
    let b = Builder {
        key,
        rootfs: work.path.join("rootfs"),
    };
    let mirror = opts.resolved_mirror();
    let packages = opts.packages();

    tracing::info!(
        "image `{key}`: debootstrap {SUITE} from {mirror} ({} packages)",
        packages.len()
    );
    let t = Instant::now();
    b.run(
        "debootstrap",
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg("--components=main")
            .arg(format!("--include={}", packages.join(",")))
            .arg(format!("--cache-dir={}", absolute(&pkg_cache).display()))
            .arg(SUITE)
            .arg(&b.rootfs)
            .arg(&mirror),
        bounds::DEBOOTSTRAP,
    )?;
    tracing::info!(
        "image `{key}`: debootstrap done in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    b.configure(&mirror)?;
    let kver = b.kernel_version()?;
    b.trim_modules(&kver)?;
    b.small_initramfs(&kver)?;
    b.cleanup()?;
    tracing::info!(
        "image `{key}`: configured (kernel {kver}) in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let raw = work.path.join("root.raw");
    let file = fs::File::create(&raw).map_err(|source| ImageError::Write {
        path: raw.clone(),
        source,
    })?;
    file.set_len(opts.size_bytes)
        .map_err(|source| ImageError::Write {
            path: raw.clone(),
            source,
        })?;
    drop(file);
    b.run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&b.rootfs)
            .arg(&raw),
        bounds::MKFS,
    )?;
    let qcow_part = unique_part_path(&dest);
    let mut convert = Command::new("qemu-img");
    convert.args(["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1"]);
    if opts.compress {
        convert.arg("-c");
    }
    b.run(
        "qemu-img convert",
        convert.arg(&raw).arg(&qcow_part),
        bounds::CONVERT,
    )?;
    let kernel_part = unique_part_path(&cache.kernel_path(key));
    let initrd_part = unique_part_path(&cache.initrd_path(key));
    copy_0644(
        key,
        &b.rootfs.join(format!("boot/vmlinuz-{kver}")),
        &kernel_part,
    )?;
    copy_0644(
        key,
        &b.rootfs.join(format!("boot/initrd.img-{kver}")),
        &initrd_part,
    )?;
    fs::set_permissions(&qcow_part, fs::Permissions::from_mode(0o644)).map_err(|source| {
        ImageError::Write {
            path: qcow_part.clone(),
            source,
        }
    })?;
    let sha256 = hash_file(key, &qcow_part, ChecksumKind::Sha256)?;
    tracing::info!(
        "image `{key}`: disk image written in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // The metadata goes last: without it nothing treats the set of files as a finished build.
    let meta_path = cache.meta_path(key);
    match fs::remove_file(&meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ImageError::Write {
                path: meta_path,
                source,
            });
        }
    }
    for (part, final_path) in [
        (&qcow_part, dest.clone()),
        (&kernel_part, cache.kernel_path(key)),
        (&initrd_part, cache.initrd_path(key)),
    ] {
        fs::rename(part, &final_path).map_err(|source| ImageError::Write {
            path: final_path.clone(),
            source,
        })?;
    }
    let (size, mtime_secs, mtime_nanos) = file_stamp(&dest).map_err(|source| ImageError::Read {
        key: key.to_string(),
        path: dest.clone(),
        source,
    })?;
    let kernel = cache.kernel_path(key);
    let initrd = cache.initrd_path(key);
    cache.write_meta(&ImageMeta {
        key: key.to_string(),
        source: Origin::Built,
        url: None,
        checksum_kind: ChecksumKind::Sha256.as_str().into(),
        checksum: sha256.clone(),
        size,
        mtime_secs,
        mtime_nanos,
        kernel: Some(kernel.display().to_string()),
        initrd: Some(initrd.display().to_string()),
        cmdline: Some(DEBIAN12_CMDLINE.into()),
        created_by: created_by(),
        created_at: now_unix(),
        build: Some(serde_json::json!({
            "distribution": "debian",
            "suite": SUITE,
            "mirror": mirror,
            "kernel_version": kver,
            "packages": packages,
            "compressed": opts.compress,
            "virtual_size": opts.size_bytes,
        })),
    })?;
    drop(work);
    let elapsed = started.elapsed();
    tracing::info!(
        "image `{key}`: built {} ({} MiB) in {:.1}s",
        dest.display(),
        size >> 20,
        elapsed.as_secs_f64()
    );
    Ok(BuiltImage {
        key: key.to_string(),
        path: dest,
        kernel,
        initrd,
        cmdline: DEBIAN12_CMDLINE.into(),
        file_bytes: size,
        sha256,
        reused: false,
        elapsed,
    })
}

/// A finished earlier build of `key`, when all its files are still there and unchanged.
fn existing_build(
    cache: &ImageCache,
    key: &str,
    opts: &BuildOptions,
    started: Instant,
) -> Result<Option<BuiltImage>, ImageError> {
    let Some(meta) = cache.meta(key)? else {
        return Ok(None);
    };
    // An image built without packages asked for now (an older `--with-containerd` set) is rebuilt.
    let have: Option<Vec<String>> = meta
        .build
        .as_ref()
        .and_then(|b| b.get("packages"))
        .and_then(|p| serde_json::from_value(p.clone()).ok());
    let want = opts.packages();
    let missing: Vec<&String> = match &have {
        Some(h) => want.iter().filter(|p| !h.contains(p)).collect(),
        None if want.len() > DEBIAN12_PACKAGES.len() => want.iter().collect(),
        None => Vec::new(),
    };
    if !missing.is_empty() {
        tracing::info!(
            "image `{key}`: the cached build lacks {}; rebuilding",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(None);
    }
    let path = cache.base_path(key);
    let (kernel, initrd) = (cache.kernel_path(key), cache.initrd_path(key));
    if meta.source != Origin::Built
        || !meta.matches_file(&path)
        || !kernel.is_file()
        || !initrd.is_file()
    {
        return Ok(None);
    }
    Ok(Some(BuiltImage {
        key: key.to_string(),
        path,
        kernel,
        initrd,
        cmdline: meta.cmdline.unwrap_or_else(|| DEBIAN12_CMDLINE.into()),
        file_bytes: meta.size,
        sha256: meta.checksum,
        reused: true,
        elapsed: started.elapsed(),
    }))
}

fn absolute(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn copy_0644(key: &str, from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to).map_err(|source| ImageError::Read {
        key: key.to_string(),
        path: from.to_path_buf(),
        source,
    })?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644)).map_err(|source| ImageError::Write {
        path: to.to_path_buf(),
        source,
    })
}

/// The temporary build directory; on drop it unmounts whatever debootstrap left mounted inside it and
/// only then deletes it, so a failed build can never recurse into the host's /proc, /sys or /dev.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(path: PathBuf) -> Result<Self, ImageError> {
        let write_err = |source| ImageError::Write {
            path: path.clone(),
            source,
        };
        if path.exists() {
            let stale = WorkDir { path: path.clone() };
            drop(stale);
        }
        fs::create_dir_all(&path).map_err(write_err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(write_err)?;
        let path = fs::canonicalize(&path).map_err(write_err)?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let mut mounts = mounts_under(&self.path);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in &mounts {
            let umount = command::run_bounded(
                Command::new("umount")
                    .arg("-l")
                    .arg(m)
                    .env("PATH", PATH_ENV),
                bounds::UMOUNT,
            );
            if let Err(e) = umount {
                tracing::warn!("umount -l {}: {e:?}", m.display());
            }
        }
        let left = mounts_under(&self.path);
        if !left.is_empty() {
            tracing::warn!(
                "leaving {} in place: still mounted inside it: {left:?}",
                self.path.display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove build directory {}: {e}", self.path.display());
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_mountinfo_under(&info, dir)
}

fn parse_mountinfo_under(info: &str, dir: &Path) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                u8::try_from(v).ok()
            });
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Builder<'a> {
    key: &'a str,
    rootfs: PathBuf,
}

impl Builder<'_> {
    /// Runs a command for at most `bound`, keeping its output for the error message.
    fn run(&self, step: &str, cmd: &mut Command, bound: Duration) -> Result<String, ImageError> {
        cmd.env("PATH", PATH_ENV)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive");
        let out = match command::run_bounded(cmd, bound) {
            Ok(out) => out,
            Err(RunError::TimedOut) => {
                return Err(ImageError::Timeout {
                    key: self.key.to_string(),
                    step: step.to_string(),
                    bound: format_bound(bound),
                });
            }
            Err(RunError::Spawn(source) | RunError::Io(source)) => {
                return Err(ImageError::Spawn {
                    key: self.key.to_string(),
                    step: step.to_string(),
                    source,
                });
            }
        };
        if out.status.success() {
            return Ok(out.output);
        }
        let lines: Vec<&str> = out.output.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        Err(ImageError::Command {
            key: self.key.to_string(),
            step: step.to_string(),
            status: out.status.to_string(),
            tail,
        })
    }

    fn chroot(&self, step: &str, args: &[&str], bound: Duration) -> Result<String, ImageError> {
        self.run(
            step,
            Command::new("chroot").arg(&self.rootfs).args(args),
            bound,
        )
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.rootfs.join(rel.trim_start_matches('/'))
    }

    fn write(&self, rel: &str, content: &str) -> Result<(), ImageError> {
        let path = self.path(rel);
        let write_err = |source| ImageError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(write_err)?;
        }
        // Replace symlinks instead of writing through them (resolv.conf and friends).
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).map_err(write_err)?;
        }
        fs::write(&path, content).map_err(write_err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(write_err)
    }

    fn remove(&self, rel: &str) -> Result<(), ImageError> {
        let path = self.path(rel);
        let res = match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        res.map_err(|source| ImageError::Write { path, source })
    }

    /// Empties a directory, keeping it.
    fn empty_dir(&self, rel: &str) -> Result<(), ImageError> {
        let path = self.path(rel);
        let Ok(entries) = fs::read_dir(&path) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let p = e.path();
            let res = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            res.map_err(|source| ImageError::Write { path: p, source })?;
        }
        Ok(())
    }

    fn symlink(&self, target: &str, rel: &str) -> Result<(), ImageError> {
        self.remove(rel)?;
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| ImageError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        symlink(target, &path).map_err(|source| ImageError::Write { path, source })
    }

    fn configure(&self, mirror: &str) -> Result<(), ImageError> {
        self.write("/etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")?;
        self.write("/etc/hostname", "debian\n")?;
        self.write(
            "/etc/hosts",
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        )?;
        let mut sources = format!("deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n");
        if mirror == DEFAULT_MIRROR {
            sources.push_str(
                "deb http://security.debian.org/debian-security bookworm-security main\n",
            );
        }
        self.write("/etc/apt/sources.list", &sources)?;
        // Every VM must get its own machine-id (DHCP client ids, journald) and its own host keys.
        self.write("/etc/machine-id", "")?;
        self.remove("/var/lib/dbus/machine-id")?;
        for entry in fs::read_dir(self.path("/etc/ssh"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                let p = entry.path();
                fs::remove_file(&p).map_err(|source| ImageError::Write { path: p, source })?;
            }
        }
        self.write(
            "/etc/ssh/sshd_config.d/10-klab.conf",
            "# klab: no reverse lookups on login (slow without DNS)\nUseDNS no\nGSSAPIAuthentication no\n",
        )?;
        self.write(
            "/etc/cloud/cloud.cfg.d/90_klab_datasource.cfg",
            "datasource_list: [ NoCloud, None ]\n",
        )?;
        self.write("/etc/cloud/cloud.cfg.d/91_klab_modules.cfg", CLOUD_MODULES)?;
        // networkd applies cloud-init's network config; resolved turns its DNS into resolv.conf.
        self.chroot(
            "systemctl enable",
            &[
                "systemctl",
                "enable",
                "systemd-networkd.service",
                "systemd-resolved.service",
            ],
            bounds::CHROOT_SHORT,
        )?;
        self.symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            "/etc/resolv.conf",
        )?;
        for unit in MASKED_UNITS {
            self.symlink("/dev/null", &format!("/etc/systemd/system/{unit}"))?;
        }
        let blacklist: String = BLACKLISTED_MODULES
            .iter()
            .map(|m| format!("blacklist {m}\n"))
            .collect();
        self.write("/etc/modprobe.d/klab-blacklist.conf", &blacklist)?;
        // containerd's start-up is heavy under TCG; let cloud-init and sshd have the CPU first.
        self.write(
            "/etc/systemd/system/containerd.service.d/10-klab.conf",
            "[Service]\nCPUWeight=10\n",
        )?;
        self.write(
            "/etc/systemd/journald.conf.d/10-klab.conf",
            "[Journal]\nSystemMaxUse=64M\n",
        )?;
        self.write(
            "/etc/dpkg/dpkg.cfg.d/01-klab-nodoc",
            "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n\
             path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n",
        )?;
        self.write(
            "/etc/modules-load.d/klab.conf",
            "# Kubernetes prerequisites, loaded early so the bridge sysctls apply\noverlay\nbr_netfilter\n",
        )?;
        Ok(())
    }

    fn kernel_version(&self) -> Result<String, ImageError> {
        let boot = self.path("/boot");
        let mut versions: Vec<String> = fs::read_dir(&boot)
            .map_err(|source| ImageError::Read {
                key: self.key.to_string(),
                path: boot.clone(),
                source,
            })?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_string)
            })
            .filter(|v| self.path(&format!("/boot/initrd.img-{v}")).is_file())
            .collect();
        versions.sort();
        versions.pop().ok_or_else(|| ImageError::Build {
            key: self.key.to_string(),
            what: "no kernel with an initrd in the image's /boot (is linux-image-amd64 installed?)"
                .into(),
        })
    }

    fn trim_modules(&self, kver: &str) -> Result<(), ImageError> {
        for dir in TRIMMED_MODULE_DIRS {
            self.remove(&format!("/lib/modules/{kver}/{dir}"))?;
        }
        self.chroot("depmod", &["depmod", "-a", kver], bounds::CHROOT_SHORT)?;
        Ok(())
    }

    /// An initramfs with just the virtio root path: a fraction of the default size, which matters when
    /// TCG has to load and decompress it on every boot.
    fn small_initramfs(&self, kver: &str) -> Result<(), ImageError> {
        self.write(
            "/etc/initramfs-tools/conf.d/10-klab.conf",
            "MODULES=list\nCOMPRESS=zstd\n",
        )?;
        self.write(
            "/etc/initramfs-tools/modules",
            "virtio_pci\nvirtio_blk\nvirtio_net\nvirtio_scsi\next4\ncrc32c_generic\n",
        )?;
        self.chroot(
            "update-initramfs",
            &["update-initramfs", "-u", "-k", kver],
            bounds::INITRAMFS,
        )?;
        Ok(())
    }

    fn cleanup(&self) -> Result<(), ImageError> {
        for dir in [
            "/var/cache/apt/archives",
            "/var/lib/apt/lists",
            "/usr/share/doc",
            "/usr/share/man",
            "/usr/share/info",
            "/var/log",
            "/tmp",
            "/var/lib/cloud",
        ] {
            self.empty_dir(dir)?;
        }
        for f in [
            "/var/cache/apt/pkgcache.bin",
            "/var/cache/apt/srcpkgcache.bin",
        ] {
            self.remove(f)?;
        }
        Ok(())
    }
}

/// cloud-init modules a klab node uses; the rest of Debian's list only costs boot time.
const CLOUD_MODULES: &str = "\
# klab: only the modules klab seeds use
cloud_init_modules:
  - seed_random
  - bootcmd
  - write_files
  - growpart
  - resizefs
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - ca_certs
  - users_groups
  - ssh
cloud_config_modules:
  - set_passwords
  - timezone
  - runcmd
cloud_final_modules:
  - package_update_upgrade_install
  - write_files_deferred
  - scripts_vendor
  - scripts_per_once
  - scripts_per_boot
  - scripts_per_instance
  - scripts_user
  - final_message
  - power_state_change
ssh_genkeytypes: [ ed25519 ]
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_has_the_test_guest_set_and_options() {
        let base = BuildOptions::default().packages();
        for p in [
            "cloud-init",
            "openssh-server",
            "linux-image-amd64",
            "systemd-sysv",
        ] {
            assert!(base.iter().any(|x| x == p), "{p} missing");
        }
        assert!(!base.iter().any(|x| x == "containerd"));
        let opts = BuildOptions {
            with_containerd: true,
            extra_packages: vec!["vim-tiny".into(), "runc".into()],
            ..BuildOptions::default()
        };
        let pkgs = opts.packages();
        assert!(pkgs.iter().any(|x| x == "containerd"));
        assert_eq!(pkgs.iter().filter(|x| *x == "runc").count(), 1);
        assert_eq!(pkgs.last().map(String::as_str), Some("vim-tiny"));
    }

    #[test]
    fn mirror_option_wins() {
        let opts = BuildOptions {
            mirror: Some("http://127.0.0.1/debian".into()),
            ..BuildOptions::default()
        };
        assert_eq!(opts.resolved_mirror(), "http://127.0.0.1/debian");
    }

    #[test]
    fn keys_and_package_names_are_checked() {
        assert!(valid_key("debian-12"));
        assert!(!valid_key("../x"));
        assert!(!valid_key(".hidden"));
        assert!(!valid_key(""));
        assert!(package_name_ok("linux-image-amd64"));
        assert!(package_name_ok("g++"));
        assert!(!package_name_ok("a,b"));
        assert!(!package_name_ok("--evil"));
    }

    #[test]
    fn mountinfo_lists_only_mounts_below_the_dir() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 22 0:5 / /var/lib/klab/images/.build-x/rootfs/proc rw - proc proc rw
31 22 0:6 / /var/lib/klab/images/.build-x/rootfs/sys rw - sysfs sysfs rw
32 22 0:7 / /var/lib/klab/images/.build-x2 rw - tmpfs t rw
33 22 0:8 / /var/lib/klab/images/.build-x/with\\040space rw - tmpfs t rw
";
        let got = parse_mountinfo_under(info, Path::new("/var/lib/klab/images/.build-x"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/var/lib/klab/images/.build-x/rootfs/proc"),
                PathBuf::from("/var/lib/klab/images/.build-x/rootfs/sys"),
                PathBuf::from("/var/lib/klab/images/.build-x/with space"),
            ]
        );
    }

    #[test]
    fn not_rebuilt_when_a_finished_build_exists() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let key = "debian-12";
        fs::write(cache.base_path(key), b"QFI\xfbdata").unwrap();
        fs::write(cache.kernel_path(key), b"k").unwrap();
        fs::write(cache.initrd_path(key), b"i").unwrap();
        let (size, mtime_secs, mtime_nanos) = file_stamp(&cache.base_path(key)).unwrap();
        cache
            .write_meta(&ImageMeta {
                key: key.into(),
                source: Origin::Built,
                url: None,
                checksum_kind: "sha256".into(),
                checksum: "ab".repeat(32),
                size,
                mtime_secs,
                mtime_nanos,
                kernel: Some(cache.kernel_path(key).display().to_string()),
                initrd: Some(cache.initrd_path(key).display().to_string()),
                cmdline: Some(DEBIAN12_CMDLINE.into()),
                created_by: created_by(),
                created_at: 0,
                build: None,
            })
            .unwrap();
        // An image without the provisioner's packages is not reused for `--with-containerd`.
        let containerd = BuildOptions {
            with_containerd: true,
            ..BuildOptions::default()
        };
        assert!(
            existing_build(&cache, key, &containerd, Instant::now())
                .unwrap()
                .is_none()
        );
        // Works as non-root too: an existing build is reported before the root check.
        let built = build_debian12(&cache, &BuildOptions::default()).unwrap();
        assert!(built.reused);
        assert_eq!(built.sha256, "ab".repeat(32));
        assert_eq!(built.path, cache.base_path(key));

        let local = cache.local_images().unwrap();
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].key, key);
        assert_eq!(local[0].cmdline.as_deref(), Some(DEBIAN12_CMDLINE));
        assert_eq!(
            local[0].kernel.as_deref(),
            Some(cache.kernel_path(key).display().to_string().as_str())
        );
    }

    #[test]
    fn work_dir_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let work = WorkDir::create(dir.path().join(".build-x-1")).unwrap();
        let path = work.path.clone();
        fs::create_dir_all(path.join("rootfs/etc")).unwrap();
        fs::write(path.join("rootfs/etc/hostname"), "x").unwrap();
        drop(work);
        assert!(!path.exists());
    }

    #[test]
    fn a_build_step_past_its_bound_is_killed_and_named() {
        let b = Builder {
            key: "debian-12",
            rootfs: PathBuf::from("/nonexistent"),
        };
        let started = Instant::now();
        let err = b
            .run(
                "sleep",
                Command::new("sleep").arg("30"),
                Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, ImageError::Timeout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "image `debian-12`: `sleep` did not finish within 0.3 s and was killed"
            ),
            "{msg}"
        );
        // A step within its bound reports its output or its failure as before.
        assert_eq!(
            b.run(
                "echo",
                Command::new("echo").arg("hi"),
                Duration::from_secs(20)
            )
            .unwrap(),
            "hi\n"
        );
        let msg = b
            .run("false", &mut Command::new("false"), Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`false` failed (exit status: 1)"), "{msg}");
    }

    #[test]
    fn bounds_are_named_readably() {
        assert_eq!(format_bound(Duration::from_secs(45 * 60)), "45 min");
        assert_eq!(format_bound(Duration::from_secs(60)), "60 s");
        assert_eq!(format_bound(Duration::from_millis(300)), "0.3 s");
    }

    #[test]
    fn bad_keys_are_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let opts = BuildOptions {
            key: "../etc".into(),
            ..BuildOptions::default()
        };
        let err = build_debian12(&cache, &opts).unwrap_err().to_string();
        assert!(err.contains("image `../etc`"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
