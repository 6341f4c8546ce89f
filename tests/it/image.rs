//! Image cache: verified downloads from a local HTTP server, path-image checks, and (ignored unless
//! `--include-ignored`: root and a reachable Debian mirror) the real `klab image build debian-12`.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use klab::image::{ChecksumKind, ImageCache, ImageError, NoProgress, Progress, Source};
use klab::model::OsFamily;
use klab::plan::ImageSpec;

/// A tiny HTTP/1.1 server on 127.0.0.1 serving fixed files; counts requests per path.
struct Server {
    base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    fn start(files: Vec<(&str, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let files: HashMap<String, Vec<u8>> =
            files.into_iter().map(|(p, b)| (p.to_string(), b)).collect();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, &files, &counter);
            }
        });
        Self { base, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The request line of a bodiless HTTP request (`GET /x HTTP/1.1`), its headers read and dropped;
/// shared by the tests' local servers.
pub fn read_request(stream: &TcpStream) -> Option<String> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    Some(request_line)
}

fn serve(
    stream: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    hits: &Mutex<HashMap<String, usize>>,
) {
    let Some(request_line) = read_request(&stream) else {
        return;
    };
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let mut out = stream;
    match files.get(&path) {
        Some(body) => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = out.write_all(body);
        }
        None => {
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
            );
        }
    }
    let _ = out.flush();
}

/// A small file that starts like a qcow2 image.
fn fake_qcow2(len: usize) -> Vec<u8> {
    let mut v = b"QFI\xfb\0\0\0\x03".to_vec();
    v.extend((0..len).map(|i| (i * 7 % 251) as u8));
    v
}

/// Expected digests come from the `sha2` crate directly, not from klab's own hasher.
fn digest(kind: ChecksumKind, data: &[u8]) -> String {
    use sha2::Digest;
    match kind {
        ChecksumKind::Sha256 => format!("{:x}", sha2::Sha256::digest(data)),
        ChecksumKind::Sha512 => format!("{:x}", sha2::Sha512::digest(data)),
    }
}

/// Records what the download reported.
#[derive(Default)]
struct CountingProgress {
    total: Mutex<Option<u64>>,
    bytes: AtomicUsize,
    finished: AtomicUsize,
}

impl Progress for CountingProgress {
    fn begin(&self, _label: &str, total: Option<u64>) {
        *self.total.lock().unwrap() = total;
    }
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes as usize, Ordering::SeqCst);
    }
    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Files in the cache directory, without the lock directory (lock files stay; removing them races).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".locks")
        .collect();
    names.sort();
    names
}

