//! The stand-in Kubernetes apt repository (`scripts/standin-repo.sh`) that the real end-to-end
//! provisioner test installs from: built, served on 127.0.0.1, and read by the host's own apt in an
//! isolated apt root with the sources line, keyring and commands of klab's rendered `package-repo`,
//! `resolve-version` and `kubernetes-packages` phases — so the signature check, the version
//! resolution and the version globs are apt's own, not the test's.
//!
//! [`build`] and [`FileServer`] are what the QEMU end-to-end test reuses, serving on the host's
//! address of the lab's isolated network instead of 127.0.0.1.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use klab::plan::provision::{self, FileContent, Op, PhaseId, ProvisionPlan, value};

/// The named opt-out of tests/it/tools.rs: a missing tool fails the test unless it is set.
const ALLOW_MISSING: &str = "KLAB_TEST_ALLOW_MISSING_TOOLS";

/// `true` when every tool is installed; a missing one fails the test unless the opt-out is set.
fn tools_present(tools: &[(&str, &str)]) -> bool {
    let allow = std::env::var(ALLOW_MISSING).is_ok_and(|v| v == "1");
    let mut all = true;
    for (tool, package) in tools {
        let found = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
            .any(|d| !d.is_empty() && Path::new(d).join(tool).is_file());
        if !found {
            assert!(
                allow,
                "`{tool}` is not installed: this test needs it (apt-get install {package}, or run \
                 scripts/setup-host.sh); set {ALLOW_MISSING}=1 to skip such tests instead"
            );
            eprintln!("SKIPPED: `{tool}` not installed and {ALLOW_MISSING}=1");
            all = false;
        }
    }
    all
}

/// Tools [`build`] needs, with their Debian packages.
pub(crate) const BUILD_TOOLS: [(&str, &str); 3] = [
    ("dpkg-deb", "dpkg"),
    ("apt-ftparchive", "apt-utils"),
    ("gpg", "gnupg"),
];

/// Builds the stand-in repository under `root/<prefix>/v1.36/deb/`; `prefix` is the path a lab's
/// `package-repo` names (`core:/stable:` mirrors pkgs.k8s.io). Returns the `deb/` directory.
pub(crate) fn build(root: &Path, prefix: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/standin-repo.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(root.join(prefix))
        .output()
        .expect("run scripts/standin-repo.sh");
    assert!(
        out.status.success(),
        "standin-repo.sh failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(deb, root.join(prefix).join("v1.36/deb"));
    deb
}

/// A static HTTP/1.1 file server over a directory (GET and HEAD, `Connection: close`), one thread
/// per connection, each read bounded by a timeout. Runs until the test process ends.
pub(crate) struct FileServer {
    pub addr: SocketAddr,
}

impl FileServer {
    pub(crate) fn start(bind: &str, root: &Path) -> Self {
        let listener = TcpListener::bind(bind).expect("bind the file server");
        let addr = listener.local_addr().expect("local address");
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let root = root.clone();
                std::thread::spawn(move || serve_file(stream, &root));
            }
        });
        Self { addr }
    }
}

