//! PURE: the Kubernetes provisioning phases as data — per phase and node, the files to write, the
//! commands to run (timeout, accepted exit codes, captured values) and a cheap "already done" probe.
//!
//! Nothing here is secret or random: values only known at run time (the cluster CA, the bootstrap
//! token, the certificate key, the resolved patch version, the sandbox image, the detected OS) are
//! referenced by name as `${klab:NAME}` markers that the runner fills in just before a file or a
//! command goes to the node. `klab plan -o json` therefore shows the markers, never the values.
//!
//! Every command runs as root (the runner wraps it in `sudo -n sh -c`). Phases run in order; within a
//! phase, nodes run in parallel or strictly one at a time ([`Schedule`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::names;
use super::types::{KubernetesSpec, NodeSpec};
use crate::model::Encapsulation;

/// Run-time value names (`${klab:NAME}`).
pub mod value {
    /// Cluster CA certificate (PEM), made by klab before `kubeadm init`. Public.
    pub const CA_CERT: &str = "ca-cert";
    /// Cluster CA private key (PEM). Secret.
    pub const CA_KEY: &str = "ca-key";
    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo: the joins' `caCertHashes`. Public.
    pub const CA_CERT_HASH: &str = "ca-cert-hash";
    /// `[a-z0-9]{6}.[a-z0-9]{16}`. Secret.
    pub const BOOTSTRAP_TOKEN: &str = "bootstrap-token";
    /// 32 random bytes, hex: encrypts the control-plane certificates kubeadm uploads. Secret.
    pub const CERTIFICATE_KEY: &str = "certificate-key";
    /// The Calico manifest (`calico.yaml`) the host fetched and checked, or the lab's own file.
    pub const CALICO_MANIFEST: &str = "calico-manifest";
    /// Exact Kubernetes patch (`1.36.4`): the lab's pin, or resolved once on the first control plane.
    pub const KUBERNETES_VERSION: &str = "kubernetes-version";
    /// Captured by `detect-os`: `debian-12`, `ubuntu-24.04`, `almalinux-9.6` …
    pub const OS: &str = "os";
    /// Captured by `detect-os`: `apt` or `dnf`.
    pub const PKG: &str = "pkg";
    /// Captured by `detect-os`: `/sys/class/dmi/id/product_uuid`.
    pub const PRODUCT_UUID: &str = "product-uuid";
    /// Captured by `detect-os`: every physical NIC's MAC, space separated.
    pub const MACS: &str = "macs";
    /// Captured by `containerd`: `1` or `2`.
    pub const CONTAINERD_MAJOR: &str = "containerd-major";
    /// Captured by `containerd`: the pause image kubeadm expects (`registry.k8s.io/pause:3.10.1`).
    pub const SANDBOX_IMAGE: &str = "sandbox-image";
    /// Captured by `kubeconfig`: `/etc/kubernetes/admin.conf` of the first control plane. Secret.
    pub const ADMIN_KUBECONFIG: &str = "admin-kubeconfig";
    /// keepalived's VRRP password (8 characters, VRRP's PASS limit). Secret.
    pub const VRRP_PASSWORD: &str = "vrrp-password";
}

/// `${klab:NAME}`: how files and commands refer to a run-time value.
pub fn marker(name: &str) -> String {
    format!("${{klab:{name}}}")
}

