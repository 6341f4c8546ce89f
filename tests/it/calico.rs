//! The Calico manifest on the host (`klab::provision::calico`): verified downloads from a local
//! HTTP server into the cache, the cache on a second call, digest and shape errors, the refusal of
//! an unpinned release, and the lab's own `calico-manifest` (resolved against the lab file).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use klab::image::{NoProgress, Progress};
use klab::provision::calico::{self, CalicoError, ManifestSpec, ensure_manifest, sha256_hex};

use super::standin_repo::FileServer;

fn fixture() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/calico.yaml"))
        .unwrap()
}

#[derive(Default)]
struct Counting {
    total: Mutex<Option<u64>>,
    bytes: AtomicU64,
    finished: AtomicUsize,
}

impl Progress for Counting {
    fn begin(&self, _label: &str, total: Option<u64>) {
        *self.total.lock().unwrap() = total;
    }
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
    }
    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// A server with `files` under `/v3.32.1/…`, and a spec for its `calico.yaml`.
fn served(files: &[(&str, &[u8])], sha256: Option<String>) -> (tempfile::TempDir, ManifestSpec) {
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    for (name, body) in files {
        let p = www.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let server = FileServer::start("127.0.0.1:0", &www);
    let spec = ManifestSpec {
        version: "3.32.1".into(),
        own: None,
        url: format!("http://{}/v3.32.1/manifests/calico.yaml", server.addr),
        sha256,
        allow_unpinned: false,
    };
    (tmp, spec)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn calico_manifest_with_the_pinned_digest_is_cached_and_reused() {
    let body = fixture();
    let (tmp, spec) = served(
        &[("v3.32.1/manifests/calico.yaml", &body)],
        Some(sha256_hex(&body)),
    );
    let cache = tmp.path().join("images");
    let progress = Counting::default();
    let path = ensure_manifest(&spec, &cache, &progress).unwrap();
    assert_eq!(path, cache.join("calico/3.32.1/calico.yaml"));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(
        listing(&cache.join("calico/3.32.1")),
        ["calico.yaml", "lock"]
    );
    assert_eq!(*progress.total.lock().unwrap(), Some(body.len() as u64));
    assert_eq!(progress.bytes.load(Ordering::SeqCst), body.len() as u64);
    assert_eq!(progress.finished.load(Ordering::SeqCst), 1);

    // The second call reads the cache: the server no longer has the file.
    std::fs::remove_file(tmp.path().join("www/v3.32.1/manifests/calico.yaml")).unwrap();
    let again = Counting::default();
    assert_eq!(ensure_manifest(&spec, &cache, &again).unwrap(), path);
    assert_eq!(again.finished.load(Ordering::SeqCst), 0);

    // A cached file that no longer matches its pin is not used (and is not kept).
    std::fs::write(&path, b"tampered").unwrap();
    let err = ensure_manifest(&spec, &cache, &NoProgress).unwrap_err();
    assert!(matches!(err, CalicoError::Download { .. }), "{err}");
    assert_eq!(listing(&cache.join("calico/3.32.1")), ["lock"]);
}

#[test]
fn calico_manifest_with_a_wrong_digest_names_both_and_leaves_no_file() {
    let body = fixture();
    let pinned = "0".repeat(64);
    let (tmp, spec) = served(
        &[("v3.32.1/manifests/calico.yaml", &body)],
        Some(pinned.clone()),
    );
    let cache = tmp.path().join("images");
    let err = ensure_manifest(&spec, &cache, &NoProgress).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Calico 3.32.1: {} has sha256 {}, but klab's catalog pins {pinned}; nothing was kept",
            spec.url,
            sha256_hex(&body)
        )
    );
    assert!(err.hint().is_some());
    assert_eq!(listing(&cache.join("calico/3.32.1")), ["lock"]);
}

