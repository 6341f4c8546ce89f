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

#[test]
fn standin_kubeadm_takes_klabs_rendered_configs() {
    let mut tools = BUILD_TOOLS.to_vec();
    tools.push(("openssl", "openssl"));
    if !tools_present(&tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb_dir = build(&tmp.path().join("www"), "k8s");
    let inst = tmp.path().join("inst");
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb_dir.join("amd64/kubeadm_1.36.4-1.1_amd64.deb"))
        .arg(&inst)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let kubeadm = inst.join("usr/bin/kubeadm");

    // klab's rendered kubeadm configs for quickstart (cp1 inits, w1 joins), markers filled in as
    // the runner would.
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/quickstart.toml"))
            .unwrap();
    let lab = klab::config::parse_str(&src, "labs/quickstart.toml").unwrap();
    let plan = super::labs_plan::plan_with_test_keys(&lab);
    let t = klab::render::Templates::builtin().unwrap();
    let p = klab::render::resolve_provision(&plan, &t)
        .expect("render")
        .expect("a Kubernetes lab");
    let fill = |s: String| {
        s.replace("${klab:bootstrap-token}", "abcdef.0123456789abcdef")
            .replace("${klab:certificate-key}", &"ab".repeat(32))
            .replace(
                "${klab:ca-cert-hash}",
                &format!("sha256:{}", "cd".repeat(32)),
            )
            .replace("${klab:kubernetes-version}", "1.36.4")
    };
    let init = fill(rendered_file(
        &p,
        PhaseId::KubeadmInit,
        "cp1",
        provision::INIT_CONFIG,
    ));
    let join = fill(rendered_file(
        &p,
        PhaseId::JoinWorkers,
        "w1",
        provision::JOIN_CONFIG,
    ));
    assert!(!init.contains("${klab:") && !join.contains("${klab:"));
    let init_file = tmp.path().join("init.yaml");
    let join_file = tmp.path().join("join.yaml");
    std::fs::write(&init_file, &init).unwrap();
    std::fs::write(&join_file, &join).unwrap();

    let run = |root: &Path, args: &[&str]| {
        Command::new(&kubeadm)
            .args(args)
            .env("KLAB_STANDIN_ROOT", root)
            .output()
            .unwrap()
    };
    // The first control plane: klab's CA is in place before init, as the kubeadm-init phase has it.
    let cp1 = tmp.path().join("cp1");
    std::fs::create_dir_all(cp1.join("etc/kubernetes/pki")).unwrap();
    let o = run(&cp1, &["init", "--config", init_file.to_str().unwrap()]);
    assert!(!o.status.success(), "init without klab's CA must fail");
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
        .arg(cp1.join("etc/kubernetes/pki/ca.key"))
        .arg("-out")
        .arg(cp1.join("etc/kubernetes/pki/ca.crt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
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
    ] {
        assert!(cp1.join(f).is_file(), "{f} missing after init");
    }
    assert_eq!(
        std::fs::read_to_string(cp1.join("var/log/klab-standin/config-1-init.yaml")).unwrap(),
        init
    );
    // A second init is refused, as kubeadm's preflight does.
    assert!(!run(&cp1, &init_args).status.success());

    // join-credentials: klab's exact command finds the token from the init config.
    let creds = command(&p, PhaseId::JoinCredentials, "bootstrap token valid");
    let o = sh(
        &fill(creds.run.clone()),
        &format!("{}/usr/bin:/usr/bin:/bin", inst.display()),
        &[("KLAB_STANDIN_ROOT", cp1.to_str().unwrap())],
    );
    assert!(o.status.success(), "token check: {}", text(&o));
    let o = run(&cp1, &["token", "list", "-o", "jsonpath={.token}{\"\\n\"}"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "abcdef.0123456789abcdef\n"
    );

    // A worker joins once; a second join on the same node is refused.
    let w1 = tmp.path().join("w1");
    let join_args = ["join", "--config", join_file.to_str().unwrap()];
    let o = run(&w1, &join_args);
    assert!(o.status.success(), "join: {}", text(&o));
    let kubelet = std::fs::read_to_string(w1.join("etc/kubernetes/kubelet.conf")).unwrap();
    assert!(
        kubelet.contains(&format!("    server: https://{endpoint}\n")),
        "{kubelet}"
    );
    assert!(!w1.join("etc/kubernetes/admin.conf").exists());
    assert!(!run(&w1, &join_args).status.success());
}