/// Names referenced by `${klab:…}` markers in `text`, in order of first appearance.
pub fn refs(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("${klab:") {
        let after = &rest[i + 7..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if !out.iter().any(|n| n == name) {
                    out.push(name.to_string());
                }
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// Where kubeadm, the kubelet and crictl talk to containerd.
pub const CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";
/// Where klab keeps what it uploads for kubeadm and Calico on a node.
pub const KUBEADM_DIR: &str = "/etc/klab/kubeadm";
pub const CALICO_DIR: &str = "/etc/klab/calico";
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";

/// Template names (see `render`): files whose content comes from an overridable template.
pub mod template {
    pub const KUBEADM_INIT: &str = "kubeadm-init.yaml.j2";
    pub const KUBEADM_JOIN: &str = "kubeadm-join.yaml.j2";
    pub const CONTAINERD_1: &str = "containerd-1.toml.j2";
    pub const CONTAINERD_2: &str = "containerd-2.toml.j2";
    pub const CRICTL: &str = "crictl.yaml.j2";
    pub const CALICO_KUSTOMIZATION: &str = "calico-kustomization.yaml.j2";
    pub const CALICO_NODE_PATCH: &str = "calico-node-patch.yaml.j2";
    pub const KEEPALIVED: &str = "keepalived.conf.j2";
    pub const CHECK_APISERVER: &str = "check-apiserver.sh.j2";
}

/// Everything klab does to turn the lab's VMs into a cluster, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProvisionPlan {
    /// Values the caller hands in (from the state directory), by name.
    pub inputs: Vec<InputSpec>,
    pub phases: Vec<Phase>,
}

impl ProvisionPlan {
    pub fn phase(&self, id: PhaseId) -> Option<&Phase> {
        self.phases.iter().find(|p| p.id == id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    /// Kept 0600 in the state directory and redacted everywhere else.
    pub secret: bool,
    pub about: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseId {
    DetectOs,
    Preflight,
    PackageRepo,
    ResolveVersion,
    KubernetesPackages,
    Containerd,
    Vip,
    KubeadmInit,
    JoinCredentials,
    JoinControlPlane,
    JoinWorkers,
    Calico,
    WaitReady,
    Kubeconfig,
    Verify,
}

impl PhaseId {
    /// Every phase, in the order they run.
    pub const ALL: [PhaseId; 15] = [
        Self::DetectOs,
        Self::Preflight,
        Self::PackageRepo,
        Self::ResolveVersion,
        Self::KubernetesPackages,
        Self::Containerd,
        Self::Vip,
        Self::KubeadmInit,
        Self::JoinCredentials,
        Self::JoinControlPlane,
        Self::JoinWorkers,
        Self::Calico,
        Self::WaitReady,
        Self::Kubeconfig,
        Self::Verify,
    ];

    /// The phase named `name` (`kubeadm-init`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DetectOs => "detect-os",
            Self::Preflight => "preflight",
            Self::PackageRepo => "package-repo",
            Self::ResolveVersion => "resolve-version",
            Self::KubernetesPackages => "kubernetes-packages",
            Self::Containerd => "containerd",
            Self::Vip => "vip",
            Self::KubeadmInit => "kubeadm-init",
            Self::JoinCredentials => "join-credentials",
            Self::JoinControlPlane => "join-control-plane",
            Self::JoinWorkers => "join-workers",
            Self::Calico => "calico",
            Self::WaitReady => "wait-ready",
            Self::Kubeconfig => "kubeconfig",
            Self::Verify => "verify",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Every node at once (bounded by the runner's parallelism).
    Parallel,
    /// One node after the other, in order (control-plane joins: etcd admits one learner at a time).
    Serial,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub id: PhaseId,
    pub about: String,
    pub schedule: Schedule,
    pub nodes: Vec<NodePhase>,
    /// Captured values whose words must differ between nodes (product_uuid, MACs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unique: Vec<String>,
}

impl Phase {
    pub fn node(&self, name: &str) -> Option<&NodePhase> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

/// One node's part of a phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePhase {
    pub node: String,
    /// "Already done?": when it holds, the runner skips `ops` on this node.
    pub probe: Option<Probe>,
    pub ops: Vec<Op>,
}

/// A cheap check that the phase's effect is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Every file op of the phase (that applies) already has exactly its content on the node.
    pub files_match: bool,
    /// …and this command exits 0.
    pub command: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    File(FileOp),
    Run(CommandOp),
}

impl Op {
    pub fn when(&self) -> Option<&When> {
        match self {
            Op::File(f) => f.when.as_ref(),
            Op::Run(c) => c.when.as_ref(),
        }
    }
}

/// Only when a captured value is one of `is` (e.g. `pkg` is `dnf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct When {
    pub value: String,
    pub is: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOp {
    pub path: String,
    pub content: FileContent,
    /// Permission bits; written as an octal string (`"0644"`) in the plan.
    #[serde(with = "octal_mode")]
    pub mode: u32,
    /// `user:group`.
    pub owner: String,
    pub when: Option<When>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FileContent {
    /// Literal text (may hold `${klab:…}` markers).
    Text { text: String },
    /// Rendered from a template by `render::resolve_provision` (then it is `Text`).
    Template { template: String },
    /// The whole content is a run-time value (the CA, the Calico manifest).
    Value { value: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOp {
    /// Short label for progress lines and errors.
    pub name: String,
    /// A POSIX shell script (run by `sh -c` as root).
    pub run: String,
    pub timeout_secs: u64,
    /// Exit codes that count as success.
    pub ok_exit: Vec<u32>,
    /// Exit codes that count as success with a warning (the `hint` says why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warn_exit: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub captures: Vec<Capture>,
    pub when: Option<When>,
    /// What to do when it fails (or warns).
    pub hint: Option<String>,
    /// Read-only: a probe may run it to learn the values it captures (which config variant).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub query: bool,
}

/// A value taken from a command's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    pub value: String,
    /// `Some(p)`: the rest of the first stdout line starting with `p`; `None`: all of stdout.
    pub line_prefix: Option<String>,
    pub secret: bool,
    /// The value holds for the whole cluster (the resolved patch), not just this node.
    #[serde(default)]
    pub cluster: bool,
}

impl Capture {
    /// Apply to a command's stdout; `None` when the line is missing or the value empty.
    pub fn extract(&self, stdout: &str) -> Option<String> {
        let v = match &self.line_prefix {
            Some(p) => stdout
                .lines()
                .find_map(|l| l.strip_prefix(p.as_str()))?
                .trim()
                .to_string(),
            None => stdout.to_string(),
        };
        (!v.trim().is_empty()).then_some(v)
    }
}

/// File modes as `"0644"` in JSON: the form people read and `chmod` takes.
mod octal_mode {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(&text, 8)
            .map_err(|_| D::Error::custom(format!("file mode `{text}` is not octal")))
    }
}

/// Timeouts the phases use, from the lab's `[timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTimeouts {
    /// Installs, `kubeadm init`/`join`.
    pub command: Duration,
    /// Until every node is Ready.
    pub nodes_ready: Duration,
}

/// Seconds a quick check may take.
const QUICK: u64 = 60;

/// Quotes one word for a POSIX shell (single quotes; embedded `'` becomes `'\''`).
pub fn sh_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn when(value: &str, is: &str) -> Option<When> {
    Some(When {
        value: value.to_string(),
        is: vec![is.to_string()],
    })
}

fn file(path: &str, content: FileContent, mode: u32) -> FileOp {
    FileOp {
        path: path.to_string(),
        content,
        mode,
        owner: "root:root".to_string(),
        when: None,
    }
}

fn text(t: &str) -> FileContent {
    FileContent::Text {
        text: t.to_string(),
    }
}

fn tpl(name: &str) -> FileContent {
    FileContent::Template {
        template: name.to_string(),
    }
}

fn cmd(name: &str, run: &str, timeout_secs: u64) -> CommandOp {
    CommandOp {
        name: name.to_string(),
        run: run.trim().to_string(),
        timeout_secs,
        ok_exit: vec![0],
        warn_exit: Vec::new(),
        captures: Vec::new(),
        when: None,
        hint: None,
        query: false,
    }
}

impl CommandOp {
    fn hint(mut self, h: &str) -> Self {
        self.hint = Some(h.to_string());
        self
    }
    fn when(mut self, w: Option<When>) -> Self {
        self.when = w;
        self
    }
    fn capture(mut self, value: &str, prefix: Option<&str>, secret: bool) -> Self {
        self.captures.push(Capture {
            value: value.to_string(),
            line_prefix: prefix.map(str::to_string),
            secret,
            cluster: false,
        });
        self
    }
    fn query(mut self) -> Self {
        self.query = true;
        self
    }
    /// Like `capture`, for a value that holds for the whole cluster.
    fn capture_cluster(mut self, value: &str, prefix: Option<&str>, secret: bool) -> Self {
        self.captures.push(Capture {
            value: value.to_string(),
            line_prefix: prefix.map(str::to_string),
            secret,
            cluster: true,
        });
        self
    }
}

impl FileOp {
    fn when(mut self, w: Option<When>) -> Self {
        self.when = w;
        self
    }
}

fn run(c: CommandOp) -> Op {
    Op::Run(c)
}

fn put(f: FileOp) -> Op {
    Op::File(f)
}

fn probe(files_match: bool, command: Option<&str>) -> Option<Probe> {
    Some(Probe {
        files_match,
        command: command.map(|c| c.trim().to_string()),
    })
}

/// Everything the phases are computed from (a view of the plan).
struct Ctx<'a> {
    /// The lab's name, for the `klab provision LAB …` commands hints give.
    lab: &'a str,
    k: &'a KubernetesSpec,
    nodes: Vec<&'a NodeSpec>,
    t: PhaseTimeouts,
    /// `1.36.4` when pinned, else the `${klab:kubernetes-version}` marker.
    version: String,
}

impl Ctx<'_> {
    fn all(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
    fn kubectl(&self) -> String {
        format!("kubectl --kubeconfig {ADMIN_CONF}")
    }
}

/// The phases for a Kubernetes lab. `nodes` are the plan's nodes (roles decide who does what).
pub fn provision_plan(
    lab: &str,
    k: &KubernetesSpec,
    nodes: &[NodeSpec],
    t: PhaseTimeouts,
) -> ProvisionPlan {
    let members: Vec<&NodeSpec> = k
        .control_planes
        .iter()
        .chain(k.workers.iter())
        .filter_map(|name| nodes.iter().find(|n| &n.name == name))
        .collect();
    let version = k
        .patch_version
        .clone()
        .unwrap_or_else(|| marker(value::KUBERNETES_VERSION));
    let c = Ctx {
        lab,
        k,
        nodes: members,
        t,
        version,
    };
    let mut phases = vec![detect_os(&c), preflight(&c), package_repo(&c)];
    if k.patch_version.is_none() {
        phases.push(resolve_version(&c));
    }
    phases.push(kubernetes_packages(&c));
    phases.push(containerd(&c));
    if k.control_plane_vip.is_some() {
        phases.push(vip(&c));
    }
    phases.push(kubeadm_init(&c));
    phases.push(join_credentials(&c));
    phases.push(join_control_plane(&c));
    phases.push(join_workers(&c));
    phases.push(calico(&c));
    phases.push(wait_ready(&c));
    phases.push(kubeconfig(&c));
    phases.push(verify(&c));
    // A lab without workers (or with one control plane) has phases with no nodes: leave them out.
    phases.retain(|p| !p.nodes.is_empty() && !k.init_node.is_empty());

    let input = |name: &str, secret: bool, about: &str| InputSpec {
        name: name.to_string(),
        secret,
        about: about.to_string(),
    };
    let mut inputs = vec![
        input(
            value::CA_CERT,
            false,
            "cluster CA certificate (ECDSA P-256, PEM)",
        ),
        input(value::CA_KEY, true, "cluster CA private key (PEM)"),
        input(
            value::CA_CERT_HASH,
            false,
            "sha256 of the CA's SubjectPublicKeyInfo, for joins",
        ),
        input(
            value::BOOTSTRAP_TOKEN,
            true,
            "kubeadm bootstrap token for joins",
        ),
        input(
            value::CERTIFICATE_KEY,
            true,
            "key for the control-plane certificates kubeadm uploads",
        ),
        input(
            value::CALICO_MANIFEST,
            false,
            "calico.yaml, checked against its pinned sha256 (or the lab's calico-manifest)",
        ),
    ];
    if k.control_plane_vip.is_some() {
        inputs.push(input(
            value::VRRP_PASSWORD,
            true,
            "keepalived's VRRP password between the control planes",
        ));
    }
    if k.patch_version.is_none() {
        inputs.push(input(
            value::KUBERNETES_VERSION,
            false,
            "exact patch, once resolved (resolve-version captures it on the first run)",
        ));
    }
    ProvisionPlan { inputs, phases }
}

fn phase(id: PhaseId, about: &str, schedule: Schedule, nodes: Vec<NodePhase>) -> Phase {
    Phase {
        id,
        about: about.to_string(),
        schedule,
        nodes,
        unique: Vec::new(),
    }
}

fn each(names: &[String], f: impl Fn(&str) -> NodePhase) -> Vec<NodePhase> {
    names.iter().map(|n| f(n)).collect()
}

const DETECT_OS: &str = r#"
. /etc/os-release
case "$ID:$VERSION_ID" in
  debian:12|debian:13|ubuntu:24.04) pkg=apt ;;
  almalinux:9|almalinux:9.*|rocky:9|rocky:9.*|rhel:9|rhel:9.*) pkg=dnf ;;
  *) echo "unsupported OS: ${PRETTY_NAME:-$ID $VERSION_ID}" >&2; exit 3 ;;
esac
echo "os=$ID-$VERSION_ID"
echo "pkg=$pkg"
echo "product-uuid=$(cat /sys/class/dmi/id/product_uuid)"
# Physical NICs only: Calico's cali* veths carry ee:ee:ee:ee:ee:ee on every node.
macs=$(for d in /sys/class/net/*; do [ -e "$d/device" ] && cat "$d/address"; done | LC_ALL=C sort | tr '\n' ' ')
echo "macs=$macs"
"#;

fn detect_os(c: &Ctx<'_>) -> Phase {
    let op = cmd("read /etc/os-release and the node's identity", DETECT_OS, QUICK)
        .hint("klab provisions Debian 12/13, Ubuntu 24.04 and AlmaLinux 9: use one of those images (nothing was changed on the node)")
        .capture(value::OS, Some("os="), false)
        .capture(value::PKG, Some("pkg="), false)
        .capture(value::PRODUCT_UUID, Some("product-uuid="), false)
        .capture(value::MACS, Some("macs="), false);
    let mut p = phase(
        PhaseId::DetectOs,
        "detect the OS family (apt or dnf) and the node's identity, before changing anything",
        Schedule::Parallel,
        each(&c.all(), |n| NodePhase {
            node: n.to_string(),
            probe: None,
            ops: vec![run(op.clone())],
        }),
    );
    p.unique = vec![value::PRODUCT_UUID.to_string(), value::MACS.to_string()];
    p
}

const MODULES: &str = "overlay\nbr_netfilter\n";
const SYSCTLS: &str = "net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\n";
pub const MODULES_FILE: &str = "/etc/modules-load.d/klab-kubernetes.conf";
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-klab-kubernetes.conf";

const SWAP_OFF: &str = r#"
swapoff -a
# fstab: swap lines are commented out (marked, so they can be restored by hand)
sed -i -E '/^[^#].*[[:space:]]swap[[:space:]]/s/^/#klab# /' /etc/fstab
# swap units systemd made from fstab or the image, and zram
for u in $(systemctl list-units --type=swap --all --plain --no-legend | awk '{print $1}'); do
  systemctl mask "$u"
done
if [ -e /usr/lib/systemd/zram-generator.conf ] || [ -e /etc/systemd/zram-generator.conf ]; then
  : > /etc/systemd/zram-generator.conf
  systemctl mask --now systemd-zram-setup@zram0.service
fi
test -z "$(swapon --noheadings --show)"
"#;

const PREFLIGHT_PROBE: &str = r#"
test -z "$(swapon --noheadings --show)" &&
test -d /sys/module/overlay && test -d /sys/module/br_netfilter &&
test "$(sysctl -n net.ipv4.ip_forward)" = 1 &&
test "$(sysctl -n net.bridge.bridge-nf-call-iptables)" = 1 &&
test "$(sysctl -n net.bridge.bridge-nf-call-ip6tables)" = 1 &&
test "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs &&
{ test "${klab:pkg}" != dnf || { test "$(getenforce 2>/dev/null)" != Enforcing && ! systemctl -q is-active firewalld; }; }
"#;

fn preflight(c: &Ctx<'_>) -> Phase {
    let ops = vec![
        put(file(MODULES_FILE, text(MODULES), 0o644)),
        put(file(SYSCTL_FILE, text(SYSCTLS), 0o644)),
        // br_netfilter must be loaded before the bridge sysctls exist.
        run(cmd("load overlay and br_netfilter", "modprobe -a overlay br_netfilter", QUICK)),
        run(cmd("apply sysctls", "sysctl --system >/dev/null", QUICK)),
        run(cmd("swap off now and for good", SWAP_OFF, QUICK)
            .hint("the kubelet refuses to run with swap: look at `swapon --show` and /etc/fstab on the node")),
        run(cmd("cgroup v2", "test \"$(stat -fc %T /sys/fs/cgroup)\" = cgroup2fs", QUICK)
            .hint("kubeadm 1.35 and newer refuse cgroup v1: use an image that boots with the unified hierarchy (systemd.unified_cgroup_hierarchy=1)")),
        run(CommandOp {
            warn_exit: vec![1],
            ..cmd("clock synchronized", "timedatectl show -p NTPSynchronized --value | grep -qx yes", QUICK)
                .hint("the node's clock is not NTP-synchronized; certificates are checked against it, so give it a reachable time server (systemd-timesyncd or chrony)")
        }),
        run(cmd(
            "SELinux permissive, now and after reboot",
            "if [ -f /etc/selinux/config ]; then\n  setenforce 0 2>/dev/null || true\n  sed -i -E 's/^SELINUX=enforcing$/SELINUX=permissive/' /etc/selinux/config\nfi",
            QUICK,
        )
        .when(when(value::PKG, "dnf"))),
        run(cmd(
            "firewalld off",
            "if systemctl list-unit-files firewalld.service | grep -q firewalld; then\n  systemctl disable --now firewalld\nfi",
            QUICK,
        )
        .when(when(value::PKG, "dnf"))),
    ];
    phase(
        PhaseId::Preflight,
        "swap off, overlay and br_netfilter, sysctls, cgroup v2, clock; SELinux and firewalld on RHEL",
        Schedule::Parallel,
        each(&c.all(), |n| NodePhase {
            node: n.to_string(),
            probe: probe(true, Some(PREFLIGHT_PROBE)),
            ops: ops.clone(),
        }),
    )
}

pub const APT_SOURCE: &str = "/etc/apt/sources.list.d/klab-kubernetes.sources";
pub const APT_KEYRING: &str = "/etc/apt/keyrings/klab-kubernetes.asc";
pub const DNF_REPO: &str = "/etc/yum.repos.d/klab-kubernetes.repo";

/// (deb repository, rpm repository, deb key, rpm key) for the lab's minor.
fn repos(k: &KubernetesSpec) -> (String, String, String, String) {
    let base = k.package_repo.trim_end_matches('/');
    let deb = format!("{base}/{}/deb/", k.minor);
    let rpm = format!("{base}/{}/rpm/", k.minor);
    let deb_key = k
        .package_key
        .clone()
        .unwrap_or_else(|| format!("{deb}Release.key"));
    let rpm_key = k
        .package_key
        .clone()
        .unwrap_or_else(|| format!("{rpm}repodata/repomd.xml.key"));
    (deb, rpm, deb_key, rpm_key)
}

fn package_repo(c: &Ctx<'_>) -> Phase {
    let (deb, rpm, deb_key, rpm_key) = repos(c.k);
    let sources = format!(
        "# klab: Kubernetes {} packages\nTypes: deb\nURIs: {deb}\nSuites: /\nSigned-By: {APT_KEYRING}\n",
        c.k.minor
    );
    let dnf = format!(
        "# klab: Kubernetes {minor} packages; excluded from updates so the cluster stays on one patch\n\
         [kubernetes]\nname=Kubernetes {minor}\nbaseurl={rpm}\nenabled=1\ngpgcheck=1\ngpgkey={rpm_key}\n\
         exclude=kubelet kubeadm kubectl cri-tools kubernetes-cni\n",
        minor = c.k.minor
    );
    let fetch_key = format!(
        "command -v curl >/dev/null || {{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y curl ca-certificates; }}\n\
         install -d -m 0755 /etc/apt/keyrings\n\
         curl -fsSL --retry 3 {} -o {APT_KEYRING}.new\n\
         grep -q 'BEGIN PGP PUBLIC KEY BLOCK' {APT_KEYRING}.new\n\
         chmod 0644 {APT_KEYRING}.new && mv {APT_KEYRING}.new {APT_KEYRING}",
        sh_quote(&deb_key)
    );
    // `apt-get update` exits 0 when a source is unreachable or its signature does not verify (it
    // warns and keeps the old lists), so klab's source is read a second time, alone and strictly.
    // The first, tolerant pass refreshes the distribution's lists for the packages' dependencies.
    let apt_update = format!(
        "apt-get update\n\
         apt-get update --error-on=any -o Dir::Etc::SourceList={APT_SOURCE} -o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0"
    );
    let long = c.t.command.as_secs();
    let ops = vec![
        run(cmd("fetch the repository key", &fetch_key, long)
            .when(when(value::PKG, "apt"))
            .hint("the node must reach the package repository (set [kubernetes] package-repo and package-key to a mirror for airgapped labs)")),
        put(file(APT_SOURCE, text(&sources), 0o644).when(when(value::PKG, "apt"))),
        run(cmd("apt-get update", &apt_update, long)
            .when(when(value::PKG, "apt"))
            .hint("apt could not read the Kubernetes repository: check package-repo/package-key and the node's route to it")),
        put(file(DNF_REPO, text(&dnf), 0o644).when(when(value::PKG, "dnf"))),
        run(cmd("dnf makecache", "dnf -q makecache --repo kubernetes", long)
            .when(when(value::PKG, "dnf"))
            .hint("dnf could not read the Kubernetes repository: check package-repo/package-key and the node's route to it")),
    ];
    phase(
        PhaseId::PackageRepo,
        "pkgs.k8s.io (or the lab's mirror) for this minor: apt keyring + source, or a dnf repo with exclude",
        Schedule::Parallel,
        each(&c.all(), |n| NodePhase {
            node: n.to_string(),
            probe: probe(
                true,
                Some(&format!(
                    "test \"${{klab:pkg}}\" = dnf || test -s {APT_KEYRING}"
                )),
            ),
            ops: ops.clone(),
        }),
    )
}

const RESOLVE_APT: &str = r#"
v=$(apt-cache madison kubeadm | awk '{print $3}' | sed 's/-.*//' | sort -V | tail -n 1)
# A built cluster keeps its patch: nodes added later install what the first control plane runs.
if [ -f /etc/kubernetes/admin.conf ] && command -v kubeadm >/dev/null; then v=$(kubeadm version -o short); v=${v#v}; fi
test -n "$v" || { echo "the repository has no kubeadm package" >&2; exit 1; }
echo "kubernetes-version=$v"
"#;
const RESOLVE_DNF: &str = r#"
v=$(dnf -q list --showduplicates --disableexcludes=kubernetes kubeadm | awk '$1 ~ /^kubeadm/ {print $2}' | sed 's/-.*//' | sort -V | tail -n 1)
if [ -f /etc/kubernetes/admin.conf ] && command -v kubeadm >/dev/null; then v=$(kubeadm version -o short); v=${v#v}; fi
test -n "$v" || { echo "the repository has no kubeadm package" >&2; exit 1; }
echo "kubernetes-version=$v"
"#;

fn resolve_version(c: &Ctx<'_>) -> Phase {
    let hint = "pin the patch in the lab file (e.g. version = \"1.36.4\") or check the repository";
    let ops = vec![
        run(cmd("newest patch of the minor (apt)", RESOLVE_APT, QUICK)
            .when(when(value::PKG, "apt"))
            .capture_cluster(
                value::KUBERNETES_VERSION,
                Some("kubernetes-version="),
                false,
            )
            .hint(hint)),
        run(cmd("newest patch of the minor (dnf)", RESOLVE_DNF, QUICK)
            .when(when(value::PKG, "dnf"))
            .capture_cluster(
                value::KUBERNETES_VERSION,
                Some("kubernetes-version="),
                false,
            )
            .hint(hint)),
    ];
    phase(
        PhaseId::ResolveVersion,
        "resolve the newest patch once, on the first control plane (a built cluster keeps the one it runs); every node installs that one",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: None,
            ops,
        }],
    )
}

fn kubernetes_packages(c: &Ctx<'_>) -> Phase {
    let v = &c.version;
    let long = c.t.command.as_secs();
    let apt = format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y --allow-downgrades --allow-change-held-packages \
         'kubelet={v}-*' 'kubeadm={v}-*' 'kubectl={v}-*'\napt-mark hold kubelet kubeadm kubectl >/dev/null"
    );
    let dnf =
        format!("dnf install -y --disableexcludes=kubernetes kubelet-{v} kubeadm-{v} kubectl-{v}");
    let check = format!(
        "test \"$(kubeadm version -o short)\" = v{v} && kubelet --version | grep -qx 'Kubernetes v{v}' && kubectl version --client | grep -q 'v{v}$'"
    );
    let ops = vec![
        run(cmd(&format!("install kubelet, kubeadm, kubectl {v} and hold them"), &apt, long)
            .when(when(value::PKG, "apt"))
            .hint("the repository may not have this patch: `apt-cache madison kubeadm` on the node lists what it has")),
        run(cmd(&format!("install kubelet, kubeadm, kubectl {v}"), &dnf, long)
            .when(when(value::PKG, "dnf"))
            .hint("the repository may not have this patch: `dnf list --showduplicates --disableexcludes=kubernetes kubeadm` on the node lists what it has")),
        run(cmd("enable the kubelet", "systemctl enable kubelet", QUICK)),
        run(cmd("verify the installed versions", &check, QUICK)
            .hint("another version is installed; remove it or pin the lab to that patch")),
    ];
    let held = "{ test \"${klab:pkg}\" = dnf || apt-mark showhold | grep -qx kubeadm; }";
    phase(
        PhaseId::KubernetesPackages,
        "kubelet, kubeadm and kubectl at one exact patch for the whole cluster, held",
        Schedule::Parallel,
        each(&c.all(), |n| NodePhase {
            node: n.to_string(),
            probe: probe(false, Some(&format!("{check} && {held}"))),
            ops: ops.clone(),
        }),
    )
}

pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const CRICTL_CONFIG: &str = "/etc/crictl.yaml";
pub const DOCKER_REPO: &str = "/etc/yum.repos.d/docker-ce.repo";
const DOCKER_REPO_TEXT: &str = "# klab: containerd.io for RHEL-family nodes (the distribution has none)\n\
[docker-ce-stable]\nname=Docker CE Stable - $basearch\nbaseurl=https://download.docker.com/linux/rhel/$releasever/$basearch/stable\n\
enabled=1\ngpgcheck=1\ngpgkey=https://download.docker.com/linux/rhel/gpg\n";

const CONTAINERD_MAJOR: &str = r#"
v=$(containerd --version | awk '{print $3}')
v=${v#v}
m=${v%%.*}
case "$m" in
  1|2) echo "containerd-major=$m" ;;
  *) echo "containerd $v is neither 1.x nor 2.x" >&2; exit 1 ;;