/// `%3A` → `:` and friends; `None` for a malformed escape.
fn percent_decode(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn serve_file(stream: TcpStream, root: &Path) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Some(request) = super::image::read_request(&stream) else {
        return;
    };
    let mut words = request.split(' ');
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let file = percent_decode(path)
        .filter(|p| p.starts_with('/') && !p.split('/').any(|s| s == ".."))
        .map(|p| root.join(p.trim_start_matches('/')))
        .filter(|p| p.is_file());
    let mut out = stream;
    match file.and_then(|p| std::fs::read(p).ok()) {
        Some(body) => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if method != "HEAD" {
                let _ = out.write_all(&body);
            }
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

/// The command op labelled `name` in `phase` on the plan's first node that has it.
fn command<'a>(p: &'a ProvisionPlan, phase: PhaseId, name: &str) -> &'a provision::CommandOp {
    p.phase(phase)
        .unwrap_or_else(|| panic!("no phase {}", phase.as_str()))
        .nodes
        .iter()
        .flat_map(|n| n.ops.iter())
        .find_map(|op| match op {
            Op::Run(c) if c.name == name => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no command `{name}` in {}", phase.as_str()))
}

fn sh(script: &str, path: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).env("PATH", path);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sh")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn standin_repo_is_signed_and_resolved_by_apt_through_klabs_package_phases() {
    let mut tools = BUILD_TOOLS.to_vec();
    tools.extend([("apt-get", "apt"), ("curl", "curl")]);
    if !tools_present(&tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    let deb_dir = build(&www, "core:/stable:");
    for f in [
        "InRelease",
        "Release",
        "Release.gpg",
        "Release.key",
        "Packages",
    ] {
        assert!(deb_dir.join(f).is_file(), "{f} missing");
    }
    let server = FileServer::start("127.0.0.1:0", &www);
    let base = format!("http://{}/core:/stable:", server.addr);

    // klab's own plan for a lab that names the mirror; quickstart has `version = "1.36"` (unpinned),
    // so resolve-version runs too.
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/quickstart.toml"))
            .unwrap();
    let src = src.replace(
        "[kubernetes]\n",
        &format!("[kubernetes]\npackage-repo = \"{base}\"\n"),
    );
    let lab = klab::config::parse_str(&src, "labs/quickstart.toml").expect("lab with a mirror");
    let plan = super::labs_plan::plan_with_test_keys(&lab);
    let p = &plan
        .kubernetes
        .as_ref()
        .expect("a Kubernetes lab")
        .provision;

    let repo_phase = p.phase(PhaseId::PackageRepo).unwrap();
    let sources = repo_phase.nodes[0]
        .ops
        .iter()
        .find_map(|op| match op {
            Op::File(f) if f.path == provision::APT_SOURCE => match &f.content {
                FileContent::Text { text } => Some(text.clone()),
                _ => None,
            },
            _ => None,
        })
        .expect("the apt source file");
    assert_eq!(
        sources,
        format!(
            "# klab: Kubernetes v1.36 packages\nTypes: deb\nURIs: {base}/v1.36/deb/\nSuites: /\nSigned-By: /etc/apt/keyrings/klab-kubernetes.asc\n"
        )
    );

    // An apt root of its own: nothing of the host's sources, keys, lists or dpkg state.
    let root = tmp.path().join("aptroot");
    for d in [
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "etc/apt/preferences.d",
        "etc/apt/apt.conf.d",
        "etc/apt/keyrings",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("etc/apt/sources.list"), "").unwrap();
    let keyring = format!("{}/etc/apt/keyrings", root.display());
    // Only the keyring's directory moves into the apt root; the rest is klab's text as rendered.
    std::fs::write(
        root.join("etc/apt/sources.list.d/klab-kubernetes.sources"),
        sources.replace("/etc/apt/keyrings", &keyring),
    )
    .unwrap();
    let r = root.display();
    let opts = format!(
        "-o Dir={r} -o Dir::State={r}/var/lib/apt -o Dir::State::status={r}/var/lib/dpkg/status \
         -o Dir::Cache={r}/var/cache/apt -o Dir::Etc={r}/etc/apt -o Dir::Etc::SourceList={r}/etc/apt/sources.list \
         -o Dir::Etc::SourceParts={r}/etc/apt/sources.list.d -o Dir::Etc::Trusted={r}/etc/apt/trusted.gpg \
         -o Dir::Etc::TrustedParts={r}/etc/apt/trusted.gpg.d -o APT::Sandbox::User=root \
         -o Acquire::Languages=none -o APT::Architectures=amd64 -o Acquire::Retries=0"
    );
    // `apt-get`/`apt-cache` on PATH run the host's apt inside that root, so klab's commands run as
    // the plan has them.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["apt-get", "apt-cache"] {
        let w = bin.join(tool);
        std::fs::write(
            &w,
            format!("#!/bin/sh\nexec /usr/bin/{tool} {opts} \"$@\"\n"),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());

    // package-repo: the key fetch (only its directory moved) and `apt-get update`, verbatim.
    let fetch = command(p, PhaseId::PackageRepo, "fetch the repository key");
    let o = sh(
        &fetch.run.replace("/etc/apt/keyrings", &keyring),
        &path,
        &[],
    );
    assert!(o.status.success(), "key fetch: {}", text(&o));
    assert_eq!(
        std::fs::read(root.join("etc/apt/keyrings/klab-kubernetes.asc")).unwrap(),
        std::fs::read(deb_dir.join("Release.key")).unwrap()
    );
    let update = command(p, PhaseId::PackageRepo, "apt-get update");
    assert_eq!(
        update.run,
        "apt-get update\n\
         apt-get update --error-on=any -o Dir::Etc::SourceList=/etc/apt/sources.list.d/klab-kubernetes.sources -o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0"
    );
    // Only the source file's directory moves into the apt root.
    let update_run = update.run.replace(
        "/etc/apt/sources.list.d",
        &format!("{}/etc/apt/sources.list.d", root.display()),
    );
    let o = sh(&update_run, &path, &[]);
    let out = text(&o);
    assert!(o.status.success(), "apt-get update: {out}");
    assert!(
        out.contains(&format!("Get:1 {base}/v1.36/deb  InRelease")),
        "{out}"
    );
    for bad in ["W:", "E:", "NO_PUBKEY", "not signed", "Ign:"] {
        assert!(!out.contains(bad), "`{bad}` in apt-get update: {out}");
    }

    // The signature check is real: another throw-away key (a second build) is refused.
    let other = build(&tmp.path().join("other"), "k8s");
    let good = std::fs::read(root.join("etc/apt/keyrings/klab-kubernetes.asc")).unwrap();
    std::fs::copy(
        other.join("Release.key"),
        root.join("etc/apt/keyrings/klab-kubernetes.asc"),
    )
    .unwrap();
    let o = sh(&update_run, &path, &[]);
    assert!(
        !o.status.success(),
        "apt accepted a foreign key: {}",
        text(&o)
    );
    assert!(text(&o).contains("NO_PUBKEY"), "{}", text(&o));
    std::fs::write(root.join("etc/apt/keyrings/klab-kubernetes.asc"), good).unwrap();
    let o = sh(&update_run, &path, &[]);
    assert!(o.status.success(), "apt-get update again: {}", text(&o));

    // resolve-version: the newest patch of the two the repository holds (1.36.3 and 1.36.4).
    let resolve = command(
        p,
        PhaseId::ResolveVersion,
        "newest patch of the minor (apt)",
    );
    let o = sh(&resolve.run, &path, &[]);
    assert!(o.status.success(), "resolve-version: {}", text(&o));
    let version = resolve.captures[0]
        .extract(&String::from_utf8_lossy(&o.stdout))
        .expect("kubernetes-version captured");
    assert_eq!(resolve.captures[0].value, value::KUBERNETES_VERSION);
    assert_eq!(version, "1.36.4");

    // kubernetes-packages: klab's install line (its `=1.36.4-*` globs), download only, with the
    // resolved version filled in where the plan has the marker.
    let install = command(
        p,
        PhaseId::KubernetesPackages,
        "install kubelet, kubeadm, kubectl ${klab:kubernetes-version} and hold them",
    );
    let line = install
        .run
        .lines()
        .next()
        .unwrap()
        .replace(&provision::marker(value::KUBERNETES_VERSION), &version);
    assert!(line.contains("'kubeadm=1.36.4-*'"), "{line}");
    let o = sh(&format!("{line} --download-only"), &path, &[]);
    assert!(o.status.success(), "apt-get install: {}", text(&o));
    let mut debs: Vec<String> = std::fs::read_dir(root.join("var/cache/apt/archives"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".deb"))
        .collect();
    debs.sort();
    assert_eq!(
        debs,
        [
            "cri-tools_1.36.0-1.1_amd64.deb",
            "kubeadm_1.36.4-1.1_amd64.deb",
            "kubectl_1.36.4-1.1_amd64.deb",
            "kubelet_1.36.4-1.1_amd64.deb",
        ]
    );

    // The stand-ins answer the phase's own version check and the sandbox-image query.
    let inst = tmp.path().join("inst");
    for d in &debs {
        let o = Command::new("dpkg-deb")
            .arg("-x")
            .arg(root.join("var/cache/apt/archives").join(d))
            .arg(&inst)
            .output()
            .unwrap();
        assert!(o.status.success(), "dpkg-deb -x {d}: {}", text(&o));
    }
    let standin_root = tmp.path().join("node");
    let node_path = format!("{}/usr/bin:/usr/sbin:/usr/bin:/sbin:/bin", inst.display());
    let env = [("KLAB_STANDIN_ROOT", standin_root.to_str().unwrap())];
    let check = command(
        p,
        PhaseId::KubernetesPackages,
        "verify the installed versions",
    );
    let o = sh(
        &check
            .run
            .replace(&provision::marker(value::KUBERNETES_VERSION), &version),
        &node_path,
        &env,
    );
    assert!(o.status.success(), "version check: {}", text(&o));
    let sandbox = command(p, PhaseId::Containerd, "sandbox image kubeadm expects");
    let o = sh(
        &sandbox
            .run
            .replace(&provision::marker(value::KUBERNETES_VERSION), &version),
        &node_path,
        &env,
    );
    assert!(o.status.success(), "sandbox image: {}", text(&o));
    assert_eq!(
        sandbox.captures[0]
            .extract(&String::from_utf8_lossy(&o.stdout))
            .as_deref(),
        Some("registry.k8s.io/pause:3.10.1")
    );
    let calls = std::fs::read_to_string(standin_root.join("var/log/klab-standin/calls.log"))
        .expect("the stand-ins record their calls");
    assert_eq!(
        calls,
        "kubeadm 'version' '-o' 'short'\n\
         kubelet '--version'\n\
         kubectl 'version' '--client'\n\
         kubeadm 'config' 'images' 'list' '--kubernetes-version' 'v1.36.4'\n"
    );
}

/// The text of the file op at `path` on `node` in `phase` of a resolved (rendered) plan.
fn rendered_file(p: &ProvisionPlan, phase: PhaseId, node: &str, path: &str) -> String {
    p.phase(phase)
        .and_then(|ph| ph.node(node))
        .into_iter()
        .flat_map(|n| n.ops.iter())
        .find_map(|op| match op {
            Op::File(f) if f.path == path => match &f.content {
                FileContent::Text { text } => Some(text.clone()),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_else(|| panic!("no rendered {path} for {node} in {}", phase.as_str()))
}

/// The command op labelled `name` on `node` in `phase`.
fn command_on<'a>(
    p: &'a ProvisionPlan,
    phase: PhaseId,
    node: &str,
    name: &str,
) -> &'a provision::CommandOp {
    p.phase(phase)
        .and_then(|ph| ph.node(node))
        .into_iter()
        .flat_map(|n| n.ops.iter())
        .find_map(|op| match op {
            Op::Run(c) if c.name == name => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no command `{name}` on {node} in {}", phase.as_str()))
}

/// Every command op on `node` in `phase`, in order.
fn commands_on<'a>(
    p: &'a ProvisionPlan,
    phase: PhaseId,
    node: &str,
) -> Vec<&'a provision::CommandOp> {
    p.phase(phase)
        .and_then(|ph| ph.node(node))
        .into_iter()
        .flat_map(|n| n.ops.iter())
        .filter_map(|op| match op {
            Op::Run(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// A lab file's plan (with the test keys) and its resolved (rendered) provisioning plan.
fn rendered_lab(file: &str) -> (klab::plan::LabPlan, ProvisionPlan) {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let lab = klab::config::parse_str(&src, file).unwrap();
    let plan = super::labs_plan::plan_with_test_keys(&lab);
    let t = klab::render::Templates::builtin().unwrap();
    let p = klab::render::resolve_provision(&plan, &t)
        .expect("render")
        .expect("a Kubernetes lab");
    (plan, p)
}

/// Fills klab's secret markers as the runner would: a fixed token and certificate key, the real
/// hash of the cluster CA.
fn fill(s: &str, ca_hash: &str) -> String {
    s.replace("${klab:bootstrap-token}", "abcdef.0123456789abcdef")
        .replace("${klab:certificate-key}", &"ab".repeat(32))
        .replace("${klab:ca-cert-hash}", ca_hash)
        .replace("${klab:kubernetes-version}", "1.36.4")
}

/// The kubeadm, kubelet and kubectl 1.36.4 stand-ins (the API server comes with kubeadm), unpacked
/// under `tmp/inst` from a fresh build of the repository.
fn unpack_standins(tmp: &Path) -> PathBuf {
    let deb_dir = build(&tmp.join("www"), "k8s");
    let inst = tmp.join("inst");
    for pkg in ["kubeadm", "kubelet", "kubectl"] {
        let o = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb_dir.join(format!("amd64/{pkg}_1.36.4-1.1_amd64.deb")))
            .arg(&inst)
            .output()
            .unwrap();
        assert!(o.status.success(), "dpkg-deb -x {pkg}: {}", text(&o));
    }
    assert!(inst.join("usr/lib/klab-standin/apiserver").is_file());
    assert!(
        inst.join("usr/lib/systemd/system/klab-standin-apiserver.service")
            .is_file()
    );
    inst
}

/// A free port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh CA (what klab places before `kubeadm init`) in `pki`; returns its discovery hash,
/// computed with the openssl pipeline kubeadm's documentation gives.
fn make_ca(pki: &Path) -> String {
    std::fs::create_dir_all(pki).unwrap();
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=kubernetes", "-keyout"])
        .arg(pki.join("ca.key"))
        .arg("-out")
        .arg(pki.join("ca.crt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new("sh")
        .arg("-c")
        .arg("openssl x509 -pubkey -noout -in \"$1\" | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1")
        .arg("sh")
        .arg(pki.join("ca.crt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    format!("sha256:{}", String::from_utf8_lossy(&o.stdout).trim())
}

/// Kills the stand-in API servers the stand-ins spawned under these roots (their pid files), when
/// the test ends or panics.
struct Servers(Vec<PathBuf>);

impl Drop for Servers {
    fn drop(&mut self) {
        for root in &self.0 {
            if let Ok(pid) =
                std::fs::read_to_string(root.join("var/lib/klab-standin/apiserver.pid"))
            {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

/// One simulated node on the host: its own KLAB_STANDIN_ROOT, the stand-ins on PATH, every client
/// sent to the first control plane's server on 127.0.0.1 (KLAB_STANDIN_SERVER), its own API server
/// (if it runs one) on `own_port`, and fake `ip` output made from the plan's NICs.
struct Host {
    root: PathBuf,
    path: String,
    env: Vec<(String, String)>,
}

impl Host {
    fn new(
        tmp: &Path,
        node: &klab::plan::NodeSpec,
        inst: &Path,
        server_port: u16,
        own_port: u16,
        extra_ifaces: &[(u32, &str, &str)],
    ) -> Self {
        let root = tmp.join(&node.name);
        std::fs::create_dir_all(&root).unwrap();
        // `ip -o -4 addr show`: lo, then the NICs in the plan's order (NIC 1 first), then extras.
        let mut addrs = String::from(
            "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n",
        );
        for (i, nic) in node.nics.iter().enumerate() {
            addrs.push_str(&format!(
                "{}: {}    inet {}/{} scope global {}\\       valid_lft forever preferred_lft forever\n",
                i + 2,
                nic.ifname,
                nic.ip,
                nic.prefix,
                nic.ifname
            ));
        }
        for (idx, ifname, cidr) in extra_ifaces {
            addrs.push_str(&format!(
                "{idx}: {ifname}    inet {cidr} scope global {ifname}\\       valid_lft forever preferred_lft forever\n"
            ));
        }
        let route = node
            .nics
            .iter()
            .find_map(|n| {
                n.gateway
                    .map(|gw| format!("default via {gw} dev {} proto static\n", n.ifname))
            })
            .unwrap_or_default();
        let addr_file = tmp.join(format!("{}.ip-addr", node.name));
        let route_file = tmp.join(format!("{}.ip-route", node.name));
        std::fs::write(&addr_file, addrs).unwrap();
        std::fs::write(&route_file, route).unwrap();
        let env = vec![
            ("KLAB_STANDIN_ROOT".into(), root.display().to_string()),
            (
                "KLAB_STANDIN_SERVER".into(),
                format!("https://127.0.0.1:{server_port}"),
            ),
            ("KLAB_STANDIN_PORT".into(), own_port.to_string()),
            (
                "KLAB_STANDIN_IP_ADDR_FILE".into(),
                addr_file.display().to_string(),
            ),
            (
                "KLAB_STANDIN_IP_ROUTE_FILE".into(),
                route_file.display().to_string(),
            ),
        ];
        Self {
            root,
            path: format!("{}/usr/bin:/usr/sbin:/usr/bin:/sbin:/bin", inst.display()),
            env,
        }
    }

    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script).env("PATH", &self.path);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn sh(&self, script: &str) -> Output {
        self.command(script).output().expect("run sh")
    }

    /// `script` must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(o.status.success(), "`{script}`: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `script` must fail; its stderr.
    fn fails(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(!o.status.success(), "`{script}` succeeded: {}", text(&o));
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Writes `content` at the node's absolute `path`.
    fn put(&self, path: &str, content: &str) {
        let f = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, content).unwrap();
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{path} on {}: {e}", self.root.display()))
    }

    /// The kubelet's one-shot registration (what its systemd loop does every 2 s).
    fn register(&self) -> String {
        self.ok("kubelet --klab-standin-register-once")
    }
}

fn node<'a>(plan: &'a klab::plan::LabPlan, name: &str) -> &'a klab::plan::NodeSpec {
    plan.nodes.iter().find(|n| n.name == name).unwrap()
}

fn nic(n: &klab::plan::NodeSpec, i: usize) -> String {
    format!("{}/{}", n.nics[i].ip, n.nics[i].prefix)
}

const KC: &str = "kubectl --kubeconfig /etc/kubernetes/admin.conf";

#[test]
fn standin_kubeadm_takes_klabs_rendered_configs() {
    let mut tools = BUILD_TOOLS.to_vec();
    tools.extend([("openssl", "openssl"), ("python3", "python3")]);
    if !tools_present(&tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let inst = unpack_standins(tmp.path());
    let kubeadm = inst.join("usr/bin/kubeadm");

    // klab's rendered kubeadm configs for quickstart (cp1 inits, w1 joins), markers filled in as
    // the runner would.
    let (plan, p) = rendered_lab("labs/quickstart.toml");
    let init_file = tmp.path().join("init.yaml");
    let join_file = tmp.path().join("join.yaml");
    let port = free_port();
    let server = format!("https://127.0.0.1:{port}");
    let run = |root: &Path, args: &[&str]| {
        Command::new(&kubeadm)
            .args(args)
            .env("KLAB_STANDIN_ROOT", root)
            .env("KLAB_STANDIN_PORT", port.to_string())
            .env("KLAB_STANDIN_SERVER", &server)
            .output()
            .unwrap()
    };
    // The first control plane: klab's CA is in place before init, as the kubeadm-init phase has it.
    let cp1 = tmp.path().join("cp1");
    let _servers = Servers(vec![cp1.clone()]);
    std::fs::create_dir_all(cp1.join("etc/kubernetes/pki")).unwrap();
    let init = fill(
        &rendered_file(&p, PhaseId::KubeadmInit, "cp1", provision::INIT_CONFIG),
        "unused",
    );
    std::fs::write(&init_file, &init).unwrap();
    let o = run(&cp1, &["init", "--config", init_file.to_str().unwrap()]);
    assert!(!o.status.success(), "init without klab's CA must fail");
    let ca_hash = make_ca(&cp1.join("etc/kubernetes/pki"));
    let join = fill(
        &rendered_file(&p, PhaseId::JoinWorkers, "w1", provision::JOIN_CONFIG),
        &ca_hash,
    );
    assert!(!init.contains("${klab:") && !join.contains("${klab:"));
    std::fs::write(&join_file, &join).unwrap();

    // The configs are kubeadm v1beta4 as the stand-in checks it.
    for f in [&init_file, &join_file] {
        let o = run(
            &cp1,
            &["config", "validate", "--config", f.to_str().unwrap()],
        );
        assert!(o.status.success(), "config validate: {}", text(&o));
    }
    // Unknown fields, a removed apiVersion and another cgroup driver are refused before anything
    // is written.
    for (what, bad, want) in [
        (
            "unknown field",
            init.replace("  criSocket:", "  kubeletExtraArg: []\n  criSocket:"),
            "unknown field \"nodeRegistration.kubeletExtraArg\"",
        ),
        (
            "v1beta3",
            init.replace("kubeadm.k8s.io/v1beta4", "kubeadm.k8s.io/v1beta3"),
            "apiVersion \"kubeadm.k8s.io/v1beta3\" is not supported",
        ),
        (
            "v1beta3 map of kubelet args",
            init.replace(
                "  kubeletExtraArgs:\n    - name: node-ip\n      value:",
                "  kubeletExtraArgs:\n    node-ip:",
            ),
            "field \"nodeRegistration.kubeletExtraArgs\" must be a list",
        ),
        (
            "cgroupfs",
            init.replace("cgroupDriver: systemd", "cgroupDriver: cgroupfs"),
            "cgroupDriver is 'cgroupfs'",
        ),
    ] {
        let bad_root = tmp.path().join("bad");
        std::fs::create_dir_all(bad_root.join("etc/kubernetes/pki")).unwrap();
        for f in ["ca.crt", "ca.key"] {
            std::fs::copy(
                cp1.join("etc/kubernetes/pki").join(f),
                bad_root.join("etc/kubernetes/pki").join(f),
            )
            .unwrap();
        }
        let bad_file = tmp.path().join("bad.yaml");
        std::fs::write(&bad_file, &bad).unwrap();
        let o = run(&bad_root, &["init", "--config", bad_file.to_str().unwrap()]);
        assert!(!o.status.success(), "{what} accepted: {}", text(&o));
        assert!(text(&o).contains(want), "{what}: {}", text(&o));
        assert!(
            !bad_root.join("etc/kubernetes/admin.conf").exists(),
            "{what}: init wrote files before refusing"
        );
    }
    let bad_join = tmp.path().join("bad-join.yaml");
    std::fs::write(
        &bad_join,
        join.replace("    caCertHashes:", "    caCertHash: x\n    caCertHashes:"),
    )
    .unwrap();
    let o = run(
        &tmp.path().join("bad-w"),
        &["join", "--config", bad_join.to_str().unwrap()],
    );
    assert!(
        !o.status.success()
            && text(&o).contains("unknown field \"discovery.bootstrapToken.caCertHash\""),
        "{}",
        text(&o)
    );

    let init_args = [
        "init",
        "--config",
        init_file.to_str().unwrap(),
        "--upload-certs",
    ];
    let o = run(&cp1, &init_args);
    assert!(o.status.success(), "init: {}", text(&o));
    let admin = std::fs::read_to_string(cp1.join("etc/kubernetes/admin.conf")).unwrap();
    let endpoint = &plan.kubernetes.as_ref().unwrap().control_plane_endpoint;
    assert!(
        admin.contains(&format!("    server: https://{endpoint}\n")),
        "{admin}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(cp1.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("etc/kubernetes/admin.conf"), 0o600);
        assert_eq!(mode("etc/kubernetes/pki/apiserver.key"), 0o600);
    }
    for f in [
        "etc/kubernetes/super-admin.conf",
        "etc/kubernetes/kubelet.conf",
        "etc/kubernetes/manifests/kube-apiserver.yaml",
        "etc/kubernetes/manifests/etcd.yaml",
        "etc/kubernetes/pki/apiserver.crt",
        "etc/kubernetes/pki/etcd/ca.crt",
        "etc/kubernetes/pki/sa.pub",
        "etc/kubernetes/pki/front-proxy-ca.crt",
        "var/log/klab-standin/config-1-init.yaml",
        "var/lib/kubelet/config.yaml",
        "var/lib/klab-standin/cluster.json",
        "var/lib/klab-standin/apiserver.pid",
    ] {
        assert!(cp1.join(f).is_file(), "{f} missing after init");
    }
    assert_eq!(
        std::fs::read_to_string(cp1.join("var/log/klab-standin/config-1-init.yaml")).unwrap(),
        init
    );
    // The API server's certificate is signed by klab's CA.
    let o = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(cp1.join("etc/kubernetes/pki/ca.crt"))
        .arg(cp1.join("etc/kubernetes/pki/apiserver.crt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // kubeadm's kubelet-start: the flags carry the CRI socket and the node-ip klab pinned.
    let flags = std::fs::read_to_string(cp1.join("var/lib/kubelet/kubeadm-flags.env")).unwrap();
    let cp1_ip = node(&plan, "cp1").cluster_ip;
    assert!(
        flags.starts_with("KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///run/containerd/containerd.sock ")
            && flags.ends_with(&format!(" --node-ip={cp1_ip}\"\n")),
        "{flags}"
    );
    // A second init is refused, as kubeadm's preflight does.
    assert!(!run(&cp1, &init_args).status.success());

    // join-credentials: klab's exact command finds the token from the init config.
    let creds = command(&p, PhaseId::JoinCredentials, "bootstrap token valid");
    let o = sh(
        &fill(&creds.run, &ca_hash),
        &format!("{}/usr/bin:/usr/bin:/bin", inst.display()),
        &[("KLAB_STANDIN_ROOT", cp1.to_str().unwrap())],
    );
    assert!(o.status.success(), "token check: {}", text(&o));
    let o = run(&cp1, &["token", "list", "-o", "jsonpath={.token}{\"\\n\"}"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "abcdef.0123456789abcdef\n"
    );

    // A worker joins once (discovery from the running server, the CA pinned); a second join on the
    // same node is refused.
    let w1 = tmp.path().join("w1");
    let join_args = ["join", "--config", join_file.to_str().unwrap()];
    let o = run(&w1, &join_args);
    assert!(o.status.success(), "join: {}", text(&o));
    let kubelet = std::fs::read_to_string(w1.join("etc/kubernetes/kubelet.conf")).unwrap();
    assert!(
        kubelet.contains(&format!("    server: https://{endpoint}\n")),
        "{kubelet}"
    );
    assert_eq!(
        std::fs::read(w1.join("etc/kubernetes/pki/ca.crt")).unwrap(),
        std::fs::read(cp1.join("etc/kubernetes/pki/ca.crt")).unwrap(),
        "the CA comes from discovery"
    );
    let flags = std::fs::read_to_string(w1.join("var/lib/kubelet/kubeadm-flags.env")).unwrap();
    let w1_ip = node(&plan, "w1").cluster_ip;
    assert!(flags.contains(&format!(" --node-ip={w1_ip}\"")), "{flags}");
    assert!(
        std::fs::read_to_string(w1.join("var/lib/kubelet/config.yaml"))
            .unwrap()
            .contains("cgroupDriver: systemd"),
        "the kubelet config comes from the cluster"
    );
    assert!(!w1.join("etc/kubernetes/admin.conf").exists());
    assert!(!run(&w1, &join_args).status.success());
}

#[test]
fn standin_cluster_answers_klabs_wait_ready_and_verify_phases() {
    let mut tools = BUILD_TOOLS.to_vec();
    tools.extend([("openssl", "openssl"), ("python3", "python3")]);
    if !tools_present(&tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let inst = unpack_standins(tmp.path());
    let (plan, p) = rendered_lab("labs/quickstart.toml");
    let port = free_port();
    let (cp1n, w1n) = (node(&plan, "cp1"), node(&plan, "w1"));
    let cp1 = Host::new(tmp.path(), cp1n, &inst, port, port, &[]);
    // w1 also has a docker bridge after its NICs: calico-node never picks it.
    let w1 = Host::new(
        tmp.path(),
        w1n,
        &inst,
        port,
        0,
        &[(4, "docker0", "172.17.0.1/16")],
    );
    let _servers = Servers(vec![cp1.root.clone()]);

    // kubeadm-init, verbatim: klab's CA and config, then its command.
    let ca_hash = make_ca(&cp1.root.join("etc/kubernetes/pki"));
    let init_config = fill(
        &rendered_file(&p, PhaseId::KubeadmInit, "cp1", provision::INIT_CONFIG),
        &ca_hash,
    );
    cp1.put(provision::INIT_CONFIG, &init_config);
    cp1.ok(&command_on(&p, PhaseId::KubeadmInit, "cp1", "kubeadm init").run);
    let probe = p.phase(PhaseId::KubeadmInit).unwrap().nodes[0]
        .probe
        .as_ref()
        .and_then(|p| p.command.clone())
        .unwrap();
    // Its probe is plain `test -f` of kubeadm's files: only their directory moves under the root.
    cp1.ok(&probe.replace(
        "/etc/kubernetes",
        &format!("{}/etc/kubernetes", cp1.root.display()),
    ));
    cp1.ok(&fill(
        &command_on(&p, PhaseId::JoinCredentials, "cp1", "bootstrap token valid").run,
        &ca_hash,
    ));
    // The API server answers as kube-apiserver does.
    let readyz = cp1.ok(&format!("{KC} get --raw='/readyz?verbose'"));
    assert!(
        readyz.lines().any(|l| l == "[+]etcd ok") && readyz.ends_with("readyz check passed\n"),
        "{readyz}"
    );
    assert_eq!(cp1.ok(&format!("{KC} get --raw /readyz")), "ok\n");

    // The kubelets register: cp1 right after init, w1 after klab's join.
    cp1.register();
    let join_config = fill(
        &rendered_file(&p, PhaseId::JoinWorkers, "w1", provision::JOIN_CONFIG),
        &ca_hash,
    );
    w1.put(provision::JOIN_CONFIG, &join_config);
    w1.ok(&command_on(&p, PhaseId::JoinWorkers, "w1", "kubeadm join").run);
    w1.register();

    // No CNI yet: both registered, both NotReady, so `kubectl wait` times out.
    let rows = cp1.ok(&format!("{KC} get nodes --no-headers"));
    let cols: Vec<Vec<&str>> = rows
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(cols.len(), 2, "{rows}");
    assert_eq!(cols[0][..3], ["cp1", "NotReady", "control-plane"], "{rows}");
    assert_eq!(cols[1][..3], ["w1", "NotReady", "<none>"], "{rows}");
    assert_eq!(cols[0][4], "v1.36.4", "{rows}");
    let err = cp1.fails(&format!(
        "{KC} wait --for=condition=Ready node --all --timeout=2s"
    ));
    assert_eq!(
        err,
        "error: timed out waiting for the condition on nodes/cp1\n"
    );
    let err = cp1.fails(&format!(
        "{KC} -n kube-system rollout status deployment/coredns --timeout=1s"
    ));
    assert!(
        err.ends_with("error: timed out waiting for the condition\n"),
        "{err}"
    );
    let err = cp1.fails(&format!(
        "{KC} -n kube-system get daemonset calico-node -o jsonpath='{{.metadata.name}}'"
    ));
    assert_eq!(
        err,
        "Error from server (NotFound): daemonsets.apps \"calico-node\" not found\n"
    );

    // The calico phase, verbatim: the manifest (the fixture), klab's kustomization and patch.
    let calico_dir = provision::CALICO_DIR;
    cp1.put(
        &format!("{calico_dir}/calico.yaml"),
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/calico.yaml"),
        )
        .unwrap(),
    );
    for f in ["kustomization.yaml", "calico-node-env.yaml"] {
        let path = format!("{calico_dir}/{f}");
        cp1.put(&path, &rendered_file(&p, PhaseId::Calico, "cp1", &path));
    }
    let apply = &command_on(
        &p,
        PhaseId::Calico,
        "cp1",
        "kubectl apply -k (Calico, patched)",
    )
    .run;
    cp1.ok(apply);
    let out = cp1.ok(&format!(
        "{KC} apply --server-side --force-conflicts -k {calico_dir}"
    ));
    assert!(
        out.lines()
            .any(|l| l == "daemonset.apps/calico-node serverside-applied"),
        "{out}"
    );
    let calico_probe = p.phase(PhaseId::Calico).unwrap().nodes[0]
        .probe
        .as_ref()
        .and_then(|p| p.command.clone())
        .unwrap();
    cp1.ok(&calico_probe);

    // wait-ready and verify, verbatim: every node Ready, CoreDNS available, every InternalIP and
    // calico-node address on the cluster network. (Verify's pod-network check has no pods to reach
    // here: the stand-in kubectl refuses `get pods`, so that check reports "not checked".)
    for c in commands_on(&p, PhaseId::WaitReady, "cp1") {
        cp1.ok(&c.run);
    }
    let verify_internal = &command_on(
        &p,
        PhaseId::Verify,
        "cp1",
        "node InternalIPs on the cluster network",
    )
    .run;
    let verify_calico = &command_on(
        &p,
        PhaseId::Verify,
        "cp1",
        "calico-node addresses on the cluster network",
    )
    .run;
    cp1.ok(verify_internal);
    cp1.ok(verify_calico);
    let jsonpath = |what: &str| {
        cp1.ok(&format!(
            "{KC} get nodes -o jsonpath='{{range .items[*]}}{{.metadata.name}}={what}{{\"\\n\"}}{{end}}'"
        ))
    };
    let internal = r#"{.status.addresses[?(@.type=="InternalIP")].address}"#;
    let calico = r"{.metadata.annotations.projectcalico\.org/IPv4Address}";
    assert_eq!(
        jsonpath(internal),
        format!("cp1={}\nw1={}\n", cp1n.cluster_ip, w1n.cluster_ip)
    );
    assert_eq!(
        jsonpath(calico),
        format!("cp1={}\nw1={}\n", nic(cp1n, 1), nic(w1n, 1))
    );
    let wide = cp1.ok(&format!("{KC} get nodes -o wide"));
    assert!(
        wide.starts_with("NAME   STATUS   ROLES           AGE   VERSION   INTERNAL-IP "),
        "{wide}"
    );
    let one = cp1.ok(&format!("{KC} get node w1"));
    assert!(one.starts_with("NAME   STATUS   ROLES    AGE"), "{one}");
    assert!(
        one.lines()
            .nth(1)
            .unwrap()
            .starts_with("w1     Ready    <none>   "),
        "{one}"
    );

    // The node addresses calico-node autodetects follow the DaemonSet's IP_AUTODETECTION_METHOD.
    let patch_path = format!("{calico_dir}/calico-node-env.yaml");
    let patch = rendered_file(&p, PhaseId::Calico, "cp1", &patch_path);
    let method_line = format!(
        "            - name: IP_AUTODETECTION_METHOD\n              value: \"{}\"\n",
        provision::CALICO_AUTODETECT
    );
    assert!(patch.contains(&method_line), "{patch}");
    let with_method = |m: Option<&str>| {
        let text = match m {
            Some(m) => patch.replace(
                &method_line,
                &method_line.replace(provision::CALICO_AUTODETECT, m),
            ),
            None => patch.replace(&method_line, ""),
        };
        cp1.put(&patch_path, &text);
        cp1.ok(apply);
        jsonpath(calico)
    };
    // Without the patch's method calico-node uses first-found, which walks the interfaces in
    // reverse kernel order (calico's interfaces.go): on these nodes the cluster NIC (NIC 2) comes
    // before NIC 1, and docker0 is excluded — it happens to pick the cluster addresses, but klab's
    // probe sees the method is not klab's.
    assert_eq!(
        with_method(None),
        format!("cp1={}\nw1={}\n", nic(cp1n, 1), nic(w1n, 1))
    );
    cp1.fails(&calico_probe);
    // A method that lands on NIC 1: klab's verify catches it.
    let nic1 = format!("cp1={}\nw1={}\n", nic(cp1n, 0), nic(w1n, 0));
    for m in [
        format!("skip-interface={}", cp1n.nics[1].ifname),
        format!("interface={}", cp1n.nics[0].ifname),
        {
            let outside = plan
                .networks
                .iter()
                .find(|n| n.key == cp1n.nics[0].network)
                .unwrap();
            format!("cidr={}/{}", outside.address, outside.prefix)
        },
    ] {
        assert_eq!(with_method(Some(&m)), nic1, "{m}");
        let err = cp1.fails(verify_calico);
        assert!(
            err.starts_with("calico-node addresses differ from the cluster network."),
            "{m}: {err}"
        );
        cp1.ok(verify_internal);
    }
    // klab's method again: back on the cluster network.
    assert_eq!(
        with_method(Some(provision::CALICO_AUTODETECT)),
        format!("cp1={}\nw1={}\n", nic(cp1n, 1), nic(w1n, 1))
    );
    cp1.ok(&calico_probe);

    // A kubelet without klab's node-ip pin takes its default route's address (NIC 1): both checks
    // of verify fail (kubernetes-internal-ip follows the InternalIP).
    let flags_path = "/var/lib/kubelet/kubeadm-flags.env";
    let flags = w1.read(flags_path);
    let pin = format!(" --node-ip={}", w1n.cluster_ip);
    assert!(flags.contains(&pin), "{flags}");
    w1.put(flags_path, &flags.replace(&pin, ""));
    w1.register();
    assert_eq!(
        jsonpath(internal),
        format!("cp1={}\nw1={}\n", cp1n.cluster_ip, w1n.nics[0].ip)
    );
    let err = cp1.fails(verify_internal);
    assert!(
        err.starts_with("node InternalIPs differ from the cluster network."),
        "{err}"
    );
    cp1.fails(verify_calico);
    // A node-ip that is not the node's is refused by the kubelet itself.
    w1.put(flags_path, &flags.replace(&pin, " --node-ip=10.99.99.99"));
    let o = w1.sh("kubelet --klab-standin-register-once");
    assert!(
        !o.status.success()
            && text(&o)
                .contains("node IP: \"10.99.99.99\" not found in the host's network interfaces"),
        "{}",
        text(&o)
    );
    w1.put(flags_path, &flags);
    w1.register();
    cp1.ok(verify_internal);
    cp1.ok(verify_calico);

    // Discovery pins the CA: a join with another hash, or an unknown token, is refused.
    let w2 = Host::new(
        tmp.path(),
        &klab::plan::NodeSpec {
            name: "w2".into(),
            ..w1n.clone()
        },
        &inst,
        port,
        0,
        &[],
    );
    let wrong = format!("sha256:{}", "00".repeat(32));
    w2.put(
        provision::JOIN_CONFIG,
        &join_config.replace(&ca_hash, &wrong),
    );
    let err = w2.fails(&format!("kubeadm join --config {}", provision::JOIN_CONFIG));
    assert!(
        err.contains(&format!(
            "cluster CA found in cluster-info ConfigMap is invalid: none of the public keys \"{ca_hash}\" are pinned"
        )),
        "{err}"
    );
    assert!(!w2.root.join("etc/kubernetes/kubelet.conf").exists());
    w2.put(
        provision::JOIN_CONFIG,
        &join_config.replace("abcdef.0123456789abcdef", "zzzzzz.zzzzzzzzzzzzzzzz"),
    );
    let err = w2.fails(&format!("kubeadm join --config {}", provision::JOIN_CONFIG));
    assert!(
        err.contains(
            "could not find a JWS signature in the cluster-info ConfigMap for token ID \"zzzzzz\""
        ),
        "{err}"
    );

    // Drain and delete, as real kubectl words them.
    let err = cp1.fails(&format!(
        "{KC} drain w1 --delete-emptydir-data --force --timeout=60s"
    ));
    assert!(
        err.contains("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore)"),
        "{err}"
    );
    let out = cp1.ok(&format!(
        "{KC} drain w1 --ignore-daemonsets --delete-emptydir-data --force --timeout=60s"
    ));
    assert_eq!(out, "node/w1 already cordoned\nnode/w1 drained\n");
    let rows = cp1.ok(&format!("{KC} get nodes --no-headers"));
    assert!(
        rows.lines()
            .any(|l| l.starts_with("w1 ") && l.contains(" Ready,SchedulingDisabled ")),
        "{rows}"
    );
    assert_eq!(
        cp1.ok(&format!("{KC} delete node w1")),
        "node \"w1\" deleted\n"
    );
    assert_eq!(
        cp1.fails(&format!("{KC} get node w1")),
        "Error from server (NotFound): nodes \"w1\" not found\n"
    );
    // klab's leave commands for a node that is gone already: nothing to drain, nothing deleted.
    cp1.ok(&format!(
        "if {KC} get node 'w1' >/dev/null 2>&1; then\n  {KC} drain 'w1' --ignore-daemonsets --delete-emptydir-data --force --timeout=30s\nfi"
    ));
    assert_eq!(
        cp1.ok(&format!("{KC} delete node 'w1' --ignore-not-found")),
        ""
    );
    assert_eq!(
        cp1.ok(&format!("{KC} get nodes --no-headers"))
            .lines()
            .count(),
        1
    );

    // Anything klab does not use is refused, never a silent success.
    let err = cp1.fails(&format!("{KC} get pods -A"));
    assert!(
        err.starts_with("kubectl (stand-in): unsupported: "),
        "{err}"
    );
    let err = cp1.fails(&format!("{KC} port-forward svc/x 8080"));
    assert!(
        err.starts_with("kubectl (stand-in): unsupported: "),
        "{err}"
    );

    let calls = cp1.read("/var/log/klab-standin/calls.log");
    assert!(
        calls.starts_with(
            "kubeadm 'init' '--config' '/etc/klab/kubeadm/init.yaml' '--upload-certs'\n"
        ),
        "{calls}"
    );
    assert!(
        calls.contains("kubelet '--klab-standin-register-once'\n"),
        "{calls}"
    );
}

#[test]
fn standin_control_plane_joins_are_serialized_like_etcd_learners() {
    let mut tools = BUILD_TOOLS.to_vec();
    tools.extend([("openssl", "openssl"), ("python3", "python3")]);
    if !tools_present(&tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let inst = unpack_standins(tmp.path());
    let (plan, p) = rendered_lab("labs/seed-001-ha.toml");
    let cps = &plan.kubernetes.as_ref().unwrap().control_planes;
    assert_eq!(cps.len(), 3, "{cps:?}");
    let port = free_port();
    let hosts: Vec<Host> = cps
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let own = if i == 0 { port } else { free_port() };
            let mut h = Host::new(tmp.path(), node(&plan, name), &inst, port, own, &[]);
            // A longer learner window than the stand-in's 3 s, so a loaded test host still
            // overlaps the two joins below.
            h.env
                .push(("KLAB_STANDIN_LEARNER_SECONDS".into(), "6".into()));
            h
        })
        .collect();
    let _servers = Servers(hosts.iter().map(|h| h.root.clone()).collect());

    let (first, a, b) = (&cps[0], &cps[1], &cps[2]);
    let ca_hash = make_ca(&hosts[0].root.join("etc/kubernetes/pki"));
    hosts[0].put(
        provision::INIT_CONFIG,
        &fill(
            &rendered_file(&p, PhaseId::KubeadmInit, first, provision::INIT_CONFIG),
            &ca_hash,
        ),
    );
    hosts[0].ok(&command_on(&p, PhaseId::KubeadmInit, first, "kubeadm init").run);
    for c in commands_on(&p, PhaseId::JoinCredentials, first) {
        hosts[0].ok(&fill(&c.run, &ca_hash));
    }
    let join = |i: usize| -> String {
        command_on(
            &p,
            PhaseId::JoinControlPlane,
            &cps[i],
            "kubeadm join (control plane)",
        )
        .run
        .clone()
    };
    for (i, name) in [(1, a), (2, b)] {
        hosts[i].put(
            provision::JOIN_CONFIG,
            &fill(
                &rendered_file(&p, PhaseId::JoinControlPlane, name, provision::JOIN_CONFIG),
                &ca_hash,
            ),
        );
    }

    // Two control planes join at once (what klab's serial schedule prevents): etcd admits one
    // learner, the other join fails with etcd's message.
    let procs: Vec<_> = [1, 2]
        .into_iter()
        .map(|i| {
            hosts[i]
                .command(&join(i))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = procs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(
        ok.len(),
        1,
        "exactly one join succeeds:\n{}\n{}",
        text(&outs[0]),
        text(&outs[1])
    );
    let (won, lost) = if ok[0] == 0 { (1, 2) } else { (2, 1) };
    let loser = &outs[lost - 1];
    assert!(
        String::from_utf8_lossy(&loser.stderr)
            .contains("etcdserver: too many learner members in cluster"),
        "{}",
        text(loser)
    );

    // The winner's API server is healthy, by klab's own check (against its member server).
    let own = hosts[won]
        .env
        .iter()
        .find(|(k, _)| k == "KLAB_STANDIN_PORT")
        .unwrap()
        .1
        .clone();
    let mut health = hosts[won].command(
        &command_on(
            &p,
            PhaseId::JoinControlPlane,
            &cps[won],
            "its API server and etcd member are healthy",
        )
        .run,
    );
    let o = health
        .env("KLAB_STANDIN_SERVER", format!("https://127.0.0.1:{own}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "health check: {}", text(&o));

    // The loser, reset as klab's hint says, joins once the other is done.
    hosts[lost].ok("kubeadm reset -f");
    hosts[lost].ok(&join(lost));

    let state: serde_json::Value =
        serde_json::from_str(&hosts[0].read("/var/lib/klab-standin/cluster.json")).unwrap();
    let refused = state["refusedControlPlaneJoins"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{state}");
    assert_eq!(refused[0]["node"], cps[lost].as_str());
    let mut joins: Vec<(f64, f64, String)> = state["controlPlaneJoins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["start"].as_f64().unwrap(),
                j["end"].as_f64().expect("every admitted join ended"),
                j["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    joins.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert_eq!(
        joins.iter().map(|j| j.2.as_str()).collect::<Vec<_>>(),
        [cps[won].as_str(), cps[lost].as_str()]
    );
    for w in joins.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "control-plane joins overlapped: {joins:?}"
        );
    }
    let members: Vec<(&str, bool)> = state["etcdMembers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["learner"].as_bool().unwrap()))
        .collect();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| !m.1), "{members:?}");

    // `kubeadm reset` of a joined control plane takes its etcd member along (and stops its server).
    hosts[won].ok("kubeadm reset -f");
    assert!(
        !hosts[won]
            .root
            .join("var/lib/klab-standin/apiserver.pid")
            .exists()
    );
    let state: serde_json::Value =
        serde_json::from_str(&hosts[0].read("/var/lib/klab-standin/cluster.json")).unwrap();
    let members: Vec<&str> = state["etcdMembers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, [first.as_str(), cps[lost].as_str()]);
}
