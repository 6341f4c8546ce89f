//! LibvirtBackend against libvirt's test driver, plus one real run against qemu:///system
//! that is `#[ignore]`d unless run with `--include-ignored`.
//!
//! `test:///default` is ONE instance shared by every connection of the process (while any is
//! open), so parallel tests would see each other's objects. Each test therefore opens a private
//! test-driver instance from its own node file (`test:///<tmp>/node.xml`) that mirrors the
//! default one's `default-pool`; `test:///default` itself is used where sharing cannot matter.
#![cfg(feature = "libvirt")]

use klab::backend::libvirt::LibvirtBackend;
use klab::backend::{Backend, BackendError, DomainState, OwnerTag, pool_tag_volume};
use klab::plan::OWNER_NS;

/// A private test-driver instance; keep the guard alive for the test's duration.
fn test_driver() -> (LibvirtBackend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        "<node><pool type='dir'><name>default-pool</name>\
         <uuid>dfe224cb-28fb-8dd0-c4b2-64eb3f0f4566</uuid>\
         <target><path>/default-pool</path></target></pool></node>",
    )
    .unwrap();
    let uri = format!("test://{}", node.display());
    let backend = LibvirtBackend::connect(&uri).expect("the test driver is always available");
    (backend, dir)
}

fn tagged_network(name: &str, lab: &str) -> String {
    format!(
        "<network><name>{name}</name><metadata><klab:lab xmlns:klab='{OWNER_NS}' name='{lab}' \
         network='cluster'/></metadata><bridge name='kl-{:08x}' stp='on' delay='0'/></network>",
        name.len()
    )
}

fn untagged_network(name: &str) -> String {
    format!("<network><name>{name}</name></network>")
}

fn domain_xml(name: &str, tag: Option<(&str, &str)>, disk: &str) -> String {
    let meta = tag
        .map(|(lab, node)| {
            format!(
                "<metadata><klab:lab xmlns:klab='{OWNER_NS}' name='{lab}' node='{node}'/></metadata>"
            )
        })
        .unwrap_or_default();
    format!(
        "<domain type='test'><name>{name}</name>{meta}<memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='i686'>hvm</type></os><devices>{disk}</devices></domain>"
    )
}

fn dir_pool(name: &str, path: &str) -> String {
    format!(
        "<pool type='dir'><name>{name}</name><target><path>{path}</path>\
         <permissions><mode>0755</mode></permissions></target></pool>"
    )
}

fn overlay_xml(name: &str, base: &str) -> String {
    format!(
        "<volume><name>{name}</name><capacity unit='MiB'>128</capacity><target>\
         <format type='qcow2'/><compat>1.1</compat></target><backingStore><path>{base}</path>\
         <format type='qcow2'/></backingStore></volume>"
    )
}

#[test]
fn test_driver_offers_no_x86_64_accelerator() {
    let b = LibvirtBackend::connect("test:///default").unwrap();
    assert_eq!(b.kind(), "libvirt");
    assert_eq!(b.uri(), "test:///default");
    let accel = b.accel_support().unwrap();
    // The test driver only has i686 guests of type `test`.
    assert!(!accel.kvm && !accel.qemu, "{accel:?}");
}

#[test]
fn connect_failure_names_the_uri() {
    let err = LibvirtBackend::connect("bogus-driver:///nowhere").unwrap_err();
    assert!(matches!(err, BackendError::Connect { .. }));
    assert!(err.to_string().contains("bogus-driver:///nowhere"), "{err}");
}

#[test]
fn network_ensure_and_remove_are_idempotent() {
    let (b, _node) = test_driver();
    let xml = tagged_network("klab-t-cluster", "t");
    b.ensure_network("klab-t-cluster", &xml).unwrap();
    b.ensure_network("klab-t-cluster", &xml).unwrap();
    let obs = b.observe("klab-t-").unwrap();
    assert_eq!(obs.networks.len(), 1);
    let net = &obs.networks[0];
    assert!(net.active);
    assert_eq!(
        net.owner,
        Some(OwnerTag {
            lab: "t".into(),
            node: None
        })
    );
    assert_eq!(net.bridge.as_deref(), Some("kl-0000000e"));

    // Stopped behind our back: ensure starts it again.
    let conn = b.virt_connect().unwrap();
    let raw = conn.lookup_network_by_name("klab-t-cluster").unwrap();
    raw.destroy().unwrap();
    assert!(!b.observe("klab-t-").unwrap().networks[0].active);
    b.ensure_network("klab-t-cluster", &xml).unwrap();
    assert!(b.observe("klab-t-").unwrap().networks[0].active);
    assert!(!raw.autostart().unwrap_or(true));

    b.remove_network("klab-t-cluster").unwrap();
    b.remove_network("klab-t-cluster").unwrap();
    assert!(b.observe("klab-t-").unwrap().networks.is_empty());

    // The XML must define the object it is applied to.
    let err = b
        .ensure_network("klab-t-other", &tagged_network("klab-t-x", "t"))
        .unwrap_err();
    assert!(err.to_string().contains("klab-t-x"), "{err}");
    assert!(b.observe("klab-t-").unwrap().networks.is_empty());
}