esac
"#;

const WAIT_CRI: &str = r#"
for i in $(seq 1 30); do
  crictl info >/dev/null 2>&1 && exit 0
  sleep 1
done
crictl info >/dev/null
"#;

fn containerd(c: &Ctx<'_>) -> Phase {
    let long = c.t.command.as_secs();
    let repo_flag =
        c.k.image_repository
            .as_ref()
            .map(|r| format!(" --image-repository {}", sh_quote(r)))
            .unwrap_or_default();
    let sandbox = format!(
        "img=$(kubeadm config images list --kubernetes-version v{}{repo_flag} 2>/dev/null | grep '/pause:' | head -n 1)\n\
         test -n \"$img\" || {{ echo \"kubeadm names no pause image\" >&2; exit 1; }}\necho \"sandbox-image=$img\"",
        c.version
    );
    let ops = vec![
        run(cmd(
            "install containerd (distribution package)",
            "command -v containerd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y containerd",
            long,
        )
        .when(when(value::PKG, "apt"))),
        put(file(DOCKER_REPO, text(DOCKER_REPO_TEXT), 0o644).when(when(value::PKG, "dnf"))),
        run(cmd(
            "install containerd.io (Docker's repository)",
            "command -v containerd >/dev/null || dnf install -y containerd.io",
            long,
        )
        .when(when(value::PKG, "dnf"))),
        run(cmd("containerd major version", CONTAINERD_MAJOR, QUICK)
            .capture(value::CONTAINERD_MAJOR, Some("containerd-major="), false)
            .query()),
        run(cmd("sandbox image kubeadm expects", &sandbox, QUICK)
            .capture(value::SANDBOX_IMAGE, Some("sandbox-image="), false)
            .query()),
        // A whole minimal file per major version: `config default` + sed silently misses keys.
        put(file(CONTAINERD_CONFIG, tpl(template::CONTAINERD_1), 0o644)
            .when(when(value::CONTAINERD_MAJOR, "1"))),
        put(file(CONTAINERD_CONFIG, tpl(template::CONTAINERD_2), 0o644)
            .when(when(value::CONTAINERD_MAJOR, "2"))),
        put(file(CRICTL_CONFIG, tpl(template::CRICTL), 0o644)),
        run(cmd(
            "restart containerd",
            "systemctl enable containerd >/dev/null 2>&1; systemctl restart containerd",
            QUICK,
        )
        .hint("containerd did not restart with klab's config: `journalctl -u containerd` on the node")),
        run(cmd("crictl info", WAIT_CRI, QUICK)
            .hint("the CRI socket does not answer: `journalctl -u containerd` on the node")),
        run(cmd(
            "systemd cgroup driver in effect",
            "containerd config dump | grep -q 'SystemdCgroup = true'",
            QUICK,
        )
        .hint("containerd does not use the systemd cgroup driver: compare /etc/containerd/config.toml with `containerd config dump`")),
    ];
    phase(
        PhaseId::Containerd,
        "containerd with the systemd cgroup driver, the sandbox image and CNI in /opt/cni/bin; crictl",
        Schedule::Parallel,
        each(&c.all(), |n| NodePhase {
            node: n.to_string(),
            probe: probe(
                true,
                Some(
                    "crictl info >/dev/null 2>&1 && containerd config dump | grep -q 'SystemdCgroup = true'",
                ),
            ),
            ops: ops.clone(),
        }),
    )
}