#[test]
fn download_verified_by_gnu_checksum_file_then_served_from_cache() {
    let image = fake_qcow2(700_000);
    let sums = format!(
        "{}  other.qcow2\n{}  img.qcow2\n",
        digest(ChecksumKind::Sha256, b"x"),
        digest(ChecksumKind::Sha256, &image)
    );
    let server = Server::start(vec![
        ("/img.qcow2", image.clone()),
        ("/SHA256SUMS", sums.into_bytes()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let source = Source::ChecksumFile {
        url: server.url("/img.qcow2"),
        checksum_url: server.url("/SHA256SUMS"),
        kind: ChecksumKind::Sha256,
    };
    let progress = CountingProgress::default();
    let path = cache.fetch("test-img", &source, &progress).unwrap();

    assert_eq!(path, cache.base_path("test-img"));
    assert_eq!(fs::read(&path).unwrap(), image);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(*progress.total.lock().unwrap(), Some(image.len() as u64));
    assert_eq!(progress.bytes.load(Ordering::SeqCst), image.len());
    assert_eq!(progress.finished.load(Ordering::SeqCst), 1);
    let meta = cache.meta("test-img").unwrap().unwrap();
    assert_eq!(meta.checksum, digest(ChecksumKind::Sha256, &image));
    assert_eq!(meta.size, image.len() as u64);
    assert_eq!(meta.url.as_deref(), Some(source.url()));
    assert_eq!(leftovers(cache.root()), ["test-img.json", "test-img.qcow2"]);

    // Second time: trusted from size + mtime, no request at all.
    let again = cache.fetch("test-img", &source, &NoProgress).unwrap();
    assert_eq!(again, path);
    assert_eq!(server.hits("/img.qcow2"), 1);
    assert_eq!(server.hits("/SHA256SUMS"), 1);
    // Downloads are not "built" images.
    assert!(cache.local_images().unwrap().is_empty());
}

#[test]
fn download_verified_by_bsd_sha512_list() {
    let image = fake_qcow2(50_000);
    let sums = format!(
        "SHA512 (img.qcow2) = {}\n",
        digest(ChecksumKind::Sha512, &image).to_uppercase()
    );
    let server = Server::start(vec![
        ("/d/img.qcow2", image.clone()),
        ("/d/SUMS", sums.into_bytes()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let source = Source::ChecksumFile {
        url: server.url("/d/img.qcow2"),
        checksum_url: server.url("/d/SUMS"),
        kind: ChecksumKind::Sha512,
    };
    let path = cache.fetch("k", &source, &NoProgress).unwrap();
    assert_eq!(fs::read(path).unwrap(), image);
    assert_eq!(cache.meta("k").unwrap().unwrap().checksum_kind, "sha512");
}

#[test]
fn bad_checksum_is_an_error_and_leaves_no_file() {
    let image = fake_qcow2(300_000);
    let server = Server::start(vec![("/img.qcow2", image.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let wrong = digest(ChecksumKind::Sha256, b"something else");
    let source = Source::Digest {
        url: server.url("/img.qcow2"),
        kind: ChecksumKind::Sha256,
        hex: wrong.clone(),
    };
    let err = cache.fetch("bad", &source, &NoProgress).unwrap_err();
    assert!(
        matches!(err, ImageError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("image `bad`") && msg.contains(&wrong), "{msg}");
    assert!(msg.contains(&digest(ChecksumKind::Sha256, &image)), "{msg}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn ensure_uses_the_sha256_from_the_lab_file() {
    let image = fake_qcow2(10_000);
    let server = Server::start(vec![("/x.qcow2", image.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let spec = ImageSpec {
        key: "mine".into(),
        family: OsFamily::Debian,
        base_path: cache.base_path("mine").display().to_string(),
        url: Some(server.url("/x.qcow2")),
        sha256: Some(format!(
            "sha256:{}",
            digest(ChecksumKind::Sha256, &image).to_uppercase()
        )),
        kernel: None,
        initrd: None,
        cmdline: None,
    };
    let path = cache.ensure(&spec, &NoProgress).unwrap();
    assert_eq!(fs::read(&path).unwrap(), image);
    cache.ensure(&spec, &NoProgress).unwrap();
    assert_eq!(server.hits("/x.qcow2"), 1);

    // A different digest for the same key means a different file: download again (and fail here).
    let other = ImageSpec {
        sha256: Some(digest(ChecksumKind::Sha256, b"new")),
        ..spec.clone()
    };
    assert!(matches!(
        cache.ensure(&other, &NoProgress),
        Err(ImageError::ChecksumMismatch { .. })
    ));
    assert_eq!(server.hits("/x.qcow2"), 2);
    // The verified copy survived the failed attempt.
    assert_eq!(fs::read(&path).unwrap(), image);
}

#[test]
fn a_file_placed_by_hand_is_hashed_once_instead_of_downloaded() {
    let image = fake_qcow2(5_000);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    fs::write(cache.base_path("hand"), &image).unwrap();
    // Nothing listens on this URL: a download attempt would fail.
    let source = Source::Digest {
        url: "http://127.0.0.1:9/hand.qcow2".into(),
        kind: ChecksumKind::Sha256,
        hex: digest(ChecksumKind::Sha256, &image),
    };
    assert_eq!(
        cache.fetch("hand", &source, &NoProgress).unwrap(),
        cache.base_path("hand")
    );
    assert!(cache.meta("hand").unwrap().is_some());
}

#[test]
fn offline_download_error_names_image_url_and_hint() {
    // Port 9 (discard) on loopback: nothing listens there, the connection is refused.
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let url = "http://127.0.0.1:9/debian-12-genericcloud-amd64.qcow2";
    let source = Source::ChecksumFile {
        url: url.into(),
        checksum_url: "http://127.0.0.1:9/SHA512SUMS".into(),
        kind: ChecksumKind::Sha512,
    };
    let msg = cache
        .fetch("debian-12", &source, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("cannot download image `debian-12` from http://127.0.0.1:9/"),
        "{msg}"
    );
    assert!(msg.contains("klab image build debian-12"), "{msg}");
    assert!(msg.contains("[images.debian-12]"), "{msg}");
}

#[test]
fn missing_checksum_entry_and_http_errors() {
    let image = fake_qcow2(1000);
    let server = Server::start(vec![
        ("/img.qcow2", image),
        (
            "/SUMS",
            format!("{}  else.qcow2\n", "a".repeat(64)).into_bytes(),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let err = cache
        .fetch(
            "k",
            &Source::ChecksumFile {
                url: server.url("/img.qcow2"),
                checksum_url: server.url("/SUMS"),
                kind: ChecksumKind::Sha256,
            },
            &NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(err, ImageError::ChecksumNotListed { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("`img.qcow2`"));
    assert_eq!(server.hits("/img.qcow2"), 0);

    let err = cache
        .fetch(
            "k",
            &Source::Digest {
                url: server.url("/gone.qcow2"),
                kind: ChecksumKind::Sha256,
                hex: "0".repeat(64),
            },
            &NoProgress,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot download image `k`") && err.contains("404"),
        "{err}"
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn a_verified_download_that_is_not_qcow2_is_refused() {
    let html = b"<html>maintenance</html>".to_vec();
    let server = Server::start(vec![("/img.qcow2", html.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let err = cache
        .fetch(
            "k",
            &Source::Digest {
                url: server.url("/img.qcow2"),
                kind: ChecksumKind::Sha256,
                hex: digest(ChecksumKind::Sha256, &html),
            },
            &NoProgress,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("not qcow2"), "{err}");
    assert!(leftovers(dir.path()).is_empty());
}

fn path_spec(key: &str, path: &Path) -> ImageSpec {
    ImageSpec {
        key: key.into(),
        family: OsFamily::Debian,
        base_path: path.display().to_string(),
        url: None,
        sha256: None,
        kernel: None,
        initrd: None,
        cmdline: None,
    }
}

#[test]
fn path_images_must_exist_and_be_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("cache"));
    let good = dir.path().join("good.qcow2");
    fs::write(&good, fake_qcow2(100)).unwrap();
    assert_eq!(
        cache
            .ensure(&path_spec("good", &good), &NoProgress)
            .unwrap(),
        good
    );

    let missing = dir.path().join("nope.qcow2");
    let err = cache
        .ensure(&path_spec("nope", &missing), &NoProgress)
        .unwrap_err();
    assert!(matches!(err, ImageError::Missing { .. }));
    assert!(err.to_string().contains("image `nope`"));

    let raw = dir.path().join("disk.img");
    let mut mbr = vec![0u8; 65536];
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    fs::write(&raw, mbr).unwrap();
    let msg = cache
        .ensure(&path_spec("raw", &raw), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("raw disk image, not qcow2"), "{msg}");
    assert!(msg.contains("qemu-img convert -f raw -O qcow2"), "{msg}");

    let empty = dir.path().join("empty.qcow2");
    fs::write(&empty, b"").unwrap();
    let msg = cache
        .ensure(&path_spec("e", &empty), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a recognised disk image"), "{msg}");
    // Path images never touch the cache.
    assert!(!cache.root().exists());
}

#[test]
fn catalog_image_without_checksum_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path());
    let spec = ImageSpec {
        url: Some("http://127.0.0.1:9/x.qcow2".into()),
        ..path_spec("custom", &dir.path().join("x"))
    };
    let msg = cache.ensure(&spec, &NoProgress).unwrap_err().to_string();
    assert!(
        msg.contains("no checksum") && msg.contains("[images.custom]"),
        "{msg}"
    );
}

/// The real build: debootstrap from the Debian mirror, ~40 s warm. Root and network to Debian needed.
#[test]
#[ignore = "needs root, debootstrap and a Debian mirror (scripts/test.sh runs it)"]
fn real_debian12_build() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cache = ImageCache::from_env();
    let opts = klab::image::BuildOptions {
        with_containerd: true,
        ..Default::default()
    };
    let built = klab::image::build_debian12(&cache, &opts).unwrap();
    eprintln!(
        "built {} ({} bytes, reused: {}) in {:.1}s",
        built.path.display(),
        built.file_bytes,
        built.reused,
        built.elapsed.as_secs_f64()
    );
    assert_eq!(built.path, cache.base_path("debian-12"));
    assert!(built.kernel.is_file() && built.initrd.is_file());
    assert_eq!(
        klab::image::sniff_file(&built.path).unwrap(),
        klab::image::DiskFormat::Qcow2
    );
    let local = cache.local_images().unwrap();
    assert!(local.iter().any(|l| l.key == "debian-12"), "{local:?}");
    // Idempotent: a second call keeps the image.
    let again = klab::image::build_debian12(&cache, &opts).unwrap();
    assert!(again.reused);
    assert_eq!(again.sha256, built.sha256);
}

fn sha256_source(url: String, data: &[u8]) -> Source {
    Source::Digest {
        url,
        kind: ChecksumKind::Sha256,
        hex: digest(ChecksumKind::Sha256, data),
    }
}

/// Two labs coming up at once want the same image: one download, one verified file, no `.part`.
#[test]
fn concurrent_fetches_share_one_verified_download() {
    let image = fake_qcow2(3_000_000);
    let server = Arc::new(Server::start(vec![("/img.qcow2", image.clone())]));
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let source = sha256_source(server.url("/img.qcow2"), &image);
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (cache, source, barrier) = (cache.clone(), source.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.fetch("shared", &source, &NoProgress)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), cache.base_path("shared"));
    }
    assert_eq!(
        server.hits("/img.qcow2"),
        1,
        "the second fetch must wait and reuse"
    );
    assert_eq!(fs::read(cache.base_path("shared")).unwrap(), image);
    assert_eq!(leftovers(cache.root()), ["shared.json", "shared.qcow2"]);
    assert_eq!(
        cache.meta("shared").unwrap().unwrap().checksum,
        digest(ChecksumKind::Sha256, &image)
    );
}

/// A `.part` left by a klab that was killed mid-download is cleaned up by the next one.
#[test]
fn a_stale_part_file_is_removed() {
    let image = fake_qcow2(20_000);
    let server = Server::start(vec![("/img.qcow2", image.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    fs::create_dir_all(cache.root()).unwrap();
    fs::write(cache.root().join("k.qcow2.part-4000000-0"), b"half").unwrap();
    fs::write(cache.root().join("k.qcow2.part"), b"older klab").unwrap();
    cache
        .fetch(
            "k",
            &sha256_source(server.url("/img.qcow2"), &image),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(leftovers(cache.root()), ["k.json", "k.qcow2"]);
}

/// A cached file that changed on disk since it was verified is hashed again, not trusted.
#[test]
fn a_cached_file_changed_on_disk_is_hashed_and_replaced() {
    let image = fake_qcow2(40_000);
    let server = Server::start(vec![("/img.qcow2", image.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let source = sha256_source(server.url("/img.qcow2"), &image);
    let path = cache.fetch("k", &source, &NoProgress).unwrap();
    let mut damaged = image.clone();
    damaged[1000] ^= 0xff;
    fs::write(&path, &damaged).unwrap();
    assert_eq!(cache.fetch("k", &source, &NoProgress).unwrap(), path);
    assert_eq!(server.hits("/img.qcow2"), 2);
    assert_eq!(fs::read(&path).unwrap(), image);
}

/// `qemu-img create -b`: an overlay in `<data>/pools/<lab>/` the way libvirt makes them.
fn overlay_on(base: &Path, overlay: &Path) {
    let qemu_img = super::tools::require("qemu-img", "qemu-utils").expect("qemu-img");
    fs::create_dir_all(overlay.parent().unwrap()).unwrap();
    let out = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .arg("1G")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A base image that overlays use is never replaced: a lab asking for other content gets an error
/// naming the overlays and a hint; once they are gone, the replacement goes ahead.
#[test]
fn an_image_in_use_is_not_replaced() {
    let old = fake_qcow2(30_000);
    let new = fake_qcow2(31_000);
    let server = Server::start(vec![
        ("/old.qcow2", old.clone()),
        ("/new.qcow2", new.clone()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let base = cache
        .fetch(
            "img",
            &sha256_source(server.url("/old.qcow2"), &old),
            &NoProgress,
        )
        .unwrap();
    let overlay = dir.path().join("pools/lab1/cp1.qcow2");
    overlay_on(&base, &overlay);
    assert_eq!(cache.overlays_using(&base), vec![overlay.clone()]);

    let want_new = sha256_source(server.url("/new.qcow2"), &new);
    let err = cache.fetch("img", &want_new, &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::InUse { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("image `img`: "), "{msg}");
    assert!(msg.contains(&overlay.display().to_string()), "{msg}");
    assert!(
        msg.contains("hint: `klab down` the labs using it first"),
        "{msg}"
    );
    assert_eq!(server.hits("/new.qcow2"), 0);
    assert_eq!(fs::read(&base).unwrap(), old, "the base image was kept");
    // The file that verifies is still handed out.
    let want_old = sha256_source(server.url("/old.qcow2"), &old);
    assert_eq!(cache.fetch("img", &want_old, &NoProgress).unwrap(), base);

    fs::remove_file(&overlay).unwrap();
    assert_eq!(cache.fetch("img", &want_new, &NoProgress).unwrap(), base);
    assert_eq!(fs::read(&base).unwrap(), new);
}

/// Bytes changed on disk behind the cache's back (same size, mtime put back) are caught by the hash
/// on reuse, not trusted because size and mtime still match the record.
#[test]
fn a_cached_file_is_hashed_again_before_reuse() {
    let image = fake_qcow2(40_000);
    let server = Server::start(vec![("/img.qcow2", image.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let source = sha256_source(server.url("/img.qcow2"), &image);
    let path = cache.fetch("k", &source, &NoProgress).unwrap();
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut damaged = image.clone();
    damaged[2000] ^= 0x01;
    fs::write(&path, &damaged).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(cache.fetch("k", &source, &NoProgress).unwrap(), path);
    assert_eq!(
        server.hits("/img.qcow2"),
        2,
        "the damaged copy must not be reused"
    );
    assert_eq!(fs::read(&path).unwrap(), image);
}

/// The lock wait is bounded and the error says who to wait for.
#[test]
fn a_held_image_lock_is_waited_for_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path().join("images"));
    let held = cache.lock("busy").unwrap();
    let impatient = cache
        .clone()
        .with_lock_wait(std::time::Duration::from_millis(200));
    let source = sha256_source("http://127.0.0.1:9/busy.qcow2".into(), b"x");
    let err = impatient.fetch("busy", &source, &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("another klab still holds"),
        "{err}"
    );
    drop(held);
    // Free again: the fetch gets past the lock (and fails on the closed port, as it should).
    let err = impatient.fetch("busy", &source, &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::Download { .. }), "{err:?}");
}