#[test]
fn observe_reports_tags_and_untagged_look_alikes() {
    let (b, _node) = test_driver();
    b.ensure_network("klab-t-cluster", &tagged_network("klab-t-cluster", "t"))
        .unwrap();
    b.ensure_network("klab-t-lookalike", &untagged_network("klab-t-lookalike"))
        .unwrap();
    // A foreign namespace using the `klab` prefix is not our tag.
    b.ensure_network(
        "klab-t-foreign",
        "<network><name>klab-t-foreign</name><metadata><klab:lab \
         xmlns:klab='https://example.com/not-klab' name='t'/></metadata></network>",
    )
    .unwrap();
    // Tagged but named differently: still found.
    b.ensure_network("renamed-net", &tagged_network("renamed-net", "t"))
        .unwrap();
    b.define_and_start(
        "klab-t-cp1",
        &domain_xml("klab-t-cp1", Some(("t", "cp1")), ""),
    )
    .unwrap();
    b.define_and_start("klab-t-imposter", &domain_xml("klab-t-imposter", None, ""))
        .unwrap();
    b.define_and_start(
        "elsewhere",
        &domain_xml("elsewhere", Some(("other", "w1")), ""),
    )
    .unwrap();

    let obs = b.observe("klab-t-").unwrap();
    let nets: Vec<(&str, Option<&str>)> = obs
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n.owner.as_ref().map(|o| o.lab.as_str())))
        .collect();
    assert_eq!(
        nets,
        vec![
            ("klab-t-cluster", Some("t")),
            ("klab-t-foreign", None),
            ("klab-t-lookalike", None),
            ("renamed-net", Some("t")),
        ]
    );
    let doms: Vec<(&str, Option<OwnerTag>)> = obs
        .domains
        .iter()
        .map(|d| (d.name.as_str(), d.owner.clone()))
        .collect();
    assert_eq!(
        doms,
        vec![
            (
                "elsewhere",
                Some(OwnerTag {
                    lab: "other".into(),
                    node: Some("w1".into())
                })
            ),
            (
                "klab-t-cp1",
                Some(OwnerTag {
                    lab: "t".into(),
                    node: Some("cp1".into())
                })
            ),
            ("klab-t-imposter", None),
        ]
    );
    // The driver's own objects (`test` domain, `default` network, `default-pool`) are not ours.
    assert!(obs.domains.iter().all(|d| d.name != "test"));
    assert!(obs.networks.iter().all(|n| n.name != "default"));
    assert!(obs.pools.is_empty());
}