pub const KEEPALIVED_CONF: &str = "/etc/keepalived/keepalived.conf";
pub const CHECK_APISERVER: &str = "/etc/keepalived/check-apiserver.sh";

/// VRRP router id for the lab: stable, 1–255.
pub fn vrrp_router_id(lab: &str) -> u8 {
    let h = names::sha256_hex(lab.as_bytes());
    let b = u8::from_str_radix(&h[..2], 16).unwrap_or(0);
    b.max(1)
}

fn vip(c: &Ctx<'_>) -> Phase {
    let long = c.t.command.as_secs();
    let ops = vec![
        run(cmd(
            "install keepalived",
            "command -v keepalived >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y keepalived curl",
            long,
        )
        .when(when(value::PKG, "apt"))),
        run(cmd(
            "install keepalived",
            "command -v keepalived >/dev/null || dnf install -y keepalived curl",
            long,
        )
        .when(when(value::PKG, "dnf"))),
        put(file(CHECK_APISERVER, tpl(template::CHECK_APISERVER), 0o755)),
        // 0600: it holds the VRRP password.
        put(file(KEEPALIVED_CONF, tpl(template::KEEPALIVED), 0o600)),
        // A reload keeps the VIP where it is when only the peers changed (a control plane added).
        run(cmd(
            "start keepalived (reload when it runs)",
            "systemctl enable keepalived >/dev/null 2>&1; systemctl reload-or-restart keepalived
             for i in $(seq 1 20); do systemctl -q is-active keepalived && exit 0; sleep 1; done
             echo 'keepalived is not running' >&2; exit 1",
            QUICK,
        )
        .hint("`journalctl -u keepalived` on the node")),
    ];
    phase(
        PhaseId::Vip,
        "keepalived holds the API VIP on the cluster network (highest priority: the first control plane)",
        Schedule::Parallel,
        each(&c.k.control_planes, |n| NodePhase {
            node: n.to_string(),
            probe: probe(true, Some("systemctl -q is-active keepalived")),
            ops: ops.clone(),
        }),
    )
}