#[test]
fn calico_manifest_without_the_daemonset_is_refused() {
    let body = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: calico-config\n  namespace: kube-system\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: tigera-operator\n  namespace: tigera-operator\n".to_vec();
    let (tmp, spec) = served(
        &[("v3.32.1/manifests/calico.yaml", &body)],
        Some(sha256_hex(&body)),
    );
    let cache = tmp.path().join("images");
    let err = ensure_manifest(&spec, &cache, &NoProgress).unwrap_err();
    let part = cache.join("calico/3.32.1/calico.yaml.part");
    assert_eq!(
        err.to_string(),
        format!(
            "Calico manifest {}: no DaemonSet `calico-node` in it",
            part.display()
        )
    );
    assert_eq!(listing(&cache.join("calico/3.32.1")), ["lock"]);

    // A calico-node DaemonSet without the container's env list is refused too.
    let no_env = String::from_utf8(fixture())
        .unwrap()
        .replace("          env:\n            - name: DATASTORE_TYPE\n              value: \"kubernetes\"\n            - name: WAIT_FOR_DATASTORE", "          enx:\n            - name: DATASTORE_TYPE\n              value: \"kubernetes\"\n            - name: WAIT_FOR_DATASTORE");
    let path = tmp.path().join("no-env.yaml");
    std::fs::write(&path, &no_env).unwrap();
    let own = ManifestSpec {
        own: Some(path.clone()),
        ..spec
    };
    let err = ensure_manifest(&own, &cache, &NoProgress).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Calico manifest {}: container `calico-node` has no env list",
            path.display()
        )
    );
}

#[test]
fn unpinned_calico_release_is_refused_unless_allowed() {
    let body = fixture();
    let (tmp, spec) = served(&[("v3.32.1/manifests/calico.yaml", &body)], None);
    let cache = tmp.path().join("images");
    let err = ensure_manifest(&spec, &cache, &NoProgress).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Calico 3.32.1: klab has no pinned sha256 for {}, so it will not download it",
            spec.url
        )
    );
    assert!(err.hint().unwrap().contains("calico-manifest"));
    assert!(!cache.exists(), "nothing is made before the refusal");

    let allowed = ManifestSpec {
        allow_unpinned: true,
        ..spec
    };
    let path = ensure_manifest(&allowed, &cache, &NoProgress).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
}

#[test]
fn labs_own_calico_manifest_is_resolved_against_the_lab_file_and_needs_no_download() {
    let tmp = tempfile::tempdir().unwrap();
    let room = tmp.path().join("room");
    std::fs::create_dir_all(room.join("calico")).unwrap();
    std::fs::write(room.join("calico/calico.yaml"), fixture()).unwrap();
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/quickstart.toml"),
    )
    .unwrap()
    .replace(
        "[kubernetes]\n",
        "[kubernetes]\ncalico-version = \"3.31.7\"\ncalico-manifest = \"calico/calico.yaml\"\n",
    );
    let lab_file = room.join("lab.toml");
    std::fs::write(&lab_file, src).unwrap();
    let lab = klab::config::load_file(&lab_file).unwrap();
    let want: PathBuf = room.join("calico/calico.yaml");
    assert_eq!(
        lab.kubernetes.as_ref().unwrap().calico_manifest.as_deref(),
        Some(want.as_path())
    );
    let plan = super::labs_plan::plan_with_test_keys(&lab);
    let k = plan.kubernetes.as_ref().unwrap();
    // 3.31.7 has no pinned digest, but the lab's own file needs none.
    let spec = ManifestSpec::for_lab(k, false);
    assert_eq!(spec.sha256, None);
    let cache = tmp.path().join("images");
    assert_eq!(ensure_manifest(&spec, &cache, &NoProgress).unwrap(), want);
    assert!(!cache.exists());
}

#[test]
fn catalog_spec_for_the_default_release() {
    let lab = klab::config::parse_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/quickstart.toml"),
        )
        .unwrap(),
        "labs/quickstart.toml",
    )
    .unwrap();
    let plan = super::labs_plan::plan_with_test_keys(&lab);
    let spec = ManifestSpec::for_lab(plan.kubernetes.as_ref().unwrap(), false);
    assert_eq!(
        spec,
        ManifestSpec {
            version: "3.32.1".into(),
            own: None,
            url: "https://raw.githubusercontent.com/projectcalico/calico/v3.32.1/manifests/calico.yaml"
                .into(),
            sha256: Some(
                "a1df919d9721cf667accdc3e72848911b0cb25cfab7d2478ad0c996302c95744".into()
            ),
            allow_unpinned: false,
        }
    );
    assert_eq!(calico::release("3.31.7").map(|r| r.sha256), Some(None));
    // The fixture itself has the shape klab patches.
    calico::check_shape(Path::new("tests/fixtures/calico/calico.yaml"), &fixture()).unwrap();
}