#[test]
fn pool_ensure_tags_and_remove_requires_empty() {
    let (b, _node) = test_driver();
    let xml = dir_pool("klab-t", "/kltest/pools/t");
    b.ensure_pool("klab-t", &xml, "t").unwrap();
    b.ensure_pool("klab-t", &xml, "t").unwrap();
    let obs = b.observe("klab-t").unwrap();
    assert_eq!(obs.pools.len(), 1);
    assert_eq!(obs.pools[0].owner.as_deref(), Some("t"));
    assert_eq!(obs.pools[0].path.as_deref(), Some("/kltest/pools/t"));
    assert!(obs.pools[0].active);
    assert_eq!(obs.volumes.len(), 1);
    assert_eq!(obs.volumes[0].name, pool_tag_volume("t"));

    // Another lab may not take it over.
    let err = b.ensure_pool("klab-t", &xml, "u").unwrap_err();
    assert!(err.to_string().contains("lab `t`"), "{err}");

    // Overlay volume: backing store and qcow2 v3 are kept, creation is idempotent.
    let overlay = overlay_xml("cp1.qcow2", "/kltest/images/base.qcow2");
    b.create_volume("klab-t", &overlay).unwrap();
    b.create_volume("klab-t", &overlay).unwrap();
    let conn = b.virt_connect().unwrap();
    let pool = conn.lookup_storage_pool_by_name("klab-t").unwrap();
    let vol_xml = pool
        .lookup_storage_vol_by_name("cp1.qcow2")
        .unwrap()
        .xml_desc(0)
        .unwrap();
    assert!(vol_xml.contains("<compat>1.1</compat>"), "{vol_xml}");
    assert!(
        vol_xml.contains("<path>/kltest/images/base.qcow2</path>"),
        "{vol_xml}"
    );
    let err = b.create_volume("klab-nope", &overlay).unwrap_err();
    assert!(err.to_string().contains("klab-nope"), "{err}");

    // The test driver cannot upload: a clear error, and no half-made volume left behind.
    let err = b
        .upload_volume("klab-t", "cp1-seed.img", b"seed")
        .unwrap_err();
    assert!(matches!(err, BackendError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("cp1-seed.img"), "{err}");
    let names: Vec<String> = b
        .observe("klab-t")
        .unwrap()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["cp1.qcow2".to_string(), pool_tag_volume("t")]);

    let err = b.remove_pool("klab-t").unwrap_err();
    assert!(err.to_string().contains("cp1.qcow2"), "{err}");
    b.remove_volume("klab-t", "cp1.qcow2").unwrap();
    b.remove_volume("klab-t", "cp1.qcow2").unwrap();
    b.remove_volume("klab-nope", "cp1.qcow2").unwrap();
    b.remove_pool("klab-t").unwrap();
    b.remove_pool("klab-t").unwrap();
    let obs = b.observe("klab-t").unwrap();
    assert!(obs.pools.is_empty() && obs.volumes.is_empty());
}

#[test]
fn untagged_pool_with_volumes_is_not_claimed() {
    let (b, _node) = test_driver();
    // The driver's `default-pool` is foreign; put something in it first.
    b.create_volume(
        "default-pool",
        &overlay_xml("x.qcow2", "/kltest/images/base.qcow2"),
    )
    .unwrap();
    let err = b
        .ensure_pool(
            "default-pool",
            &dir_pool("default-pool", "/default-pool"),
            "t",
        )
        .unwrap_err();
    assert!(err.to_string().contains("ownership tag"), "{err}");
    let conn = b.virt_connect().unwrap();
    let pool = conn.lookup_storage_pool_by_name("default-pool").unwrap();
    assert!(
        pool.lookup_storage_vol_by_name(&pool_tag_volume("t"))
            .is_err()
    );
}

#[test]
fn domain_lifecycle_with_nvram_fallback() {
    let (b, _node) = test_driver();
    b.create_volume(
        "default-pool",
        &overlay_xml("cp1.qcow2", "/kltest/images/base.qcow2"),
    )
    .unwrap();
    let disks = "<disk type='volume' device='disk'><source pool='default-pool' volume='cp1.qcow2'/>\
                 <target dev='vda' bus='virtio'/></disk>\
                 <disk type='file' device='disk'><source file='/kltest/cp1-seed.img'/>\
                 <target dev='vdb' bus='virtio'/></disk>";
    let xml = domain_xml("klab-t-cp1", Some(("t", "cp1")), disks);
    b.define_and_start("klab-t-cp1", &xml).unwrap();
    b.define_and_start("klab-t-cp1", &xml).unwrap();
    let obs = b.observe("klab-t-").unwrap();
    assert_eq!(obs.domains.len(), 1);
    let d = &obs.domains[0];
    assert_eq!(d.state, DomainState::Running);
    assert_eq!(
        d.disks,
        vec![
            "/default-pool/cp1.qcow2".to_string(),
            "/kltest/cp1-seed.img".to_string()
        ]
    );
    // The volume in the foreign pool is reported because our domain uses it; others are not.
    assert_eq!(obs.volumes.len(), 1);
    assert_eq!(obs.volumes[0].pool, "default-pool");

    // Shut off behind our back: start_domain and define_and_start both bring it back.
    let conn = b.virt_connect().unwrap();
    conn.lookup_domain_by_name("klab-t-cp1")
        .unwrap()
        .destroy()
        .unwrap();
    assert_eq!(
        b.observe("klab-t-").unwrap().domains[0].state,
        DomainState::Shutoff
    );
    b.start_domain("klab-t-cp1").unwrap();
    b.start_domain("klab-t-cp1").unwrap();
    assert_eq!(
        b.observe("klab-t-").unwrap().domains[0].state,
        DomainState::Running
    );

    // The test driver rejects VIR_DOMAIN_UNDEFINE_NVRAM; removal falls back to undefine().
    b.remove_domain("klab-t-cp1").unwrap();
    b.remove_domain("klab-t-cp1").unwrap();
    assert!(b.observe("klab-t-").unwrap().domains.is_empty());
    let err = b.start_domain("klab-t-cp1").unwrap_err();
    assert!(err.to_string().contains("klab-t-cp1"), "{err}");
}