pub const INIT_CONFIG: &str = "/etc/klab/kubeadm/init.yaml";
pub const JOIN_CONFIG: &str = "/etc/klab/kubeadm/join.yaml";

fn kubeadm_init(c: &Ctx<'_>) -> Phase {
    let long = c.t.command.as_secs();
    let ops = vec![
        // klab's own CA: the discovery hash is known before the cluster exists.
        put(file("/etc/kubernetes/pki/ca.crt", FileContent::Value { value: value::CA_CERT.into() }, 0o644)),
        put(file("/etc/kubernetes/pki/ca.key", FileContent::Value { value: value::CA_KEY.into() }, 0o600)),
        put(file(INIT_CONFIG, tpl(template::KUBEADM_INIT), 0o600)),
        run(cmd("kubeadm init", &format!("kubeadm init --config {INIT_CONFIG} --upload-certs"), long)
            .hint("read the output above and `journalctl -u kubelet` on the node; `kubeadm reset -f` there before `klab up` tries again")),
    ];
    phase(
        PhaseId::KubeadmInit,
        "kubeadm init on the first control plane, with klab's CA and --upload-certs",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: probe(
                false,
                Some(&format!(
                    "test -f {ADMIN_CONF} && test -f /etc/kubernetes/manifests/kube-apiserver.yaml"
                )),
            ),
            ops,
        }],
    )
}

fn join_credentials(c: &Ctx<'_>) -> Phase {
    let token = marker(value::BOOTSTRAP_TOKEN);
    let mut ops = vec![run(cmd(
        "bootstrap token valid",
        &format!(
            "t={token}\nkubeadm token list -o jsonpath='{{.token}}{{\"\\n\"}}' | grep -qx \"$t\" || kubeadm token create \"$t\" --ttl 24h >/dev/null"
        ),
        QUICK,
    )
    .hint("the bootstrap token could not be (re)created: `kubeadm token list` on the first control plane"))];
    if c.k.control_planes.len() > 1 {
        // The uploaded certificates live 2 h: refresh them right before control planes join.
        ops.push(run(cmd(
            "re-upload the control-plane certificates",
            &format!(
                "kubeadm init phase upload-certs --upload-certs --config {INIT_CONFIG} >/dev/null"
            ),
            QUICK,
        )));
    }
    phase(
        PhaseId::JoinCredentials,
        "refresh the bootstrap token and the uploaded certificates before nodes join",
        Schedule::Serial,
        if c.k.control_planes.len() > 1 || !c.k.workers.is_empty() {
            vec![NodePhase {
                node: c.k.init_node.clone(),
                probe: None,
                ops,
            }]
        } else {
            Vec::new()
        },
    )
}

/// `klab ssh NODE -- sudo kubeadm reset -f`, then the phase again for that node alone.
fn rejoin_hint(lab: &str, node: &str, phase: PhaseId) -> String {
    format!(
        "run `kubeadm reset -f` on {node} (`klab ssh {node} -- sudo kubeadm reset -f`), then `klab provision {lab} --from {} --node {node}`",
        phase.as_str()
    )
}

/// `check` up to `tries` times, 2 s apart: a probe that waits out a server restarting.
fn retried(check: &str, tries: u32) -> String {
    format!("for i in $(seq 1 {tries}); do\n  {check} && exit 0\n  sleep 2\ndone\nexit 1")
}

/// A node with kubeadm's files whose probe did not hold was joined half-way: say so and how to
/// fix it, instead of a `kubeadm join` that fails on the leftovers.
fn not_half_joined(lab: &str, node: &str, files: &[&str], why: &str, phase: PhaseId) -> Op {
    let test = files
        .iter()
        .map(|f| format!("[ -e {f} ]"))
        .collect::<Vec<_>>()
        .join(" || ");
    run(cmd(
        "no earlier join left half-done",
        &format!(
            "if {test}; then\n  echo {} >&2\n  exit 1\nfi",
            sh_quote(&format!(
                "{node} was joined before but {why}: an earlier join did not finish"
            ))
        ),
        QUICK,
    )
    .hint(&rejoin_hint(lab, node, phase)))
}

const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
const APISERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";

fn join_control_plane(c: &Ctx<'_>) -> Phase {
    let long = c.t.command.as_secs();
    let others: Vec<String> =
        c.k.control_planes
            .iter()
            .filter(|n| **n != c.k.init_node)
            .cloned()
            .collect();
    let nodes = others
        .iter()
        .map(|name| {
            let ip = c
                .nodes
                .iter()
                .find(|n| &n.name == name)
                .map(|n| n.cluster_ip.to_string())
                .unwrap_or_default();
            // What the join waits on: this node's API server ready with its etcd member healthy.
            let etcd_ok = format!(
                "{kc} --server https://{ip}:{port} --request-timeout=5s get --raw='/readyz?verbose' 2>/dev/null | grep -q '^\\[+\\]etcd ok'",
                kc = c.kubectl(),
                port = super::API_PORT
            );
            let healthy = format!(
                "for i in $(seq 1 150); do\n  \
                 {etcd_ok} && exit 0\n  \
                 sleep 2\ndone\necho \"the API server on {ip} is not ready (etcd member not healthy)\" >&2\nexit 1"
            );
            // Joined means kubeadm's files *and* the health the join waits on: a join that died
            // at its etcd step leaves the files behind.
            let joined = format!(
                "test -f {KUBELET_CONF} && test -f {APISERVER_MANIFEST} || exit 1\n{}",
                retried(&etcd_ok, 6)
            );
            NodePhase {
                node: name.clone(),
                probe: probe(false, Some(&joined)),
                ops: vec![
                    not_half_joined(
                        c.lab,
                        name,
                        &[KUBELET_CONF, APISERVER_MANIFEST],
                        &format!("its API server on {ip} is not ready with a healthy etcd member"),
                        PhaseId::JoinControlPlane,
                    ),
                    put(file(JOIN_CONFIG, tpl(template::KUBEADM_JOIN), 0o600)),
                    run(cmd("kubeadm join (control plane)", &format!("kubeadm join --config {JOIN_CONFIG}"), long)
                        .hint(&format!("{}; etcd admits one new member at a time", rejoin_hint(c.lab, name, PhaseId::JoinControlPlane)))),
                    run(cmd("its API server and etcd member are healthy", &healthy, 330)
                        .hint(&format!("`crictl ps -a` and `crictl logs` of etcd and kube-apiserver on {name}; if it stays unhealthy, {}", rejoin_hint(c.lab, name, PhaseId::JoinControlPlane)))),
                ],
            }
        })
        .collect();
    phase(
        PhaseId::JoinControlPlane,
        "join the other control planes strictly one at a time, each healthy before the next",
        Schedule::Serial,
        nodes,
    )
}

