//! Image cache: verified downloads from a local HTTP server, path-image checks, and (with `KLAB_E2E=1`,
//! as root, with a reachable Debian mirror) the real `klab image build debian-12`.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use klab::image::checksum::Hasher;
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

fn serve(
    stream: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    hits: &Mutex<HashMap<String, usize>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
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

fn digest(kind: ChecksumKind, data: &[u8]) -> String {
    let mut h = Hasher::new(kind);
    h.update(data);
    h.finish_hex()
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

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
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
    let mut names = leftovers(cache.root());
    names.sort();
    assert_eq!(names, ["test-img.json", "test-img.qcow2"]);

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
fn real_debian12_build() {
    if std::env::var("KLAB_E2E").as_deref() != Ok("1") {
        eprintln!("skipped: set KLAB_E2E=1 to run the real image build");
        return;
    }
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