#[test]
fn shut_off_domain_is_removed_too() {
    let (b, _node) = test_driver();
    b.define_and_start("klab-t-w1", &domain_xml("klab-t-w1", Some(("t", "w1")), ""))
        .unwrap();
    let conn = b.virt_connect().unwrap();
    conn.lookup_domain_by_name("klab-t-w1")
        .unwrap()
        .destroy()
        .unwrap();
    b.remove_domain("klab-t-w1").unwrap();
    assert!(conn.lookup_domain_by_name("klab-t-w1").is_err());
}

/// Real libvirt: a dir pool in a temp dir, an uploaded vfat seed, a qcow2 overlay on a base
/// made with qemu-img; everything named `kltest-…` and removed even when an assertion fails.
mod system {
    use std::process::Command;

    use super::*;

    struct Cleanup<'a> {
        backend: &'a LibvirtBackend,
        pool: String,
        volumes: Vec<String>,
    }

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for v in &self.volumes {
                let _ = self.backend.remove_volume(&self.pool, v);
            }
            let _ = self.backend.remove_pool(&self.pool);
        }
    }

    #[test]
    #[ignore = "needs libvirt qemu:///system"]
    fn qemu_system_pool_seed_upload_and_overlay() {
        let b = LibvirtBackend::connect("qemu:///system").unwrap();
        let lab = format!("kltest-{}", std::process::id());
        let pool_name = format!("kltest-{}-pool", std::process::id());
        let tmp = tempfile::Builder::new()
            .prefix("kltest-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut perms = std::fs::metadata(tmp.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(tmp.path(), perms).unwrap();
        let pool_dir = tmp.path().join("pool");
        let base = tmp.path().join("base.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap();
        assert!(status.success());

        let _cleanup = Cleanup {
            backend: &b,
            pool: pool_name.clone(),
            volumes: vec!["cp1.qcow2".into(), "cp1-seed.img".into()],
        };
        b.ensure_pool(
            &pool_name,
            &dir_pool(&pool_name, pool_dir.to_str().unwrap()),
            &lab,
        )
        .unwrap();
        b.ensure_pool(
            &pool_name,
            &dir_pool(&pool_name, pool_dir.to_str().unwrap()),
            &lab,
        )
        .unwrap();
        assert!(pool_dir.join(pool_tag_volume(&lab)).exists());

        let seed = klab::seed::build_vfat_seed(&[
            ("meta-data", b"instance-id: kltest\n"),
            ("user-data", b"#cloud-config\n"),
        ])
        .unwrap();
        b.upload_volume(&pool_name, "cp1-seed.img", &seed).unwrap();
        // Uploading again (same size) rewrites in place.
        b.upload_volume(&pool_name, "cp1-seed.img", &seed).unwrap();
        let on_disk = std::fs::read(pool_dir.join("cp1-seed.img")).unwrap();
        assert!(on_disk == seed, "uploaded seed differs from the built one");

        let overlay = overlay_xml("cp1.qcow2", base.to_str().unwrap());
        b.create_volume(&pool_name, &overlay).unwrap();
        b.create_volume(&pool_name, &overlay).unwrap();
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(pool_dir.join("cp1.qcow2"))
            .output()
            .unwrap();
        assert!(info.status.success());
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], base.to_str().unwrap());
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_eq!(info["virtual-size"], 128 * 1024 * 1024);

        let obs = b.observe(&pool_name).unwrap();
        assert_eq!(obs.pools.len(), 1);
        assert_eq!(obs.pools[0].owner.as_deref(), Some(lab.as_str()));
        let mut names: Vec<&str> = obs.volumes.iter().map(|v| v.name.as_str()).collect();
        names.sort();
        let tag = pool_tag_volume(&lab);
        assert_eq!(names, vec!["cp1-seed.img", "cp1.qcow2", tag.as_str()]);

        assert!(
            b.remove_pool(&pool_name).is_err(),
            "pool with volumes must not go"
        );
        b.remove_volume(&pool_name, "cp1.qcow2").unwrap();
        b.remove_volume(&pool_name, "cp1-seed.img").unwrap();
        b.remove_pool(&pool_name).unwrap();
        b.remove_pool(&pool_name).unwrap();
        assert!(!pool_dir.exists(), "pool directory should be deleted");
        assert!(b.observe(&pool_name).unwrap().pools.is_empty());
    }
}