fn join_workers(c: &Ctx<'_>) -> Phase {
    let long = c.t.command.as_secs();
    phase(
        PhaseId::JoinWorkers,
        "join the workers (in parallel)",
        Schedule::Parallel,
        each(&c.k.workers, |n| {
            // Joined means a kubelet.conf *and* a Node the cluster lists (read with the kubelet's
            // own credentials: the node authorizer lets a node get its Node).
            let registered = format!(
                "kubectl --kubeconfig {KUBELET_CONF} --request-timeout=5s get node {} >/dev/null 2>&1",
                sh_quote(n)
            );
            NodePhase {
                node: n.to_string(),
                probe: probe(
                    false,
                    Some(&format!(
                        "test -f {KUBELET_CONF} || exit 1\n{}",
                        retried(&registered, 4)
                    )),
                ),
                ops: vec![
                    not_half_joined(
                        c.lab,
                        n,
                        &[KUBELET_CONF],
                        "the cluster has no Node of that name",
                        PhaseId::JoinWorkers,
                    ),
                    put(file(JOIN_CONFIG, tpl(template::KUBEADM_JOIN), 0o600)),
                    run(cmd(
                        "kubeadm join",
                        &format!("kubeadm join --config {JOIN_CONFIG}"),
                        long,
                    )
                    .hint(&rejoin_hint(c.lab, n, PhaseId::JoinWorkers))),
                ],
            }
        }),
    )
}

/// `IP_AUTODETECTION_METHOD` klab gives calico-node: right because the kubelet's node-ip is pinned.
pub const CALICO_AUTODETECT: &str = "kubernetes-internal-ip";

/// (`CALICO_IPV4POOL_IPIP`, `CALICO_IPV4POOL_VXLAN`) for an encapsulation.
pub fn calico_pool_modes(e: Encapsulation) -> (&'static str, &'static str) {
    match e {
        Encapsulation::Vxlan => ("Never", "Always"),
        Encapsulation::Ipip => ("Always", "Never"),
        Encapsulation::None => ("Never", "Never"),
    }
}

fn calico(c: &Ctx<'_>) -> Phase {
    let kc = c.kubectl();
    let apply = format!("{kc} apply --server-side --force-conflicts -k {CALICO_DIR} >/dev/null");
    let probe_cmd = format!(
        "{kc} -n kube-system get daemonset calico-node -o jsonpath='{{.spec.template.spec.containers[?(@.name==\"calico-node\")].env[?(@.name==\"IP_AUTODETECTION_METHOD\")].value}}' | grep -qx {CALICO_AUTODETECT}"
    );
    phase(
        PhaseId::Calico,
        "Calico from the pinned manifest: pool = pod-cidr, the lab's encapsulation, node address = InternalIP",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: probe(true, Some(&probe_cmd)),
            ops: vec![
                put(file(&format!("{CALICO_DIR}/calico.yaml"), FileContent::Value { value: value::CALICO_MANIFEST.into() }, 0o644)),
                put(file(&format!("{CALICO_DIR}/kustomization.yaml"), tpl(template::CALICO_KUSTOMIZATION), 0o644)),
                put(file(&format!("{CALICO_DIR}/calico-node-env.yaml"), tpl(template::CALICO_NODE_PATCH), 0o644)),
                run(cmd("kubectl apply -k (Calico, patched)", &apply, c.t.command.as_secs())
                    .hint("check the manifest (calico-manifest) and `kubectl -n kube-system get pods` on the first control plane")),
            ],
        }],
    )
}

fn wait_ready(c: &Ctx<'_>) -> Phase {
    let kc = c.kubectl();
    let secs = c.t.nodes_ready.as_secs().max(1);
    let n = c.nodes.len();
    let want: Vec<String> = c.nodes.iter().map(|x| sh_quote(&x.name)).collect();
    let registered = format!(
        "for i in $(seq 1 {tries}); do\n  \
         have=$({kc} get nodes -o jsonpath='{{range .items[*]}}{{.metadata.name}}{{\"\\n\"}}{{end}}' 2>/dev/null)\n  \
         missing=''\n  \
         for n in {want}; do printf '%s\\n' \"$have\" | grep -qx \"$n\" || missing=\"$missing $n\"; done\n  \
         test -z \"$missing\" && exit 0\n  \
         sleep 5\ndone\n\
         echo \"not registered as Nodes after {secs}s:$missing\" >&2\nexit 1",
        tries = secs.div_ceil(5),
        want = want.join(" ")
    );
    // `kubectl wait` names only the first node it gave up on: list every node that is not Ready.
    let ready = format!(
        "{kc} wait --for=condition=Ready node --all --timeout={secs}s >/dev/null && exit 0\n\
         echo \"not Ready after {secs}s:$({kc} get nodes -o jsonpath='{{range .items[*]}}{{.metadata.name}}={{.status.conditions[?(@.type==\"Ready\")].status}}{{\"\\n\"}}{{end}}' | awk -F= '$2 != \"True\" {{printf \" %s\", $1}}')\" >&2\nexit 1"
    );
    phase(
        PhaseId::WaitReady,
        "wait until every node is registered and Ready and CoreDNS is available ([timeouts] nodes-ready)",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: None,
            ops: vec![
                run(cmd(&format!("{n} nodes registered"), &registered, secs + 30)
                    .hint("the nodes named did not register: `journalctl -u kubelet` on each")),
                run(cmd("every node Ready", &ready, secs + 60)
                    .hint("`kubectl describe node NODE` for the nodes named shows why; usually the CNI (calico-node pods) is not up yet")),
                run(cmd("CoreDNS available", &format!("{kc} -n kube-system rollout status deployment/coredns --timeout={secs}s >/dev/null"), secs + 30)
                    .hint("`kubectl -n kube-system get pods -l k8s-app=kube-dns -o wide`")),
            ],
        }],
    )
}

fn kubeconfig(c: &Ctx<'_>) -> Phase {
    phase(
        PhaseId::Kubeconfig,
        "hand the admin kubeconfig over to the host (kept 0600 in the state directory)",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: None,
            ops: vec![run(cmd(
                "read admin.conf",
                &format!("cat {ADMIN_CONF}"),
                QUICK,
            )
            .capture_cluster(value::ADMIN_KUBECONFIG, None, true))],
        }],
    )
}

fn verify(c: &Ctx<'_>) -> Phase {
    let kc = c.kubectl();
    // C-locale order, as `LC_ALL=C sort` prints it.
    let mut by_name: BTreeMap<&str, &NodeSpec> = BTreeMap::new();
    for n in &c.nodes {
        by_name.insert(n.name.as_str(), n);
    }
    let prefix = c
        .nodes
        .first()
        .and_then(|n| n.nics.iter().find(|x| x.ip == n.cluster_ip))
        .map(|x| x.prefix)
        .unwrap_or(32);
    let ips: Vec<String> = by_name
        .values()
        .map(|n| format!("{}={}", n.name, n.cluster_ip))
        .collect();
    let calico: Vec<String> = by_name
        .values()
        .map(|n| format!("{}={}/{prefix}", n.name, n.cluster_ip))
        .collect();
    let compare = |what: &str, jsonpath: &str, want: &[String]| {
        format!(
            "got=$({kc} get nodes -o jsonpath='{jsonpath}' | LC_ALL=C sort)\n\
             want='{}'\n\
             test \"$got\" = \"$want\" && exit 0\n\
             printf '%s differ from the cluster network.\\nwant:\\n%s\\ngot:\\n%s\\n' '{what}' \"$want\" \"$got\" >&2\nexit 1",
            want.join("\n")
        )
    };
    let internal = compare(
        "node InternalIPs",
        "{range .items[*]}{.metadata.name}={.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
        &ips,
    );
    let detected = compare(
        "calico-node addresses",
        "{range .items[*]}{.metadata.name}={.metadata.annotations.projectcalico\\.org/IPv4Address}{\"\\n\"}{end}",
        &calico,
    );
    // A CoreDNS pod on another node answers its health port through Calico's overlay: the pod
    // network works across nodes (no image to pull, nothing to clean up).
    let pod_reach = format!(
        r#"me=$(hostname)
pods=$({kc} -n kube-system get pods -l k8s-app=kube-dns -o jsonpath='{{range .items[*]}}{{.spec.nodeName}} {{.status.podIP}}{{"\n"}}{{end}}')
target=$(printf '%s\n' "$pods" | awk -v me="$me" '$1 != me && $2 != "" {{print $2; exit}}')
if [ -z "$target" ]; then echo "no CoreDNS pod runs on another node than $me: pod reachability across nodes not checked" >&2; exit 2; fi
curl -fsS --max-time 10 "http://$target:8080/health" | grep -qx OK && exit 0
echo "the CoreDNS pod $target on another node does not answer through the pod network" >&2
exit 1"#
    );
    phase(
        PhaseId::Verify,
        "verify the pinning: every InternalIP and every calico-node address is the node's cluster address",
        Schedule::Serial,
        vec![NodePhase {
            node: c.k.init_node.clone(),
            probe: None,
            ops: vec![
                run(cmd("node InternalIPs on the cluster network", &internal, QUICK)
                    .hint("a kubelet ignored its node-ip: /var/lib/kubelet/kubeadm-flags.env on that node")),
                run(cmd("calico-node addresses on the cluster network", &detected, QUICK)
                    .hint("calico-node picked another address: IP_AUTODETECTION_METHOD of the calico-node DaemonSet")),
                run(CommandOp {
                    warn_exit: vec![2],
                    ..cmd("a pod on another node answers through the pod network", &pod_reach, QUICK)
                        .hint("Calico's routes or encapsulation between the nodes: `kubectl -n kube-system logs ds/calico-node`; the cluster network must pass VXLAN (UDP 4789) or IP-in-IP. Exit 2: no CoreDNS pod runs on another node, so nothing was checked")
                }),
            ],
        }],
    )
}

/// Lists the cluster's Node names, one a line: the check a rerun on a built cluster makes, so a
/// node that left the cluster is named instead of skipped.
pub const NODE_NAMES: &str = "kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes -o jsonpath='{range .items[*]}{.metadata.name}{\"\\n\"}{end}'";

/// What klab runs when a node leaves the cluster (it left the lab file, or `--recreate` rebuilds
/// it), in this order:
/// 1. `drain`, on the first control plane, while the node still runs (its kubelet confirms the
///    pods' end; drained after a reset, the pods would hang in Terminating);
/// 2. `reset`, on the node: `kubeadm reset -f` (a control plane's etcd member goes with it);
/// 3. `remove_member` (control planes only), on the first control plane: its etcd member, when
///    the reset did not take it along — a node that does not answer is not reset at all;
/// 4. `delete`, on the first control plane: its Node object, so a rebuilt node of the same name
///    can join again (the pod garbage collector removes pods still bound to it).
///
/// A node that does not answer over SSH gets only 3 and 4: a drain would wait for a kubelet that
/// is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveOps {
    pub drain: CommandOp,
    pub reset: CommandOp,
    pub remove_member: Option<CommandOp>,
    pub delete: CommandOp,
}

/// `etcdctl` inside the etcd static pod of `survivor` (a control plane that stays), with kubeadm's
/// certificates.
fn etcdctl(survivor: &str) -> String {
    format!(
        "kubectl --kubeconfig {ADMIN_CONF} -n kube-system exec {} -- etcdctl --endpoints=https://127.0.0.1:2379 \
         --cacert=/etc/kubernetes/pki/etcd/ca.crt --cert=/etc/kubernetes/pki/etcd/server.crt --key=/etc/kubernetes/pki/etcd/server.key",
        sh_quote(&format!("etcd-{survivor}"))
    )
}

/// The commands that take `node` out of the cluster; `survivor` is the first control plane (it
/// never leaves), where the cluster-side commands run.
pub fn leave_ops(node: &str, control_plane: bool, survivor: &str, timeout: Duration) -> LeaveOps {
    let kc = format!("kubectl --kubeconfig {ADMIN_CONF}");
    let n = sh_quote(node);
    let secs = timeout.as_secs().max(30);
    let drain = cmd(
        &format!("drain {node}"),
        &format!(
            "if {kc} get node {n} >/dev/null 2>&1; then\n  {kc} drain {n} --ignore-daemonsets --delete-emptydir-data --force --timeout={secs}s\nfi"
        ),
        secs + 30,
    )
    .hint(&format!(
        "`kubectl get pods -A -o wide --field-selector spec.nodeName={node}` on the first control plane shows what does not leave (a PodDisruptionBudget?); {node} is cordoned and otherwise untouched"
    ));
    let reset = cmd(
        &format!("kubeadm reset on {node}"),
        "if [ -f /etc/kubernetes/kubelet.conf ]; then kubeadm reset -f; fi",
        secs,
    )
    .hint(&format!(
        "run `kubeadm reset -f` on {node} by hand (`klab ssh {node} -- sudo kubeadm reset -f`)"
    ));
    let remove_member = control_plane.then(|| {
        let etcdctl = etcdctl(survivor);
        // `member list`: `ID, started, NAME, peer URLs, client URLs, is learner`.
        cmd(
            &format!("remove the etcd member of {node}"),
            &format!(
                "list=$({etcdctl} member list) || exit 1\n\
                 id=$(printf '%s\\n' \"$list\" | awk -F', ' -v n={n} '$3 == n {{print $1}}')\n\
                 if [ -z \"$id\" ]; then echo \"no etcd member named {node}: nothing to remove\"; exit 0; fi\n\
                 {etcdctl} member remove \"$id\""
            ),
            QUICK,
        )
        .hint(&format!(
            "remove it by hand on {survivor}: `{etcdctl} member list`, then `member remove ID` of the member named {node}"
        ))
    });
    let delete = cmd(
        &format!("delete node {node}"),
        &format!("{kc} delete node {n} --ignore-not-found"),
        QUICK,
    );
    LeaveOps {
        drain,
        reset,
        remove_member,
        delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_drains_first_then_resets_and_deletes() {
        let ops = leave_ops("w2", false, "cp1", Duration::from_secs(120));
        assert!(
            ops.drain.run.contains(
                "drain w2 --ignore-daemonsets --delete-emptydir-data --force --timeout=120s"
            ),
            "{}",
            ops.drain.run
        );
        assert!(ops.drain.run.starts_with(
            "if kubectl --kubeconfig /etc/kubernetes/admin.conf get node w2 >/dev/null 2>&1; then"
        ));
        assert!(ops.drain.timeout_secs > 120);
        assert!(ops.reset.run.contains("kubeadm reset -f"));
        assert!(!ops.reset.run.contains("drain"));
        assert!(
            ops.reset
                .hint
                .as_deref()
                .is_some_and(|h| h.contains("klab ssh w2 -- sudo kubeadm reset -f"))
        );
        assert_eq!(ops.remove_member, None, "a worker has no etcd member");
        assert_eq!(
            ops.delete.run,
            "kubectl --kubeconfig /etc/kubernetes/admin.conf delete node w2 --ignore-not-found"
        );
    }

    #[test]
    fn a_leaving_control_plane_loses_its_etcd_member_by_name_on_the_survivor() {
        let ops = leave_ops("cp3", true, "cp1", Duration::from_secs(10));
        assert!(ops.drain.run.contains("--timeout=30s"), "at least 30 s");
        let rm = ops
            .remove_member
            .expect("a control plane has an etcd member");
        let etcdctl = "kubectl --kubeconfig /etc/kubernetes/admin.conf -n kube-system exec etcd-cp1 -- etcdctl \
                       --endpoints=https://127.0.0.1:2379 --cacert=/etc/kubernetes/pki/etcd/ca.crt \
                       --cert=/etc/kubernetes/pki/etcd/server.crt --key=/etc/kubernetes/pki/etcd/server.key";
        assert!(
            rm.run
                .starts_with(&format!("list=$({etcdctl} member list) || exit 1\n")),
            "{}",
            rm.run
        );
        assert!(rm.run.contains("awk -F', ' -v n=cp3 '$3 == n {print $1}'"));
        assert!(
            rm.run
                .ends_with(&format!("{etcdctl} member remove \"$id\""))
        );
        // Gone already (the reset took it along): nothing to remove is success.
        assert!(rm.run.contains("nothing to remove\"; exit 0; fi"));
    }

    #[test]
    fn member_removal_finds_the_member_by_name() {
        // The member-list parsing of the removal script, run by a real shell on etcdctl's format.
        let rm = leave_ops("cp3", true, "cp1", Duration::from_secs(60))
            .remove_member
            .unwrap();
        let pick = rm
            .run
            .lines()
            .find(|l| l.starts_with("id="))
            .unwrap()
            .to_string();
        let list = "8e9e05c52164694d, started, cp1, https://10.0.0.11:2380, https://10.0.0.11:2379, false\n\
                    91bc3c398fb3c146, started, cp3, https://10.0.0.13:2380, https://10.0.0.13:2379, false\n\
                    fd422379fda50e48, started, cp30, https://10.0.0.30:2380, https://10.0.0.30:2379, false\n";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{pick}\nprintf '%s' \"$id\""))
            .env("list", list)
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "91bc3c398fb3c146");
    }

    fn ha() -> ProvisionPlan {
        let lab = crate::plan::fixtures::ha_lab();
        crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name))
            .kubernetes
            .expect("the HA fixture has [kubernetes]")
            .provision
    }

    fn run_ops(np: &NodePhase) -> Vec<&CommandOp> {
        np.ops
            .iter()
            .filter_map(|op| match op {
                Op::Run(c) => Some(c),
                Op::File(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_control_plane_counts_as_joined_only_with_a_healthy_etcd_member() {
        let p = ha();
        let np = p
            .phase(PhaseId::JoinControlPlane)
            .unwrap()
            .node("cp2")
            .unwrap();
        let probe = np
            .probe
            .as_ref()
            .and_then(|p| p.command.as_deref())
            .unwrap();
        assert!(probe.starts_with(
            "test -f /etc/kubernetes/kubelet.conf && test -f /etc/kubernetes/manifests/kube-apiserver.yaml || exit 1\n"
        ));
        // The same check the join's health step waits on, against this node's own API server.
        let ops = run_ops(np);
        let health = ops
            .iter()
            .find(|c| c.name == "its API server and etcd member are healthy")
            .unwrap();
        let etcd_ok = "get --raw='/readyz?verbose' 2>/dev/null | grep -q '^\\[+\\]etcd ok'";
        assert!(
            probe.contains(etcd_ok) && health.run.contains(etcd_ok),
            "{probe}"
        );
        assert!(
            probe.contains("--server https://10.10.1.11:6443"),
            "{probe}"
        );
        // The files without the health: a half-done join, named with the fix.
        assert_eq!(ops[0].name, "no earlier join left half-done");
        assert!(ops[0].run.starts_with(
            "if [ -e /etc/kubernetes/kubelet.conf ] || [ -e /etc/kubernetes/manifests/kube-apiserver.yaml ]; then"
        ));
        assert!(
            ops[0]
                .run
                .contains("cp2 was joined before but its API server on 10.10.1.11")
        );
        assert_eq!(
            ops[0].hint.as_deref(),
            Some(
                "run `kubeadm reset -f` on cp2 (`klab ssh cp2 -- sudo kubeadm reset -f`), then `klab provision demo --from join-control-plane --node cp2`"
            )
        );
        assert_eq!(ops[1].name, "kubeadm join (control plane)");
    }

    #[test]
    fn a_worker_counts_as_joined_only_when_its_node_is_registered() {
        let p = ha();
        let np = p.phase(PhaseId::JoinWorkers).unwrap().node("w1").unwrap();
        let probe = np
            .probe
            .as_ref()
            .and_then(|p| p.command.as_deref())
            .unwrap();
        assert!(probe.starts_with("test -f /etc/kubernetes/kubelet.conf || exit 1\n"));
        assert!(probe.contains(
            "kubectl --kubeconfig /etc/kubernetes/kubelet.conf --request-timeout=5s get node w1 >/dev/null 2>&1 && exit 0"
        ));
        let ops = run_ops(np);
        assert_eq!(ops[0].name, "no earlier join left half-done");
        assert!(ops[0].run.contains("the cluster has no Node of that name"));
        assert!(
            ops[0]
                .hint
                .as_deref()
                .is_some_and(|h| h.ends_with("`klab provision demo --from join-workers --node w1`"))
        );
    }

    /// Runs `script` with `sh`, `kubectl` a stand-in that prints `nodes` for a jsonpath listing
    /// and fails `wait`; returns (exit status, stderr).
    fn with_fake_kubectl(script: &str, nodes: &str) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("kubectl");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = wait ] && exit 1; done\nprintf '{}'\n",
                nodes.replace('\n', "\\n")
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script.replace("sleep 5", ":"))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    dir.path().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("sh runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn wait_ready_names_the_nodes_that_are_missing_or_not_ready() {
        let p = ha();
        let ops = run_ops(&p.phase(PhaseId::WaitReady).unwrap().nodes[0]);
        let registered = ops
            .iter()
            .find(|c| c.name.ends_with("nodes registered"))
            .unwrap();
        let (code, err) = with_fake_kubectl(&registered.run, "cp1\ncp2\nw1\n");
        assert_eq!(code, 1);
        assert!(err.starts_with("not registered as Nodes after "), "{err}");
        assert!(err.trim_end().ends_with(": cp3 w2"), "{err}");
        let ready = ops.iter().find(|c| c.name == "every node Ready").unwrap();
        let (code, err) =
            with_fake_kubectl(&ready.run, "cp1=True\ncp2=False\nw1=Unknown\nw2=True\n");
        assert_eq!(code, 1);
        assert!(err.trim_end().ends_with(": cp2 w1"), "{err}");
    }

    #[test]
    fn markers_round_trip_through_refs() {
        assert_eq!(marker("bootstrap-token"), "${klab:bootstrap-token}");
        assert_eq!(
            refs("a ${klab:x} b ${klab:y-z} ${klab:x} ${HOME} ${klab:unterminated"),
            ["x", "y-z"]
        );
        assert!(refs("no markers, $VERSION_ID").is_empty());
    }

    #[test]
    fn captures_take_a_prefixed_line_or_all_of_stdout() {
        let c = Capture {
            value: "pkg".into(),
            line_prefix: Some("pkg=".into()),
            secret: false,
            cluster: false,
        };
        assert_eq!(c.extract("os=debian-12\npkg=apt\n").as_deref(), Some("apt"));
        assert_eq!(c.extract("os=debian-12\n"), None);
        assert_eq!(c.extract("pkg=\n"), None);
        let all = Capture {
            value: "admin".into(),
            line_prefix: None,
            secret: true,
            cluster: true,
        };
        assert_eq!(all.extract("a: 1\nb: 2\n").as_deref(), Some("a: 1\nb: 2\n"));
    }

    #[test]
    fn file_modes_are_octal_strings() {
        let f = FileOp {
            path: "/etc/x".into(),
            content: FileContent::Text { text: "x".into() },
            mode: 0o600,
            owner: "root:root".into(),
            when: None,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"path":"/etc/x","content":{"kind":"text","text":"x"},"mode":"0600","owner":"root:root","when":null}"#
        );
        assert_eq!(serde_json::from_str::<FileOp>(&json).unwrap(), f);
        assert!(serde_json::from_str::<FileOp>(&json.replace("0600", "rw")).is_err());
    }

    #[test]
    fn pool_modes_per_encapsulation() {
        assert_eq!(calico_pool_modes(Encapsulation::Vxlan), ("Never", "Always"));
        assert_eq!(calico_pool_modes(Encapsulation::Ipip), ("Always", "Never"));
        assert_eq!(calico_pool_modes(Encapsulation::None), ("Never", "Never"));
        assert_eq!(PhaseId::JoinControlPlane.as_str(), "join-control-plane");
    }
}
