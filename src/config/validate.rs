//! Raw config → validated [`Lab`], collecting every error instead of stopping at the first.
//!
//! Each check names the object (`node \`cp1\``, `network \`cluster\``) and points at the value that
//! is wrong. A value that fails its own check is left out of later checks, so one mistake gives one
//! message, not a cascade.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use super::Diagnostic;
use super::raw::{
    AccelName, BackendName, CniName, DurationConfig, EncapsulationName, FamilyName, Field,
    LabConfig, Lenient, ModeName, NodeConfig, RoleName, Sp,
};
use super::units::{self, UnitError};
use crate::catalog;
use crate::model::{
    Accel, BackendKind, Cni, Encapsulation, Host, Image, ImageSource, Kubernetes, Lab, Network,
    NetworkMode, Nic, Node, OsFamily, Role, Timeouts, defaults,
};
use crate::plan::ipam;
use crate::plan::versions::{self, K8sVersion, Support};

type Span = Range<usize>;

/// Minimums kubeadm's preflight checks enforce (with a little room for the OS).
const CP_MIN_CPUS: u32 = 2;
const CP_MIN_MIB: u64 = 1700;
const WORKER_MIN_CPUS: u32 = 1;
const WORKER_MIN_MIB: u64 = 1024;
const NETWORK_KEY_MAX: usize = 32;
/// Longest wait a lab may ask for: keeps deadlines (`Instant + timeout`) far from overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Most nodes one host holds (after `count` expansion); also the largest `count`.
pub const MAX_NODES: usize = 512;

pub(super) struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
    line_starts: Vec<usize>,
    pub(super) diags: Vec<Diagnostic>,
    /// Accepted but worth telling the user (an end-of-life Kubernetes minor).
    pub(super) warnings: Vec<Diagnostic>,
    /// Field paths an unknown key was probably meant to be (`nmae` → `name`): a "missing" error
    /// for them would only repeat the typo.
    pub(super) suggested: BTreeSet<String>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(src: &'a str, file: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Self {
            file,
            src,
            line_starts,
            diags: Vec::new(),
            warnings: Vec::new(),
            suggested: BTreeSet::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self
            .src
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, col)
    }

    pub(super) fn report(
        &mut self,
        span: &Span,
        field: &str,
        message: String,
        hint: Option<String>,
    ) {
        let (line, col) = self.position(span.start);
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            field: field.to_string(),
            message,
            hint,
        });
    }

    /// Record a warning: the value is accepted, the message is shown to the user.
    fn warn(&mut self, span: &Span, field: &str, message: String, hint: Option<String>) {
        let (line, col) = self.position(span.start);
        self.warnings.push(Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            field: field.to_string(),
            message,
            hint,
        });
    }

    /// Report a missing key, unless an unknown key nearby was probably meant to be it.
    fn missing(&mut self, span: &Span, field: &str, message: String, hint: Option<String>) {
        if !self.suggested.contains(field) {
            self.report(span, field, message, hint);
        }
    }

    fn text(&self, span: &Span) -> &str {
        self.src.get(span.clone()).unwrap_or("")
    }

    /// The value of a field, or `None` (reported) when it has the wrong type.
    fn get<'c, T>(
        &mut self,
        f: &'c Option<Field<T>>,
        at: &Place<'_>,
        key: &str,
        expected: &str,
    ) -> Option<(&'c T, Span)> {
        let f = f.as_ref()?;
        match &f.value {
            Lenient::Ok(v) => Some((v, f.span.clone())),
            Lenient::Bad(raw) => {
                let msg = format!(
                    "{}`{key}` must be {expected}, found {}",
                    at.prefix(),
                    describe(raw)
                );
                self.report(&f.span, &at.field(key), msg, None);
                None
            }
        }
    }

    /// Like [`Ctx::get`] for a closed set of words, with a "did you mean" hint.
    fn choice<'c, T>(
        &mut self,
        f: &'c Option<Field<T>>,
        at: &Place<'_>,
        key: &str,
        choices: &[&str],
    ) -> Option<(&'c T, Span)> {
        let f = f.as_ref()?;
        match &f.value {
            Lenient::Ok(v) => Some((v, f.span.clone())),
            Lenient::Bad(toml::Value::String(s)) => {
                let list = choices
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let hint = match units::did_you_mean(s, choices.iter().copied()) {
                    Some(c) => format!("did you mean `{c}`? {key} is one of {list}"),
                    None => format!("{key} is one of {list}"),
                };
                self.report(
                    &f.span,
                    &at.field(key),
                    format!("{}unknown {key} `{s}`", at.prefix()),
                    Some(hint),
                );
                None
            }
            Lenient::Bad(raw) => {
                let list = choices
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let msg = format!(
                    "{}`{key}` must be one of {list}, found {}",
                    at.prefix(),
                    describe(raw)
                );
                self.report(&f.span, &at.field(key), msg, None);
                None
            }
        }
    }

    fn ipv4(
        &mut self,
        f: &Option<Field<String>>,
        at: &Place<'_>,
        key: &str,
    ) -> Option<(Ipv4Addr, Span)> {
        let (s, span) = self.get(f, at, key, "an IPv4 address string")?;
        match s.trim().parse::<Ipv4Addr>() {
            Ok(ip) => Some((ip, span)),
            Err(_) => {
                let hint = if s.contains('/') {
                    "write the address without a prefix length, e.g. \"10.10.1.10\"".to_string()
                } else {
                    "write a dotted IPv4 address, e.g. \"10.10.1.10\"".to_string()
                };
                self.report(
                    &span,
                    &at.field(key),
                    format!("{}{key} `{s}` is not an IPv4 address", at.prefix()),
                    Some(hint),
                );
                None
            }
        }
    }

    fn cidr(
        &mut self,
        f: &Option<Field<String>>,
        at: &Place<'_>,
        key: &str,
    ) -> Option<(Ipv4Network, Span)> {
        let (s, span) = self.get(f, at, key, "a CIDR string like \"10.10.1.0/24\"")?;
        match parse_cidr(s) {
            Ok(net) => match reserved_range(net) {
                Some((what, range)) => {
                    self.report(
                        &span,
                        &at.field(key),
                        format!(
                            "{}{key} {net} overlaps the {what} range {range}",
                            at.prefix()
                        ),
                        Some(private_ranges_hint(key)),
                    );
                    None
                }
                None => Some((net, span)),
            },
            Err(CidrError::Syntax) => {
                self.report(
                    &span,
                    &at.field(key),
                    format!("{}{key} `{s}` is not an IPv4 CIDR", at.prefix()),
                    Some("write an address and a prefix length, e.g. \"10.10.1.0/24\"".into()),
                );
                None
            }
            Err(CidrError::HostBits(net)) => {
                self.report(
                    &span,
                    &at.field(key),
                    format!("{}{key} `{s}` has host bits set", at.prefix()),
                    Some(format!("the network address is \"{net}\"")),
                );
                None
            }
        }
    }

    fn duration(&mut self, f: &Option<Field<DurationConfig>>, key: &str) -> Option<Duration> {
        let at = Place::Section("timeouts");
        let (v, span) = self.get(
            f,
            &at,
            key,
            "a duration like \"90s\" or an integer number of seconds",
        )?;
        let parsed = match v {
            DurationConfig::Seconds(0) => Err(UnitError::Zero),
            DurationConfig::Seconds(n) => Ok(Duration::from_secs(*n)),
            DurationConfig::Text(s) => units::parse_duration(s),
        };
        match parsed {
            Ok(d) if d > MAX_TIMEOUT => {
                let msg = format!(
                    "[timeouts] `{key}` {} is longer than {}h",
                    self.text(&span),
                    MAX_TIMEOUT.as_secs() / 3600
                );
                self.report(
                    &span,
                    &at.field(key),
                    msg,
                    Some(format!(
                        "use at most \"{}h\" ({} s); a wait that long means something is wrong",
                        MAX_TIMEOUT.as_secs() / 3600,
                        MAX_TIMEOUT.as_secs()
                    )),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                let what = match e {
                    UnitError::Zero => "must be longer than zero".to_string(),
                    UnitError::TooLarge => "is too long".to_string(),
                    UnitError::Unit(u) => format!("has an unknown unit `{u}`"),
                    _ => "is not a duration".to_string(),
                };
                let msg = format!("[timeouts] `{key}` {} {what}", self.text(&span));
                self.report(
                    &span,
                    &at.field(key),
                    msg,
                    Some(units::DURATION_HINT.into()),
                );
                None
            }
        }
    }
}

/// Where a value lives, for messages (`node \`cp1\`: …`) and field paths (`nodes[0].cpus`).
#[derive(Debug, Clone)]
enum Place<'a> {
    Top,
    /// `[host]`, `[defaults]`, `[kubernetes]`, `[timeouts]`.
    Section(&'a str),
    Network(&'a str),
    Image(&'a str),
    /// Index in `nodes` and display name.
    Node(usize, &'a str),
}

impl Place<'_> {
    fn prefix(&self) -> String {
        match self {
            Place::Top => String::new(),
            Place::Section(s) => format!("[{s}] "),
            Place::Network(n) => format!("network `{n}`: "),
            Place::Image(n) => format!("image `{n}`: "),
            Place::Node(_, n) => format!("node `{n}`: "),
        }
    }
    fn field(&self, key: &str) -> String {
        match self {
            Place::Top => key.to_string(),
            Place::Section(s) => format!("{s}.{key}"),
            Place::Network(n) => format!("networks.{n}.{key}"),
            Place::Image(n) => format!("images.{n}.{key}"),
            Place::Node(i, _) => format!("nodes[{i}].{key}"),
        }
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string \"{s}\""),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(f) => format!("number {f}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("date {d}"),
        toml::Value::Array(_) => "an array".to_string(),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum CidrError {
    Syntax,
    /// Host bits set; carries the network address form.
    HostBits(Ipv4Network),
}

/// Strict `a.b.c.d/p` (a bare address is not a network here).
fn parse_cidr(s: &str) -> Result<Ipv4Network, CidrError> {
    let (addr, prefix) = s.trim().split_once('/').ok_or(CidrError::Syntax)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::Syntax)?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CidrError::Syntax);
    }
    let prefix: u8 = prefix.parse().map_err(|_| CidrError::Syntax)?;
    let net = Ipv4Network::new(addr, prefix).map_err(|_| CidrError::Syntax)?;
    if net.network() != addr {
        let canonical = Ipv4Network::new(net.network(), prefix).map_err(|_| CidrError::Syntax)?;
        return Err(CidrError::HostBits(canonical));
    }
    Ok(net)
}

/// Ranges no lab network, pod or service range may touch: hosts and routers treat them specially
/// (RFC 6890), so nodes there would not be reachable the normal way.
const RESERVED_RANGES: &[(&str, Ipv4Addr, u8)] = &[
    ("\"this network\"", Ipv4Addr::new(0, 0, 0, 0), 8),
    ("loopback", Ipv4Addr::new(127, 0, 0, 0), 8),
    ("link-local", Ipv4Addr::new(169, 254, 0, 0), 16),
    ("multicast", Ipv4Addr::new(224, 0, 0, 0), 4),
    // Includes the limited broadcast address 255.255.255.255.
    ("reserved", Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Where to look instead, with an example of the usual size for `key`.
fn private_ranges_hint(key: &str) -> String {
    let example = match key {
        "pod-cidr" => defaults::POD_CIDR,
        "service-cidr" => defaults::SERVICE_CIDR,
        _ => "10.10.1.0/24",
    };
    format!("use a private range (10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16), e.g. \"{example}\"")
}

/// The special-purpose range `net` overlaps, if any, with its name.
fn reserved_range(net: Ipv4Network) -> Option<(&'static str, Ipv4Network)> {
    RESERVED_RANGES.iter().find_map(|(what, addr, prefix)| {
        let range = Ipv4Network::new(*addr, *prefix).ok()?;
        overlaps(net, range).then_some((*what, range))
    })
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A resolved per-node setting and where it came from (node, `[defaults]`, or built in).
#[derive(Debug, Clone)]
struct Setting<T> {
    value: T,
    span: Option<Span>,
}

#[derive(Debug)]
struct NetDraft {
    name: String,
    span: Span,
    mode: Option<NetworkMode>,
    cidr: Option<(Ipv4Network, Span)>,
    gateway: Option<Ipv4Addr>,
    bridge: Option<String>,
    dns: Vec<Ipv4Addr>,
    mtu: Option<u32>,
    ok: bool,
}

#[derive(Debug)]
struct NicDraft {
    /// Index into the network drafts, when the name is known.
    net: Option<usize>,
    net_span: Span,
    ip: Option<(Ipv4Addr, Span)>,
}

#[derive(Debug)]
struct NodeDraft {
    index: usize,
    /// Base name (before count expansion) and where it is written.
    name: Option<(String, Span)>,
    span: Span,
    count: Option<u32>,
    /// `count` was written but is invalid: the entry makes no nodes (the error is reported).
    count_bad: bool,
    role: Role,
    image: Option<String>,
    cpus: Option<Setting<u32>>,
    memory: Option<Setting<u64>>,
    disk: Option<Setting<u64>>,
    user: Option<String>,
    nics: Vec<NicDraft>,
}

#[derive(Debug, Default)]
struct Defaults {
    image: Option<Setting<String>>,
    cpus: Option<Setting<u32>>,
    memory: Option<Setting<u64>>,
    disk: Option<Setting<u64>>,
    user: Option<Setting<String>>,
}

struct K8sDraft {
    span: Span,
    version: Option<String>,
    cluster: Option<(usize, Span)>,
    cluster_ok: bool,
    pod: Option<Ipv4Network>,
    /// Where `pod-cidr` is written (`None`: the default).
    pod_span: Option<Span>,
    service: Option<Ipv4Network>,
    /// Where `service-cidr` is written (`None`: the default).
    service_span: Option<Span>,
    cni: Option<Cni>,
    vip: Option<(Ipv4Addr, Span)>,
    calico: Option<String>,
    extra: Option<K8sExtra>,
}

/// The provisioner's `[kubernetes]` keys (mirror, registry, Calico manifest and encapsulation).
struct K8sExtra {
    encapsulation: Encapsulation,
    package_repo: Option<String>,
    package_key: Option<String>,
    image_repository: Option<String>,
    calico_manifest: Option<PathBuf>,
}

/// Validate a deserialized lab file. Errors are left in `ctx.diags`; `None` when there are any.
pub(super) fn validate(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Option<Lab> {
    let name = lab_name(cfg, ctx);
    let host = host(cfg, ctx);
    let timeouts = timeouts(cfg, ctx);
    let images = images(cfg, ctx);
    let defs = defaults_section(cfg, ctx);
    let mut nets = networks(cfg, ctx);
    check_network_overlaps(&nets, ctx);
    if host.backend == BackendKind::Hyperv {
        check_hyperv_nat(&nets, ctx);
    }
    let k8s = kubernetes(cfg, &nets, ctx);
    let nodes: Vec<NodeDraft> = cfg
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| node(i, n, &defs, &images, &nets, k8s.as_ref(), ctx))
        .collect();
    if cfg.nodes.is_empty() {
        ctx.missing(
            &(0..0),
            "nodes",
            "the lab has no nodes".into(),
            Some("add at least one [[nodes]] table with a `name` and `nics`".into()),
        );
    }
    if !check_node_total(&nodes, ctx) {
        // Expanding and addressing that many nodes would only make more errors, slowly.
        return None;
    }
    let expanded = expand(&nodes, ctx);
    check_fixed_addresses(&expanded, &nodes, &nets, k8s.as_ref(), ctx);
    let ips = allocate(&expanded, &nodes, &nets, k8s.as_ref(), ctx);
    if let Some(k) = &k8s {
        check_pod_cidr_size(k, &nodes, &expanded, ctx);
        check_service_cidr_size(k, ctx);
    }
    let kubernetes = k8s.and_then(|k| finish_kubernetes(k, &nodes, &expanded, &nets, ctx));

    if !ctx.diags.is_empty() {
        return None;
    }

    let mut used_images: BTreeMap<String, Image> = BTreeMap::new();
    let mut model_nodes = Vec::new();
    for (e, node_ips) in expanded.iter().zip(&ips) {
        let d = &nodes[e.node];
        let image = d.image.clone()?;
        used_images.insert(image.clone(), images.get(&image)?.clone()?);
        let nics = d
            .nics
            .iter()
            .zip(node_ips)
            .map(|(nic, ip)| {
                Some(Nic {
                    network: nets.get(nic.net?)?.name.clone(),
                    ip: (*ip)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        model_nodes.push(Node {
            name: e.name.clone(),
            role: d.role,
            image,
            cpus: d.cpus.as_ref()?.value,
            memory_mib: d.memory.as_ref()?.value,
            disk_gib: d.disk.as_ref()?.value,
            user: d.user.clone()?,
            nics,
        });
    }
    let networks = nets
        .drain(..)
        .map(|n| {
            Some(Network {
                name: n.name,
                mode: n.mode?,
                cidr: n.cidr?.0,
                gateway: n.gateway?,
                bridge: n.bridge,
                dns: n.dns,
                mtu: n.mtu,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Lab {
        name: name?,
        host,
        images: used_images,
        networks,
        nodes: model_nodes,
        kubernetes,
        timeouts,
    })
}

fn lab_name(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Option<String> {
    let Some((name, span)) = ctx.get(&cfg.name, &Place::Top, "name", "a string") else {
        if cfg.name.is_none() {
            ctx.missing(
                &(0..0),
                "name",
                "the lab has no `name`".into(),
                Some(
                    "add `name = \"demo\"` at the top; it prefixes every object klab creates"
                        .into(),
                ),
            );
        }
        return None;
    };
    if units::is_lab_name(name) {
        return Some(name.clone());
    }
    let hint = if name.len() > units::LAB_NAME_MAX {
        format!(
            "use at most {} characters; the name prefixes every libvirt object klab creates",
            units::LAB_NAME_MAX
        )
    } else if units::is_lab_name(&name.to_ascii_lowercase()) {
        format!("use lowercase: \"{}\"", name.to_ascii_lowercase())
    } else {
        "use lowercase letters, digits and `-` (not first or last)".into()
    };
    ctx.report(
        &span,
        "name",
        format!("lab name `{name}` is not valid"),
        Some(hint),
    );
    None
}

fn host(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Host {
    let mut host = Host::default();
    let Some(h) = &cfg.host else { return host };
    let at = Place::Section("host");
    if let Some((uri, span)) = ctx.get(&h.value.uri, &at, "uri", "a string") {
        if uri.trim().is_empty() || !uri.contains(':') {
            ctx.report(
                &span,
                "host.uri",
                format!("[host] uri `{uri}` is not a libvirt connection URI"),
                Some("e.g. \"qemu:///system\"".into()),
            );
        } else {
            host.uri = Some(uri.clone());
        }
    }
    if let Some((accel, _)) = ctx.choice(&h.value.accel, &at, "accel", &["auto", "kvm", "qemu"]) {
        host.accel = match accel {
            AccelName::Auto => Accel::Auto,
            AccelName::Kvm => Accel::Kvm,
            AccelName::Qemu => Accel::Qemu,
        };
    }
    if let Some((pool, _)) = ctx.cidr(&h.value.subnet_pool, &at, "subnet-pool") {
        host.subnet_pool = Some(pool);
    }
    if let Some((b, _)) = ctx.choice(&h.value.backend, &at, "backend", &["libvirt", "hyperv"]) {
        host.backend = match b {
            BackendName::Libvirt => BackendKind::Libvirt,
            BackendName::Hyperv => BackendKind::Hyperv,
        };
    }
    host
}

/// `[host] backend = "hyperv"`, read straight from the file (network checks depend on it).
fn is_hyperv(cfg: &LabConfig) -> bool {
    cfg.host
        .as_ref()
        .and_then(|h| h.value.backend.as_ref())
        .is_some_and(|f| matches!(f.value, Lenient::Ok(BackendName::Hyperv)))
}

/// Hyper-V's NAT-and-DHCP switch (Windows client). Its subnet changes at every host reboot.
fn is_default_switch(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("Default Switch")
}

fn timeouts(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Timeouts {
    let mut t = Timeouts::default();
    let Some(c) = &cfg.timeouts else { return t };
    let c = &c.value;
    if let Some(d) = ctx.duration(&c.ssh, "ssh") {
        t.ssh = d;
    }
    if let Some(d) = ctx.duration(&c.cloud_init, "cloud-init") {
        t.cloud_init = d;
    }
    if let Some(d) = ctx.duration(&c.command, "command") {
        t.command = d;
    }
    if let Some(d) = ctx.duration(&c.nodes_ready, "nodes-ready") {
        t.nodes_ready = d;
    }
    t
}

/// Every image a node may name: the catalog plus `[images]` (which may replace catalog entries).
/// `None` values are `[images]` entries with errors (already reported).
fn images(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> BTreeMap<String, Option<Image>> {
    let mut out: BTreeMap<String, Option<Image>> = catalog::CATALOG
        .iter()
        .map(|c| {
            let image = Image {
                name: c.name.to_string(),
                // Catalog images are verified against the distribution's published checksum list
                // at download time, so there is no fixed sha256 here.
                source: ImageSource::Url {
                    url: c.url.to_string(),
                    sha256: String::new(),
                },
                family: c.family,
                kernel: None,
                initrd: None,
                cmdline: None,
            };
            (c.name.to_string(), Some(image))
        })
        .collect();
    for (key, entry) in &cfg.images {
        out.insert(key.clone(), image(key, entry, ctx));
    }
    out
}

fn abs_path(
    ctx: &mut Ctx<'_>,
    f: &Option<Field<String>>,
    at: &Place<'_>,
    key: &str,
) -> Option<Option<PathBuf>> {
    if f.is_none() {
        return Some(None);
    }
    let (p, span) = ctx.get(f, at, key, "a path string")?;
    if !p.starts_with('/') {
        ctx.report(
            &span,
            &at.field(key),
            format!("{}{key} `{p}` is not an absolute path", at.prefix()),
            Some("write the full path; qemu must be able to read it as user libvirt-qemu".into()),
        );
        return None;
    }
    Some(Some(PathBuf::from(p)))
}

fn image(key: &str, entry: &Sp<super::raw::ImageConfig>, ctx: &mut Ctx<'_>) -> Option<Image> {
    let at = Place::Image(key);
    let c = &entry.value;
    let mut ok = true;
    if key.is_empty()
        || key.starts_with('.')
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        ctx.report(
            &entry.span,
            &format!("images.{key}"),
            format!("image key `{key}` is not valid"),
            Some("use letters, digits, `.`, `_` and `-`; the key names the cached file".into()),
        );
        ok = false;
    }
    let url = ctx.get(&c.url, &at, "url", "a string");
    let sha = ctx.get(&c.sha256, &at, "sha256", "a string");
    let path = abs_path(ctx, &c.path, &at, "path");
    let family = ctx
        .choice(&c.family, &at, "family", &["debian", "ubuntu", "alma"])
        .map(|(f, _)| match f {
            FamilyName::Debian => OsFamily::Debian,
            FamilyName::Ubuntu => OsFamily::Ubuntu,
            FamilyName::Alma => OsFamily::Alma,
        });
    if c.family.is_some() && family.is_none() {
        ok = false;
    }
    let kernel = abs_path(ctx, &c.kernel, &at, "kernel");
    let initrd = abs_path(ctx, &c.initrd, &at, "initrd");
    let cmdline = ctx.get(&c.cmdline, &at, "cmdline", "a string");
    if (c.url.is_some() && url.is_none())
        || (c.sha256.is_some() && sha.is_none())
        || (c.cmdline.is_some() && cmdline.is_none())
    {
        ok = false;
    }
    let (Some(path), Some(kernel), Some(initrd)) = (path, kernel, initrd) else {
        return None;
    };
    if kernel.is_none() {
        for (f, k) in [(&c.initrd, "initrd"), (&c.cmdline, "cmdline")] {
            if let Some(f) = f {
                ctx.report(
                    &f.span,
                    &at.field(k),
                    format!("image `{key}`: `{k}` needs `kernel`"),
                    Some(
                        "direct kernel boot takes `kernel`, optionally with `initrd` and `cmdline`"
                            .into(),
                    ),
                );
                ok = false;
            }
        }
    }
    let source = match (&url, &path) {
        (Some(_), Some(_)) => {
            ctx.report(
                &entry.span,
                &format!("images.{key}"),
                format!("image `{key}` has both `url` and `path`"),
                Some(
                    "use `url` + `sha256` to download, or `path` for a local file, not both".into(),
                ),
            );
            None
        }
        (Some((u, uspan)), None) => {
            if !(u.starts_with("https://") || u.starts_with("http://") || u.starts_with("file://"))
            {
                ctx.report(
                    uspan,
                    &at.field("url"),
                    format!("image `{key}`: url `{u}` is not an http(s) or file URL"),
                    Some("e.g. \"https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2\"".into()),
                );
                None
            } else {
                match &sha {
                    Some((h, hspan))
                        if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) =>
                    {
                        Some(ImageSource::Url {
                            url: (*u).clone(),
                            sha256: h.to_ascii_lowercase(),
                        })
                    }
                    Some((h, hspan)) => {
                        ctx.report(
                            hspan,
                            &at.field("sha256"),
                            format!("image `{key}`: sha256 `{h}` is not 64 hexadecimal characters"),
                            Some("copy the value from the image's SHA256SUMS file, or run sha256sum on it".into()),
                        );
                        None
                    }
                    None if c.sha256.is_some() => None,
                    None => {
                        ctx.report(
                            uspan,
                            &at.field("sha256"),
                            format!("image `{key}` has a `url` but no `sha256`"),
                            Some("add `sha256 = \"…\"` so the download can be verified".into()),
                        );
                        None
                    }
                }
            }
        }
        (None, Some(p)) => {
            if let Some(s) = &c.sha256 {
                ctx.report(
                    &s.span,
                    &at.field("sha256"),
                    format!("image `{key}`: `sha256` is only used with `url`"),
                    Some("remove it; local files are used as they are".into()),
                );
                ok = false;
            }
            Some(ImageSource::Path { path: p.clone() })
        }
        (None, None) => {
            let typo = ctx.suggested.contains(&format!("images.{key}.url"))
                || ctx.suggested.contains(&format!("images.{key}.path"));
            if c.url.is_none() && c.path.is_none() && !typo {
                ctx.report(
                    &entry.span,
                    &format!("images.{key}"),
                    format!("image `{key}` has neither `url` nor `path`"),
                    Some(
                        "add `url` + `sha256` to download it, or `path` for a local qcow2 file"
                            .into(),
                    ),
                );
            }
            None
        }
    };
    let source = source?;
    if !ok {
        return None;
    }
    Some(Image {
        name: key.to_string(),
        source,
        family: family.unwrap_or_default(),
        kernel,
        initrd,
        cmdline: cmdline.map(|(c, _)| c.clone()),
    })
}

fn cpus(ctx: &mut Ctx<'_>, f: &Option<Field<u32>>, at: &Place<'_>) -> Option<Setting<u32>> {
    let (n, span) = ctx.get(f, at, "cpus", "a positive integer")?;
    if *n == 0 || *n > 256 {
        ctx.report(
            &span,
            &at.field("cpus"),
            format!("{}cpus = {n} is out of range", at.prefix()),
            Some("use 1 to 256".into()),
        );
        return None;
    }
    Some(Setting {
        value: *n,
        span: Some(span),
    })
}

fn size(
    ctx: &mut Ctx<'_>,
    f: &Option<Field<String>>,
    at: &Place<'_>,
    key: &str,
    disk: bool,
) -> Option<Setting<u64>> {
    let expected = if disk {
        "a string like \"20GiB\""
    } else {
        "a string like \"2GiB\""
    };
    let (s, span) = ctx.get(f, at, key, expected)?;
    let parsed = if disk {
        units::parse_disk_gib(s)
    } else {
        units::parse_size_mib(s)
    };
    let hint = if disk {
        units::DISK_UNITS_HINT
    } else {
        units::SIZE_UNITS_HINT
    };
    match parsed {
        Ok(v) => Some(Setting {
            value: v,
            span: Some(span),
        }),
        Err(e) => {
            let what = match &e {
                UnitError::Unit(u) => format!("has an unknown unit `{u}`"),
                UnitError::Syntax => "is not a size".to_string(),
                UnitError::NoUnit => "has no unit".to_string(),
                UnitError::Fraction => "is not a whole number".to_string(),
                UnitError::Zero => "must be more than zero".to_string(),
                UnitError::TooLarge => "is too large".to_string(),
                UnitError::NotWholeGib => "is not a whole number of GiB".to_string(),
            };
            let hint = match e {
                UnitError::Fraction if !disk => "use MiB for fractions, e.g. \"1536MiB\"",
                _ => hint,
            };
            ctx.report(
                &span,
                &at.field(key),
                format!("{}{key} \"{s}\" {what}", at.prefix()),
                Some(hint.to_string()),
            );
            None
        }
    }
}

fn user(ctx: &mut Ctx<'_>, f: &Option<Field<String>>, at: &Place<'_>) -> Option<Setting<String>> {
    let (u, span) = ctx.get(f, at, "user", "a string")?;
    if !units::is_user_name(u) || u == "root" {
        let hint = if u == "root" {
            "klab logs in as a normal user with passwordless sudo; pick another name"
        } else {
            "use lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters"
        };
        ctx.report(
            &span,
            &at.field("user"),
            format!("{}user `{u}` is not a valid login name", at.prefix()),
            Some(hint.into()),
        );
        return None;
    }
    Some(Setting {
        value: u.clone(),
        span: Some(span),
    })
}

fn image_ref(
    ctx: &mut Ctx<'_>,
    f: &Option<Field<String>>,
    at: &Place<'_>,
    images: &BTreeMap<String, Option<Image>>,
) -> Option<Setting<String>> {
    let (name, span) = ctx.get(f, at, "image", "a string")?;
    if !images.contains_key(name) {
        let names: Vec<&str> = images.keys().map(String::as_str).collect();
        let list = names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = match units::did_you_mean(name, names.iter().copied()) {
            Some(s) => {
                format!("did you mean `{s}`? known images: {list} (or define [images.{name}])")
            }
            None => format!("known images: {list} (or define [images.{name}])"),
        };
        ctx.report(
            &span,
            &at.field("image"),
            format!("{}unknown image `{name}`", at.prefix()),
            Some(hint),
        );
        return None;
    }
    Some(Setting {
        value: name.clone(),
        span: Some(span),
    })
}

fn defaults_section(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Defaults {
    let Some(d) = &cfg.defaults else {
        return Defaults::default();
    };
    let at = Place::Section("defaults");
    let d = &d.value;
    // Images are checked against [images] later per node; here only the type matters.
    Defaults {
        image: ctx
            .get(&d.image, &at, "image", "a string")
            .map(|(v, s)| Setting {
                value: v.clone(),
                span: Some(s),
            }),
        cpus: cpus(ctx, &d.cpus, &at),
        memory: size(ctx, &d.memory, &at, "memory", false),
        disk: size(ctx, &d.disk, &at, "disk", true),
        user: user(ctx, &d.user, &at),
    }
}

fn is_network_key(s: &str) -> bool {
    s.len() <= NETWORK_KEY_MAX && units::is_hostname(s)
}

fn networks(cfg: &LabConfig, ctx: &mut Ctx<'_>) -> Vec<NetDraft> {
    let hyperv = is_hyperv(cfg);
    let mut out = Vec::new();
    for (key, entry) in &cfg.networks {
        let at = Place::Network(key);
        let c = &entry.value;
        let mut ok = true;
        if !is_network_key(key) {
            ctx.report(
                &entry.span,
                &format!("networks.{key}"),
                format!("network name `{key}` is not valid"),
                Some(format!(
                    "use lowercase letters, digits and `-`, at most {NETWORK_KEY_MAX} characters; it is part of libvirt object names"
                )),
            );
            ok = false;
        }
        let mode = match ctx.choice(&c.mode, &at, "mode", &["nat", "bridge", "isolated"]) {
            Some((m, _)) => Some(match m {
                ModeName::Nat => NetworkMode::Nat,
                ModeName::Bridge => NetworkMode::Bridge,
                ModeName::Isolated => NetworkMode::Isolated,
            }),
            None => {
                if c.mode.is_none() {
                    ctx.missing(
                        &entry.span,
                        &at.field("mode"),
                        format!("network `{key}` has no `mode`"),
                        Some("add `mode = \"nat\"`, `\"bridge\"` or `\"isolated\"`".into()),
                    );
                }
                None
            }
        };
        let mut cidr = ctx.cidr(&c.cidr, &at, "cidr");
        if c.cidr.is_none() {
            ctx.missing(
                &entry.span,
                &at.field("cidr"),
                format!("network `{key}` has no `cidr`"),
                Some(
                    "add e.g. `cidr = \"10.10.1.0/24\"`; klab gives nodes static addresses from it"
                        .into(),
                ),
            );
        }
        if let Some((net, span)) = &cidr
            && net.prefix() > 30
        {
            ctx.report(
                span,
                &at.field("cidr"),
                format!("network `{key}`: cidr {net} has no room for nodes"),
                Some("use a prefix of /30 or shorter (a /24 is typical)".into()),
            );
            cidr = None;
        }
        let gateway = match ctx.ipv4(&c.gateway, &at, "gateway") {
            Some((gw, span)) => match &cidr {
                Some((net, _)) => match ipam::check_host(*net, gw) {
                    Ok(()) => Some(gw),
                    Err(why) => {
                        let what = match why {
                            ipam::Unusable::OutsideNetwork => format!("is outside {net}"),
                            ipam::Unusable::NetworkAddress => "is the network address".to_string(),
                            ipam::Unusable::Broadcast => "is the broadcast address".to_string(),
                        };
                        ctx.report(
                            &span,
                            &at.field("gateway"),
                            format!("network `{key}`: gateway {gw} {what}"),
                            ipam::first_host(*net)
                                .map(|h| format!("use a host address of {net}, e.g. {h}")),
                        );
                        None
                    }
                },
                None => None,
            },
            None if c.gateway.is_none() => match (mode, &cidr) {
                (Some(NetworkMode::Bridge), _) => {
                    ctx.report(
                        &entry.span,
                        &at.field("gateway"),
                        format!("network `{key}`: bridge mode needs `gateway`"),
                        Some("set it to the router of the host bridge's subnet, e.g. gateway = \"192.168.182.1\"".into()),
                    );
                    None
                }
                (_, Some((net, _))) => ipam::first_host(*net),
                _ => None,
            },
            None => None,
        };
        let bridge = match ctx.get(&c.bridge, &at, "bridge", "a string") {
            Some((b, span)) => {
                if mode.is_some() && mode != Some(NetworkMode::Bridge) {
                    ctx.report(
                        &span,
                        &at.field("bridge"),
                        format!("network `{key}`: `bridge` is only for mode = \"bridge\""),
                        Some(
                            "remove it; klab names the bridges of nat and isolated networks itself"
                                .into(),
                        ),
                    );
                    ok = false;
                    None
                } else if hyperv && is_default_switch(b) {
                    ctx.report(
                        &span,
                        &at.field("bridge"),
                        format!(
                            "network `{key}`: the Hyper-V Default Switch cannot carry static addresses"
                        ),
                        Some(
                            "its subnet changes at every host reboot; use mode = \"nat\" (klab makes \
                             an Internal switch with a NetNat) or bridge = \"<physical adapter>\""
                                .into(),
                        ),
                    );
                    ok = false;
                    None
                } else if hyperv
                    && (b.trim().is_empty() || b.len() > 256 || b.chars().any(char::is_control))
                {
                    ctx.report(
                        &span,
                        &at.field("bridge"),
                        format!("network `{key}`: bridge `{b}` is not a network adapter name"),
                        Some("name the host adapter as `Get-NetAdapter` shows it, e.g. bridge = \"Ethernet\"".into()),
                    );
                    ok = false;
                    None
                } else if !hyperv
                    && (b.is_empty() || b.len() > 15 || b.contains(['/', ' ', ':', '\t']))
                {
                    ctx.report(
                        &span,
                        &at.field("bridge"),
                        format!("network `{key}`: bridge `{b}` is not a valid interface name"),
                        Some(
                            "Linux interface names have 1 to 15 characters, no `/`, `:` or spaces"
                                .into(),
                        ),
                    );
                    ok = false;
                    None
                } else {
                    Some(b.clone())
                }
            }
            None => {
                if c.bridge.is_none() && mode == Some(NetworkMode::Bridge) {
                    ctx.report(
                        &entry.span,
                        &at.field("bridge"),
                        format!("network `{key}`: bridge mode needs `bridge`"),
                        Some("name the existing host bridge, e.g. bridge = \"br0\"".into()),
                    );
                }
                None
            }
        };
        let mut dns = Vec::new();
        if let Some(list) = &c.dns {
            for (i, item) in list.value.iter().enumerate() {
                let f = Some(item.clone());
                match ctx.ipv4(&f, &at, &format!("dns[{i}]")) {
                    Some((ip, _)) => dns.push(ip),
                    None => ok = false,
                }
            }
        }
        let mut mtu = None;
        if let Some((m, span)) = ctx.get(&c.mtu, &at, "mtu", "an integer") {
            if (576..=9000).contains(m) {
                mtu = Some(*m);
            } else {
                ctx.report(
                    &span,
                    &at.field("mtu"),
                    format!("network `{key}`: mtu {m} is out of range"),
                    Some("use 576 to 9000 (1500 is usual; 1450 under VXLAN)".into()),
                );
                ok = false;
            }
        } else if c.mtu.is_some() {
            ok = false;
        }
        let ok = ok
            && mode.is_some()
            && cidr.is_some()
            && gateway.is_some()
            && (mode != Some(NetworkMode::Bridge) || bridge.is_some());
        out.push(NetDraft {
            name: key.clone(),
            span: entry.span.clone(),
            mode,
            cidr,
            gateway,
            bridge,
            dns,
            mtu,
            ok,
        });
    }
    out
}

/// Windows has one WinNAT network per host, so a Hyper-V lab can have at most one `nat` network.
fn check_hyperv_nat(nets: &[NetDraft], ctx: &mut Ctx<'_>) {
    let mut nat = nets.iter().filter(|n| n.mode == Some(NetworkMode::Nat));
    let Some(first) = nat.next() else { return };
    for n in nat {
        ctx.report(
            &n.span,
            &format!("networks.{}", n.name),
            format!(
                "network `{}`: a Hyper-V host has one NAT network, and `{}` is already nat",
                n.name, first.name
            ),
            Some("make this network mode = \"isolated\" (an Internal switch) or bridge it onto an adapter".into()),
        );
    }
}

fn check_network_overlaps(nets: &[NetDraft], ctx: &mut Ctx<'_>) {
    // Report at the network written later in the file.
    let mut by_pos: Vec<&NetDraft> = nets.iter().filter(|n| n.cidr.is_some()).collect();
    by_pos.sort_by_key(|n| n.span.start);
    for (i, later) in by_pos.iter().enumerate() {
        let Some((b, bspan)) = &later.cidr else {
            continue;
        };
        if let Some(earlier) = by_pos[..i]
            .iter()
            .find(|e| e.cidr.as_ref().is_some_and(|(a, _)| overlaps(*a, *b)))
            && let Some((a, _)) = &earlier.cidr
        {
            ctx.report(
                bspan,
                &format!("networks.{}.cidr", later.name),
                format!(
                    "network `{}`: cidr {b} overlaps network `{}` ({a})",
                    later.name, earlier.name
                ),
                Some("give every network its own address range".into()),
            );
        }
    }
}

fn network_index(nets: &[NetDraft], name: &str) -> Option<usize> {
    nets.iter().position(|n| n.name == name)
}

fn unknown_network_hint(nets: &[NetDraft], name: &str) -> String {
    let names: Vec<&str> = nets.iter().map(|n| n.name.as_str()).collect();
    if names.is_empty() {
        return format!("define it with a [networks.{name}] table");
    }
    let list = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match units::did_you_mean(name, names.iter().copied()) {
        Some(s) => format!("did you mean `{s}`? networks: {list}"),
        None => format!("networks: {list} (or define [networks.{name}])"),
    }
}

fn version_ok(v: &str, parts: std::ops::RangeInclusive<usize>) -> bool {
    let p: Vec<&str> = v.split('.').collect();
    parts.contains(&p.len())
        && p.iter().all(|s| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s.len() == 1 || !s.starts_with('0'))
        })
}

fn version_field(
    ctx: &mut Ctx<'_>,
    f: &Option<Field<String>>,
    key: &str,
    example: &str,
) -> Option<(String, Span)> {
    let at = Place::Section("kubernetes");
    if let Some(Sp {
        value: Lenient::Bad(toml::Value::Float(_) | toml::Value::Integer(_)),
        span,
    }) = f
    {
        let written = ctx.text(span).to_string();
        ctx.report(
            span,
            &at.field(key),
            format!("[kubernetes] `{key}` must be a string, found number {written}"),
            Some(format!("quote it: {key} = \"{written}\"")),
        );
        return None;
    }
    let (v, span) = ctx.get(f, &at, key, "a string")?;
    let parts = if key == "version" { 2..=3 } else { 3..=3 };
    if !version_ok(v, parts) {
        let hint = if v.starts_with('v')
            && version_ok(&v[1..], if key == "version" { 2..=3 } else { 3..=3 })
        {
            format!("write it without the `v`: \"{}\"", &v[1..])
        } else {
            format!("e.g. \"{example}\"")
        };
        ctx.report(
            &span,
            &at.field(key),
            format!("[kubernetes] {key} `{v}` is not a valid version"),
            Some(hint),
        );
        return None;
    }
    Some((v.clone(), span))
}

fn kubernetes(cfg: &LabConfig, nets: &[NetDraft], ctx: &mut Ctx<'_>) -> Option<K8sDraft> {
    let entry = cfg.kubernetes.as_ref()?;
    let c = &entry.value;
    let at = Place::Section("kubernetes");
    let version = kubernetes_version(ctx, c, &entry.span);
    let mut cluster_ok = false;
    let cluster = match ctx.get(&c.cluster_network, &at, "cluster-network", "a network name") {
        Some((name, span)) => match network_index(nets, name) {
            Some(i) => {
                cluster_ok = nets[i].ok;
                Some((i, span))
            }
            None => {
                ctx.report(
                    &span,
                    "kubernetes.cluster-network",
                    format!("[kubernetes] cluster-network `{name}` is not a network of this lab"),
                    Some(unknown_network_hint(nets, name)),
                );
                None
            }
        },
        None => {
            if c.cluster_network.is_none() {
                let names = nets
                    .iter()
                    .map(|n| format!("`{}`", n.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                ctx.missing(
                    &entry.span,
                    "kubernetes.cluster-network",
                    "[kubernetes] has no `cluster-network`".into(),
                    Some(format!(
                        "name the network node IPs, the API server, etcd and Calico use (networks: {names})"
                    )),
                );
            }
            None
        }
    };
    let pod_default = parse_cidr(defaults::POD_CIDR).ok();
    let svc_default = parse_cidr(defaults::SERVICE_CIDR).ok();
    let pod = if c.pod_cidr.is_some() {
        ctx.cidr(&c.pod_cidr, &at, "pod-cidr")
            .map(|(n, s)| (n, Some(s)))
    } else {
        pod_default.map(|n| (n, None))
    };
    let service = if c.service_cidr.is_some() {
        ctx.cidr(&c.service_cidr, &at, "service-cidr")
            .map(|(n, s)| (n, Some(s)))
    } else {
        svc_default.map(|n| (n, None))
    };
    // Overlaps: pod vs service, then each vs every node network.
    let describe_cidr = |key: &str, n: Ipv4Network, s: &Option<Span>| {
        if s.is_some() {
            format!("{key} {n}")
        } else {
            format!("{key} {n} (the default)")
        }
    };
    let mut pod_ok = pod.is_some();
    let mut svc_ok = service.is_some();
    if let (Some((p, ps)), Some((s, ss))) = (&pod, &service)
        && overlaps(*p, *s)
    {
        let span = ss
            .clone()
            .or_else(|| ps.clone())
            .unwrap_or(entry.span.clone());
        ctx.report(
            &span,
            "kubernetes.service-cidr",
            format!(
                "[kubernetes] {} overlaps {}",
                describe_cidr("service-cidr", *s, ss),
                describe_cidr("pod-cidr", *p, ps)
            ),
            Some("pods and services need separate ranges, e.g. pod-cidr 10.244.0.0/16 and service-cidr 10.96.0.0/12".into()),
        );
        svc_ok = false;
    }
    for (key, value) in [("pod-cidr", &pod), ("service-cidr", &service)] {
        let Some((range, rspan)) = value else {
            continue;
        };
        for n in nets {
            let Some((ncidr, _)) = &n.cidr else { continue };
            if overlaps(*range, *ncidr) {
                let span = rspan.clone().unwrap_or(entry.span.clone());
                ctx.report(
                    &span,
                    &format!("kubernetes.{key}"),
                    format!(
                        "[kubernetes] {} overlaps network `{}` ({ncidr})",
                        describe_cidr(key, *range, rspan),
                        n.name
                    ),
                    Some(format!("set `{key}` to a range no lab network uses")),
                );
                if key == "pod-cidr" {
                    pod_ok = false;
                } else {
                    svc_ok = false;
                }
            }
        }
    }
    let cni = match ctx.choice(&c.cni, &at, "cni", &["calico"]) {
        Some((CniName::Calico, _)) => Some(Cni::Calico),
        None if c.cni.is_some() => None,
        None => Some(Cni::Calico),
    };
    let vip = match ctx.ipv4(&c.control_plane_vip, &at, "control-plane-vip") {
        Some((vip, span)) => match &cluster {
            Some((i, _)) => {
                let net = &nets[*i];
                match &net.cidr {
                    Some((cidr, _)) => {
                        let problem = match ipam::check_host(*cidr, vip) {
                            Err(ipam::Unusable::OutsideNetwork) => Some(format!(
                                "is outside the cluster network `{}` ({cidr})",
                                net.name
                            )),
                            Err(ipam::Unusable::NetworkAddress) => {
                                Some("is the cluster network's network address".into())
                            }
                            Err(ipam::Unusable::Broadcast) => {
                                Some("is the cluster network's broadcast address".into())
                            }
                            Ok(()) if Some(vip) == net.gateway => {
                                Some(format!("is the gateway of network `{}`", net.name))
                            }
                            Ok(()) => None,
                        };
                        match problem {
                            Some(p) => {
                                ctx.report(
                                    &span,
                                    "kubernetes.control-plane-vip",
                                    format!("[kubernetes] control-plane-vip {vip} {p}"),
                                    Some(format!(
                                        "pick a free host address of {cidr} that no node uses"
                                    )),
                                );
                                None
                            }
                            None => Some((vip, span)),
                        }
                    }
                    None => None,
                }
            }
            None => None,
        },
        None => None,
    };
    let extra = kubernetes_extra(ctx, c);
    let calico = calico_version(ctx, c, extra.as_ref());
    Some(K8sDraft {
        span: entry.span.clone(),
        version,
        cluster,
        cluster_ok,
        pod_span: pod.as_ref().and_then(|(_, s)| s.clone()),
        pod: pod.filter(|_| pod_ok).map(|(n, _)| n),
        service_span: service.as_ref().and_then(|(_, s)| s.clone()),
        service: service.filter(|_| svc_ok).map(|(n, _)| n),
        cni,
        vip,
        calico,
        extra,
    })
}

/// `version`: refused below 1.31 (no kubeadm v1beta4), a warning outside the supported minors.
fn kubernetes_version(
    ctx: &mut Ctx<'_>,
    c: &super::raw::KubernetesConfig,
    section: &Span,
) -> Option<String> {
    let example = defaults::KUBERNETES_VERSION;
    let Some((v, span)) = version_field(ctx, &c.version, "version", example) else {
        if c.version.is_none() {
            ctx.missing(
                section,
                "kubernetes.version",
                "[kubernetes] has no `version`".into(),
                Some(format!("add e.g. `version = \"{example}\"`")),
            );
        }
        return None;
    };
    let parsed = K8sVersion::parse(&v)?;
    let supported = versions::supported_list();
    match parsed.support() {
        Support::Supported => {}
        Support::EndOfLife => ctx.warn(
            &span,
            "kubernetes.version",
            format!("[kubernetes] version {v} is past its end of life"),
            Some(format!(
                "it still builds, but gets no fixes; supported minors are {supported}, e.g. version = \"{example}\""
            )),
        ),
        Support::Newer => ctx.warn(
            &span,
            "kubernetes.version",
            format!("[kubernetes] version {v} is newer than klab has been checked against"),
            Some(format!(
                "supported minors are {supported}; from 1.38 on the kubelet needs containerd 2.x"
            )),
        ),
        Support::TooOld => {
            ctx.report(
                &span,
                "kubernetes.version",
                format!("[kubernetes] version {v} is not supported"),
                Some(format!(
                    "klab configures kubeadm with its v1beta4 API, which needs 1.{} or newer; supported minors are {supported}, e.g. version = \"{example}\"",
                    versions::MIN_MINOR
                )),
            );
            return None;
        }
    }
    Some(v)
}

/// `calico-version`: one of the releases klab pinned, unless the lab brings its own manifest.
fn calico_version(
    ctx: &mut Ctx<'_>,
    c: &super::raw::KubernetesConfig,
    extra: Option<&K8sExtra>,
) -> Option<String> {
    if c.calico_version.is_none() {
        return Some(defaults::CALICO_VERSION.to_string());
    }
    let (v, span) = version_field(
        ctx,
        &c.calico_version,
        "calico-version",
        defaults::CALICO_VERSION,
    )?;
    let own_manifest = extra.is_some_and(|e| e.calico_manifest.is_some());
    if !own_manifest && !versions::CALICO_RELEASES.contains(&v.as_str()) {
        let known = versions::CALICO_RELEASES
            .iter()
            .map(|r| format!("\"{r}\""))
            .collect::<Vec<_>>()
            .join(" or ");
        ctx.report(
            &span,
            "kubernetes.calico-version",
            format!("[kubernetes] calico-version {v} is not a release klab has pinned"),
            Some(format!(
                "use {known}, or set calico-manifest = \"PATH\" to a calico.yaml of that release"
            )),
        );
        return None;
    }
    Some(v)
}

/// An `http://` or `https://` URL without spaces.
fn http_url(
    ctx: &mut Ctx<'_>,
    f: &Option<Field<String>>,
    key: &str,
    hint: &str,
) -> Option<Option<String>> {
    if f.is_none() {
        return Some(None);
    }
    let at = Place::Section("kubernetes");
    let (u, span) = ctx.get(f, &at, key, "a URL string")?;
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/'))
        || u.chars().any(|ch| ch.is_whitespace() || ch.is_control())
    {
        ctx.report(
            &span,
            &at.field(key),
            format!("[kubernetes] {key} `{u}` is not an http:// or https:// URL"),
            Some(hint.to_string()),
        );
        return None;
    }
    Some(Some(u.trim_end_matches('/').to_string()))
}

/// The mirror, registry, encapsulation and manifest keys; `None` when any of them is wrong.
fn kubernetes_extra(ctx: &mut Ctx<'_>, c: &super::raw::KubernetesConfig) -> Option<K8sExtra> {
    let at = Place::Section("kubernetes");
    let encapsulation = match ctx.choice(
        &c.encapsulation,
        &at,
        "encapsulation",
        &["vxlan", "ipip", "none"],
    ) {
        Some((EncapsulationName::Vxlan, _)) => Some(Encapsulation::Vxlan),
        Some((EncapsulationName::Ipip, _)) => Some(Encapsulation::Ipip),
        Some((EncapsulationName::None, _)) => Some(Encapsulation::None),
        None if c.encapsulation.is_some() => None,
        None => Some(Encapsulation::default()),
    };
    let package_repo = http_url(
        ctx,
        &c.package_repo,
        "package-repo",
        "a mirror laid out like https://pkgs.k8s.io/core:/stable: (klab appends /v1.NN/deb/ or /v1.NN/rpm/), e.g. \"http://10.10.1.1:8080/k8s\"",
    );
    let package_key = http_url(
        ctx,
        &c.package_key,
        "package-key",
        "the URL of the repository's ASCII-armored signing key, e.g. \"http://10.10.1.1:8080/k8s/Release.key\"",
    );
    let image_repository = match ctx.get(&c.image_repository, &at, "image-repository", "a string") {
        None if c.image_repository.is_some() => None,
        None => Some(None),
        Some((r, span)) => {
            let bad = r.is_empty()
                || r.contains("://")
                || r.ends_with('/')
                || r.chars()
                    .any(|ch| ch.is_whitespace() || ch.is_control() || ch == '"' || ch == '\'');
            if bad {
                ctx.report(
                    &span,
                    "kubernetes.image-repository",
                    format!("[kubernetes] image-repository `{r}` is not a registry path"),
                    Some("write the registry and path without a scheme or trailing `/`, e.g. \"registry.lab:5000/k8s\"".into()),
                );
                None
            } else {
                Some(Some(r.clone()))
            }
        }
    };
    let calico_manifest = match ctx.get(&c.calico_manifest, &at, "calico-manifest", "a path string")
    {
        None if c.calico_manifest.is_some() => None,
        None => Some(None),
        Some((p, span)) if p.trim().is_empty() => {
            ctx.report(
                &span,
                "kubernetes.calico-manifest",
                "[kubernetes] calico-manifest is empty".into(),
                Some("name a calico.yaml on this host (relative paths start at the lab file's directory), or remove the key".into()),
            );
            None
        }
        Some((p, _)) => Some(Some(PathBuf::from(p))),
    };
    Some(K8sExtra {
        encapsulation: encapsulation?,
        package_repo: package_repo?,
        package_key: package_key?,
        image_repository: image_repository?,
        calico_manifest: calico_manifest?,
    })
}

#[allow(clippy::too_many_arguments)]
fn node(
    index: usize,
    entry: &Sp<NodeConfig>,
    defs: &Defaults,
    images: &BTreeMap<String, Option<Image>>,
    nets: &[NetDraft],
    k8s: Option<&K8sDraft>,
    ctx: &mut Ctx<'_>,
) -> NodeDraft {
    let c = &entry.value;
    let fallback = format!("nodes[{index}]");
    let name = match ctx.get(&c.name, &Place::Node(index, &fallback), "name", "a string") {
        Some((n, span)) => Some((n.clone(), span)),
        None => {
            if c.name.is_none() {
                ctx.missing(
                    &entry.span,
                    &format!("nodes[{index}].name"),
                    format!("node #{} has no `name`", index + 1),
                    Some("add `name = \"cp1\"` (a hostname)".into()),
                );
            }
            None
        }
    };
    let label = name.as_ref().map_or(fallback.clone(), |(n, _)| n.clone());
    let at = Place::Node(index, &label);

    let count = match ctx.get(&c.count, &at, "count", "an integer") {
        Some((n, span)) => {
            if (1..=MAX_NODES as i64).contains(n) {
                u32::try_from(*n).ok()
            } else {
                ctx.report(
                    &span,
                    &at.field("count"),
                    format!("node `{label}`: count {n} is out of range"),
                    Some(format!(
                        "use 1 to {MAX_NODES} (the most one host runs); leave `count` out for a single node"
                    )),
                );
                None
            }
        }
        None => None,
    };

    let role = match ctx.choice(&c.role, &at, "role", &["control-plane", "worker", "none"]) {
        Some((r, span)) => {
            let role = match r {
                RoleName::ControlPlane => Role::ControlPlane,
                RoleName::Worker => Role::Worker,
                RoleName::None => Role::None,
            };
            if role != Role::None && k8s.is_none() {
                ctx.report(
                    &span,
                    &at.field("role"),
                    format!(
                        "node `{label}` has role {} but the lab has no [kubernetes] section",
                        role.as_str()
                    ),
                    Some(
                        "add a [kubernetes] section, or use role = \"none\" for a plain VM".into(),
                    ),
                );
            }
            role
        }
        None => Role::None,
    };

    let image = if c.image.is_some() {
        image_ref(ctx, &c.image, &at, images)
    } else if let Some(d) = &defs.image {
        // Report an unknown default image once per node that uses it, at the [defaults] value.
        let f = Some(Sp {
            span: d.span.clone().unwrap_or(0..0),
            value: Lenient::Ok(d.value.clone()),
        });
        image_ref(ctx, &f, &Place::Section("defaults"), images)
    } else {
        Some(Setting {
            value: defaults::IMAGE.to_string(),
            span: None,
        })
    }
    .map(|s| s.value)
    .filter(|k| images.get(k).is_some_and(Option::is_some));

    let own_cpus = cpus(ctx, &c.cpus, &at);
    let cpus = if c.cpus.is_some() {
        own_cpus
    } else {
        Some(defs.cpus.clone().unwrap_or(Setting {
            value: defaults::CPUS,
            span: None,
        }))
    };
    let own_mem = size(ctx, &c.memory, &at, "memory", false);
    let memory = if c.memory.is_some() {
        own_mem
    } else {
        Some(defs.memory.clone().unwrap_or(Setting {
            value: defaults::MEMORY_MIB,
            span: None,
        }))
    };
    let own_disk = size(ctx, &c.disk, &at, "disk", true);
    let disk = if c.disk.is_some() {
        own_disk
    } else {
        Some(defs.disk.clone().unwrap_or(Setting {
            value: defaults::DISK_GIB,
            span: None,
        }))
    };
    let user = if c.user.is_some() {
        user(ctx, &c.user, &at).map(|s| s.value)
    } else {
        Some(
            defs.user
                .as_ref()
                .map_or_else(|| defaults::USER.to_string(), |s| s.value.clone()),
        )
    };

    // Kubernetes minimums, pointing at whichever value set the size.
    let name_span = name.as_ref().map_or(entry.span.clone(), |(_, s)| s.clone());
    if k8s.is_some() && role != Role::None {
        let (min_cpus, min_mib, what) = match role {
            Role::ControlPlane => (CP_MIN_CPUS, CP_MIN_MIB, "a control plane"),
            _ => (WORKER_MIN_CPUS, WORKER_MIN_MIB, "a worker"),
        };
        if let Some(s) = &cpus
            && s.value < min_cpus
        {
            ctx.report(
                s.span.as_ref().unwrap_or(&name_span),
                &at.field("cpus"),
                format!("node `{label}`: {what} needs at least {min_cpus} CPUs, it has {}", s.value),
                Some(if c.cpus.is_none() && defs.cpus.is_some() {
                    format!("the value comes from [defaults]; set cpus = {min_cpus} or more on this node")
                } else {
                    format!("set cpus = {min_cpus} or more")
                }),
            );
        }
        if let Some(s) = &memory
            && s.value < min_mib
        {
            ctx.report(
                s.span.as_ref().unwrap_or(&name_span),
                &at.field("memory"),
                format!(
                    "node `{label}`: {what} needs at least {min_mib} MiB of memory, it has {} MiB",
                    s.value
                ),
                Some(format!(
                    "{}set memory = \"{}\" or more{}",
                    if role == Role::ControlPlane {
                        "kubeadm's preflight check refuses less; "
                    } else {
                        ""
                    },
                    if role == Role::ControlPlane {
                        "2GiB"
                    } else {
                        "1GiB"
                    },
                    if c.memory.is_none() && defs.memory.is_some() {
                        " on this node (the value comes from [defaults])"
                    } else {
                        ""
                    }
                )),
            );
        }
    }

    let mut nics = Vec::new();
    let mut nics_broken = false;
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let nic_list: &[Sp<super::raw::NicConfig>] = c.nics.as_ref().map_or(&[], |n| &n.value);
    // Errors about the NICs as a whole point at the `nics` line (at the name when there is none).
    let nics_span = c
        .nics
        .as_ref()
        .map_or(name_span.clone(), |n| n.span.clone());
    for (i, nic) in nic_list.iter().enumerate() {
        let nic_at = Place::Node(index, &label);
        let key = format!("nics[{i}].network");
        let net = match ctx.get(&nic.value.network, &nic_at, &key, "a network name") {
            Some((n, span)) => {
                match network_index(nets, n) {
                    Some(ni) => {
                        if let Some(first) = seen.insert(ni, i) {
                            ctx.report(
                            &span,
                            &nic_at.field(&key),
                            format!("node `{label}`: nics[{i}] is on network `{n}` like nics[{first}]"),
                            Some("a node has at most one NIC per network".into()),
                        );
                            nics_broken = true;
                        }
                        Some((ni, span))
                    }
                    None => {
                        ctx.report(
                        &span,
                        &nic_at.field(&key),
                        format!("node `{label}`: nics[{i}].network `{n}` is not a network of this lab"),
                        Some(unknown_network_hint(nets, n)),
                    );
                        nics_broken = true;
                        None
                    }
                }
            }
            None => {
                if nic.value.network.is_none() {
                    ctx.missing(
                        &nic.span,
                        &nic_at.field(&key),
                        format!("node `{label}`: nics[{i}] has no `network`"),
                        Some("write e.g. { network = \"cluster\" }".into()),
                    );
                }
                nics_broken = true;
                None
            }
        };
        let ip_key = format!("nics[{i}].ip");
        let ip = ctx.ipv4(&nic.value.ip, &nic_at, &ip_key);
        if nic.value.ip.is_some() && ip.is_none() {
            nics_broken = true;
        }
        nics.push(NicDraft {
            net: net.as_ref().map(|(n, _)| *n),
            net_span: net.map_or(nic.span.clone(), |(_, s)| s),
            ip,
        });
    }
    if nic_list.is_empty() {
        ctx.missing(
            &nics_span,
            &at.field("nics"),
            format!("node `{label}` has no NICs"),
            Some("add e.g. nics = [ { network = \"outside\" }, { network = \"cluster\" } ]; NIC 1 carries the default route".into()),
        );
        nics_broken = true;
    }

    if let Some(k) = k8s
        && role != Role::None
        && !nics_broken
        && let Some((cluster, _)) = &k.cluster
        && !nics.iter().any(|n| n.net == Some(*cluster))
    {
        let cname = &nets[*cluster].name;
        ctx.report(
            &nics_span,
            &at.field("nics"),
            format!("node `{label}` has no NIC on the cluster network `{cname}`"),
            Some(format!(
                "add {{ network = \"{cname}\" }} to its nics; Kubernetes runs on that network"
            )),
        );
    }

    NodeDraft {
        index,
        name,
        span: entry.span.clone(),
        count,
        count_bad: c.count.is_some() && count.is_none(),
        role,
        image,
        cpus,
        memory,
        disk,
        user,
        nics,
    }
}

/// At most [`MAX_NODES`] nodes after `count` expansion: more than one host can run, and more than
/// planning should spend time on. `false` (reported at the entry that passes the limit) when over.
fn check_node_total(nodes: &[NodeDraft], ctx: &mut Ctx<'_>) -> bool {
    let mut total: usize = 0;
    let mut first_over: Option<&NodeDraft> = None;
    for d in nodes {
        if d.name.is_none() || d.count_bad {
            continue;
        }
        total += d.count.map_or(1, |c| c as usize);
        if total > MAX_NODES && first_over.is_none() {
            first_over = Some(d);
        }
    }
    let Some(d) = first_over else {
        return true;
    };
    let span = d.name.as_ref().map_or(d.span.clone(), |(_, s)| s.clone());
    let what = match (&d.name, d.count) {
        (Some((base, _)), Some(c)) => format!("node `{base}` (count {c})"),
        (Some((base, _)), None) => format!("node `{base}`"),
        _ => "this node".to_string(),
    };
    ctx.report(
        &span,
        &format!("nodes[{}]", d.index),
        format!("the lab has {total} nodes; klab runs at most {MAX_NODES} on one host"),
        Some(format!(
            "{what} passes the limit; use fewer [[nodes]] or smaller `count`s"
        )),
    );
    false
}

/// One node after `count` expansion.
struct Expanded {
    name: String,
    /// Index into the node drafts.
    node: usize,
    /// 0-based position within the count.
    k: u32,
}

fn expand(nodes: &[NodeDraft], ctx: &mut Ctx<'_>) -> Vec<Expanded> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (ni, d) in nodes.iter().enumerate() {
        let Some((base, span)) = &d.name else {
            continue;
        };
        let names: Vec<String> = match d.count {
            Some(c) => (1..=c).map(|i| format!("{base}{i}")).collect(),
            None if d.count_bad => continue,
            None => vec![base.clone()],
        };
        // Hostname validity: once per entry, on the longest name the entry makes.
        let longest = names
            .iter()
            .max_by_key(|n| n.len())
            .cloned()
            .unwrap_or_default();
        if !units::is_hostname(&longest) {
            let hint = if longest.len() > 63 {
                "hostnames have at most 63 characters".to_string()
            } else if units::is_hostname(&longest.to_ascii_lowercase()) {
                format!("use lowercase: \"{}\"", base.to_ascii_lowercase())
            } else {
                "use lowercase letters, digits and `-` (not first or last); names are hostnames"
                    .to_string()
            };
            let msg = if d.count.is_some() {
                format!("node name `{longest}` (from `{base}` with count) is not a valid hostname")
            } else {
                format!("node name `{base}` is not a valid hostname")
            };
            ctx.report(span, &format!("nodes[{}].name", d.index), msg, Some(hint));
            continue;
        }
        for (k, name) in names.into_iter().enumerate() {
            if let Some(&prev) = seen.get(&name) {
                let p = &nodes[prev];
                let first_line = ctx
                    .position(p.name.as_ref().map_or(p.span.start, |(_, s)| s.start))
                    .0;
                let first = match (&p.name, p.count) {
                    (Some((b, _)), Some(c)) => format!("`{b}` with count {c} at line {first_line}"),
                    _ => format!("the node at line {first_line}"),
                };
                let msg = match d.count {
                    Some(c) => {
                        format!("node `{name}` (from `{base}` with count {c}) is defined twice")
                    }
                    None => format!("node `{name}` is defined twice"),
                };
                let hint = format!("{first} already makes `{name}`; node names must be unique");
                ctx.report(span, &format!("nodes[{}].name", d.index), msg, Some(hint));
                continue;
            }
            seen.insert(name.clone(), ni);
            out.push(Expanded {
                name,
                node: ni,
                k: u32::try_from(k).unwrap_or(u32::MAX),
            });
        }
    }
    out
}

/// The fixed address a NIC of an expanded node gets: the written address, plus its position in
/// the count.
fn fixed_ip(e: &Expanded, nic: &NicDraft) -> Option<Ipv4Addr> {
    let (ip, _) = nic.ip.as_ref()?;
    u32::from(*ip).checked_add(e.k).map(Ipv4Addr::from)
}

fn check_fixed_addresses(
    expanded: &[Expanded],
    nodes: &[NodeDraft],
    nets: &[NetDraft],
    k8s: Option<&K8sDraft>,
    ctx: &mut Ctx<'_>,
) {
    let vip = k8s.and_then(|k| k.vip.as_ref().map(|(v, s)| (*v, s.clone())));
    let mut used: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    // Written addresses already wrong for the first node of a count: the others say nothing new.
    let mut failed_base: BTreeSet<usize> = BTreeSet::new();
    for e in expanded {
        let d = &nodes[e.node];
        for (i, nic) in d.nics.iter().enumerate() {
            let Some(ni) = nic.net else { continue };
            let net = &nets[ni];
            let Some((written, span)) = &nic.ip else {
                continue;
            };
            if e.k > 0 && failed_base.contains(&span.start) {
                continue;
            }
            let field = format!("nodes[{}].nics[{i}].ip", d.index);
            let Some(ip) = fixed_ip(e, nic) else {
                ctx.report(
                    span,
                    &field,
                    format!(
                        "node `{}`: nics[{i}].ip {written} + {} (count) is past 255.255.255.255",
                        e.name, e.k
                    ),
                    None,
                );
                continue;
            };
            let what = if e.k == 0 {
                format!("nics[{i}].ip {ip}")
            } else {
                format!("nics[{i}].ip {ip} ({written} + {} from count)", e.k)
            };
            if let Some((cidr, _)) = &net.cidr {
                let problem = match ipam::check_host(*cidr, ip) {
                    Err(ipam::Unusable::OutsideNetwork) => {
                        Some(format!("is outside network `{}` ({cidr})", net.name))
                    }
                    Err(ipam::Unusable::NetworkAddress) => {
                        Some(format!("is the network address of `{}`", net.name))
                    }
                    Err(ipam::Unusable::Broadcast) => {
                        Some(format!("is the broadcast address of `{}`", net.name))
                    }
                    Ok(()) if Some(ip) == net.gateway => {
                        Some(format!("is the gateway of network `{}`", net.name))
                    }
                    Ok(()) => None,
                };
                if let Some(p) = problem {
                    let hint = match ipam::host_range(*cidr) {
                        Some((a, b)) => format!(
                            "use an address from {} to {} other than the gateway{}",
                            Ipv4Addr::from(a),
                            Ipv4Addr::from(b),
                            net.gateway.map(|g| format!(" {g}")).unwrap_or_default()
                        ),
                        None => "the network has no host addresses".to_string(),
                    };
                    ctx.report(
                        span,
                        &field,
                        format!("node `{}`: {what} {p}", e.name),
                        Some(hint),
                    );
                    if e.k == 0 {
                        failed_base.insert(span.start);
                    }
                    continue;
                }
            }
            if let Some((v, vspan)) = &vip
                && *v == ip
            {
                let vline = ctx.position(vspan.start).0;
                ctx.report(
                    span,
                    &field,
                    format!("node `{}`: {what} is the control-plane VIP", e.name),
                    Some(format!(
                        "the VIP (line {vline}) must be an address no node uses"
                    )),
                );
                continue;
            }
            if let Some(other) = used.get(&ip) {
                ctx.report(
                    span,
                    &field,
                    format!(
                        "node `{}`: {what} is already used by node `{other}`",
                        e.name
                    ),
                    Some(
                        "every NIC needs its own address; leave `ip` out to get a free one".into(),
                    ),
                );
                continue;
            }
            used.insert(ip, e.name.clone());
        }
    }
}

/// Final addresses of every NIC of every expanded node (`None` where unknown or exhausted).
fn allocate(
    expanded: &[Expanded],
    nodes: &[NodeDraft],
    nets: &[NetDraft],
    k8s: Option<&K8sDraft>,
    ctx: &mut Ctx<'_>,
) -> Vec<Vec<Option<Ipv4Addr>>> {
    let vip = k8s.and_then(|k| k.vip.as_ref().map(|(v, _)| *v));
    let pools: Vec<(Ipv4Network, Vec<Ipv4Addr>)> = nets
        .iter()
        .map(|n| {
            let cidr = n
                .cidr
                .as_ref()
                .map_or(Ipv4Network::from(Ipv4Addr::UNSPECIFIED), |(c, _)| *c);
            let reserved = n
                .gateway
                .into_iter()
                .chain(vip.filter(|v| cidr.contains(*v)))
                .collect();
            (cidr, reserved)
        })
        .collect();
    let mut requests = Vec::new();
    // (expanded index, nic index) per request, to put the answers back.
    let mut slots = Vec::new();
    for (ei, e) in expanded.iter().enumerate() {
        let d = &nodes[e.node];
        for (i, nic) in d.nics.iter().enumerate() {
            let Some(ni) = nic.net else { continue };
            if nets[ni].cidr.is_none() {
                continue;
            }
            let fixed = if nic.ip.is_some() {
                match fixed_ip(e, nic) {
                    Some(ip) => Some(ip),
                    None => continue,
                }
            } else {
                None
            };
            requests.push(ipam::Request { network: ni, fixed });
            slots.push((ei, i));
        }
    }
    let answers = ipam::assign(&pools, &requests);
    let mut out: Vec<Vec<Option<Ipv4Addr>>> = expanded
        .iter()
        .map(|e| vec![None; nodes[e.node].nics.len()])
        .collect();
    // One message per exhausted network: the NICs after the first would only repeat it.
    let mut exhausted: BTreeSet<usize> = BTreeSet::new();
    for ((ei, i), (req, ans)) in slots.into_iter().zip(requests.iter().zip(answers)) {
        match ans {
            Some(ip) => out[ei][i] = Some(ip),
            None if req.fixed.is_none() && exhausted.insert(req.network) => {
                let e = &expanded[ei];
                let d = &nodes[e.node];
                let net = &nets[req.network];
                let (cidr, _) = net.cidr.as_ref().map_or(
                    (Ipv4Network::from(Ipv4Addr::UNSPECIFIED), 0..0),
                    |(c, s)| (*c, s.clone()),
                );
                let wanted = requests.iter().filter(|r| r.network == req.network).count();
                ctx.report(
                        &d.nics[i].net_span,
                        &format!("nodes[{}].nics[{i}].network", d.index),
                        format!(
                            "node `{}`: network `{}` ({cidr}) has no free address left",
                            e.name, net.name
                        ),
                        Some(format!(
                            "{wanted} NICs need an address but {cidr} has {} usable (gateway and VIP excluded); use a larger network (a shorter prefix)",
                            ipam::host_count(cidr).saturating_sub(pools[req.network].1.len() as u64)
                        )),
                    );
            }
            None => {}
        }
    }
    out
}

/// kube-controller-manager's per-node pod range for IPv4 (`--node-cidr-mask-size`, which klab's
/// kubeadm configuration leaves at its default).
const NODE_POD_PREFIX: u8 = 24;

/// kubeadm refuses a pod range more than this many bits larger than the per-node range.
const POD_NODE_MAX_DIFF: u8 = 16;

/// The pod range must hold one /24 per Kubernetes node: kube-controller-manager hands every node a
/// /24 of it (and does not start with a pod range smaller than one /24), and Calico's IPAM takes its
/// /26 blocks from there. So `n` nodes need a prefix of at most `24 - ceil(log2 n)`.
fn check_pod_cidr_size(
    k: &K8sDraft,
    nodes: &[NodeDraft],
    expanded: &[Expanded],
    ctx: &mut Ctx<'_>,
) {
    let Some(pod) = k.pod else { return };
    let (span, shown) = match &k.pod_span {
        Some(s) => (s.clone(), format!("pod-cidr {pod}")),
        None => (k.span.clone(), format!("pod-cidr {pod} (the default)")),
    };
    if pod.prefix() + POD_NODE_MAX_DIFF < NODE_POD_PREFIX {
        ctx.report(
            &span,
            "kubernetes.pod-cidr",
            format!("[kubernetes] {shown} is too large"),
            Some(format!(
                "kubeadm takes a pod range at most {POD_NODE_MAX_DIFF} bits larger than the per-node /{NODE_POD_PREFIX}, so a /{} at most; e.g. pod-cidr = \"{}\"",
                NODE_POD_PREFIX - POD_NODE_MAX_DIFF,
                defaults::POD_CIDR
            )),
        );
        return;
    }
    let n = expanded
        .iter()
        .filter(|e| nodes[e.node].role != Role::None)
        .count()
        .max(1);
    let bits = u8::try_from(n.next_power_of_two().trailing_zeros()).unwrap_or(u8::MAX);
    let needed = NODE_POD_PREFIX.saturating_sub(bits);
    if pod.prefix() <= needed {
        return;
    }
    let nodes_word = if n == 1 { "node" } else { "nodes" };
    // The user's range widened to the size it needs.
    let example = Ipv4Network::new(pod.network(), needed)
        .and_then(|e| Ipv4Network::new(e.network(), needed))
        .map_or_else(|_| "10.244.0.0/16".to_string(), |e| e.to_string());
    ctx.report(
        &span,
        "kubernetes.pod-cidr",
        format!("[kubernetes] {shown} is too small for {n} Kubernetes {nodes_word}"),
        Some(format!(
            "kube-controller-manager gives every node a /{NODE_POD_PREFIX} of the pod range (Calico's /26 blocks come from it), so {n} {nodes_word} need a /{needed} or larger, e.g. pod-cidr = \"{example}\""
        )),
    );
}

/// kubeadm's bounds on the service range: at most 2^20 addresses (a /12), and room for the 10th
/// address, which it gives to CoreDNS (so a /28 at least).
fn check_service_cidr_size(k: &K8sDraft, ctx: &mut Ctx<'_>) {
    let Some(svc) = k.service else { return };
    let (span, shown) = match &k.service_span {
        Some(s) => (s.clone(), format!("service-cidr {svc}")),
        None => (k.span.clone(), format!("service-cidr {svc} (the default)")),
    };
    let problem = if svc.prefix() < 12 {
        "is too large: kubeadm takes at most a /12 (2^20 addresses)"
    } else if svc.prefix() > 28 {
        "is too small: kubeadm gives CoreDNS its 10th address, so it needs a /28 or larger"
    } else {
        return;
    };
    ctx.report(
        &span,
        "kubernetes.service-cidr",
        format!("[kubernetes] {shown} {problem}"),
        Some(format!(
            "e.g. service-cidr = \"{}\" (the default)",
            defaults::SERVICE_CIDR
        )),
    );
}

fn finish_kubernetes(
    k: K8sDraft,
    nodes: &[NodeDraft],
    expanded: &[Expanded],
    nets: &[NetDraft],
    ctx: &mut Ctx<'_>,
) -> Option<Kubernetes> {
    let cps: Vec<&Expanded> = expanded
        .iter()
        .filter(|e| nodes[e.node].role == Role::ControlPlane)
        .collect();
    let cp_written = nodes.iter().any(|d| d.role == Role::ControlPlane);
    if !cp_written {
        ctx.report(
            &k.span,
            "kubernetes",
            "[kubernetes] needs a node with role = \"control-plane\"".into(),
            Some("give one node role = \"control-plane\" (or remove [kubernetes] for a plain VM lab)".into()),
        );
    } else if cps.len() > 1 && k.vip.is_none() {
        let hint = match k.cluster.as_ref().and_then(|(i, _)| nets[*i].cidr.as_ref()) {
            Some((cidr, _)) => format!(
                "add control-plane-vip = \"<a free address of {cidr}>\" to [kubernetes]; the API server is reached through it"
            ),
            None => "add control-plane-vip to [kubernetes]; the API server is reached through it"
                .to_string(),
        };
        // A VIP that was written but rejected has its own message already.
        if ctx
            .diags
            .iter()
            .all(|d| d.field != "kubernetes.control-plane-vip")
        {
            ctx.report(
                &k.span,
                "kubernetes.control-plane-vip",
                format!(
                    "[kubernetes] {} control-plane nodes need a `control-plane-vip`",
                    cps.len()
                ),
                Some(hint),
            );
        }
    }
    let extra = k.extra?;
    Some(Kubernetes {
        version: k.version?,
        cluster_network: nets.get(k.cluster?.0)?.name.clone(),
        pod_cidr: k.pod?,
        service_cidr: k.service?,
        cni: k.cni?,
        control_plane_vip: k.vip.map(|(v, _)| v),
        calico_version: k.calico?,
        encapsulation: extra.encapsulation,
        package_repo: extra.package_repo,
        package_key: extra.package_key,
        image_repository: extra.image_repository,
        calico_manifest: extra.calico_manifest,
    })
    .filter(|_| k.cluster_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.10.1.0/24").unwrap().to_string(),
            "10.10.1.0/24"
        );
        assert_eq!(
            parse_cidr("10.10.1.5/24"),
            Err(CidrError::HostBits("10.10.1.0/24".parse().unwrap()))
        );
        assert_eq!(parse_cidr("10.10.1.0"), Err(CidrError::Syntax));
        assert_eq!(parse_cidr("10.10.1.0/33"), Err(CidrError::Syntax));
        assert_eq!(parse_cidr("10.10.1.0/"), Err(CidrError::Syntax));
        assert_eq!(parse_cidr("10.10.1/24"), Err(CidrError::Syntax));
        assert_eq!(parse_cidr("10.10.1.0/+4"), Err(CidrError::Syntax));
    }

    #[test]
    fn versions() {
        assert!(version_ok("1.32", 2..=3));
        assert!(version_ok("1.32.5", 2..=3));
        assert!(!version_ok("1", 2..=3));
        assert!(!version_ok("v1.32", 2..=3));
        assert!(!version_ok("1.032", 2..=3));
        assert!(!version_ok("1.32.", 2..=3));
        assert!(version_ok("3.29.3", 3..=3));
        assert!(!version_ok("3.29", 3..=3));
    }

    #[test]
    fn special_purpose_ranges() {
        let r = |s: &str| reserved_range(s.parse().unwrap()).map(|(w, n)| (w, n.to_string()));
        for private in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
        ] {
            assert_eq!(r(private), None, "{private}");
        }
        assert_eq!(r("127.1.0.0/16"), Some(("loopback", "127.0.0.0/8".into())));
        assert_eq!(
            r("0.0.0.0/0"),
            Some(("\"this network\"", "0.0.0.0/8".into()))
        );
        assert_eq!(
            r("255.255.255.252/30"),
            Some(("reserved", "240.0.0.0/4".into()))
        );
        assert_eq!(
            r("239.255.0.0/16"),
            Some(("multicast", "224.0.0.0/4".into()))
        );
        assert_eq!(
            r("169.254.169.0/24"),
            Some(("link-local", "169.254.0.0/16".into()))
        );
    }

    /// A lab with `workers` workers (plus one control plane) and the given pod range.
    fn k8s_lab(workers: u32, pod: &str) -> String {
        format!(
            "name = \"t\"\n[networks.c]\nmode = \"isolated\"\ncidr = \"10.0.0.0/16\"\n\
             [[nodes]]\nname = \"cp\"\nrole = \"control-plane\"\nnics = [ {{ network = \"c\" }} ]\n\
             [[nodes]]\nname = \"w\"\ncount = {workers}\nrole = \"worker\"\nnics = [ {{ network = \"c\" }} ]\n\
             [kubernetes]\nversion = \"1.32\"\ncluster-network = \"c\"\npod-cidr = \"{pod}\"\n"
        )
    }

    fn parse(src: &str) -> Result<Lab, String> {
        let mut ctx = Ctx::new(src, "t.toml");
        let cfg: LabConfig = toml::from_str(src).map_err(|e| e.to_string())?;
        match validate(&cfg, &mut ctx) {
            Some(lab) if ctx.diags.is_empty() => Ok(lab),
            _ => Err(ctx
                .diags
                .iter()
                .map(|d| d.message.clone())
                .collect::<Vec<_>>()
                .join("\n")),
        }
    }

    #[test]
    fn the_pod_range_holds_a_slash_24_per_kubernetes_node() {
        // 2 nodes need a /23, 4 a /22, 256 a /16, 257 a /15.
        assert!(parse(&k8s_lab(1, "10.244.0.0/23")).is_ok());
        assert_eq!(
            parse(&k8s_lab(1, "10.244.0.0/24")).unwrap_err(),
            "[kubernetes] pod-cidr 10.244.0.0/24 is too small for 2 Kubernetes nodes"
        );
        assert!(parse(&k8s_lab(3, "10.244.0.0/22")).is_ok());
        assert!(parse(&k8s_lab(4, "10.244.0.0/22")).is_err());
        assert!(parse(&k8s_lab(255, "10.244.0.0/16")).is_ok());
        assert_eq!(
            parse(&k8s_lab(256, "10.244.0.0/16")).unwrap_err(),
            "[kubernetes] pod-cidr 10.244.0.0/16 is too small for 257 Kubernetes nodes"
        );
        assert!(parse(&k8s_lab(256, "10.244.0.0/15")).is_ok());
    }

    #[test]
    fn a_host_holds_at_most_512_nodes() {
        let lab = |count: u32, extra: &str| {
            format!(
                "name = \"t\"\n[networks.n]\nmode = \"isolated\"\ncidr = \"10.0.0.0/16\"\n\
                 [[nodes]]\nname = \"v\"\ncount = {count}\nnics = [ {{ network = \"n\" }} ]\n{extra}"
            )
        };
        assert_eq!(parse(&lab(512, "")).unwrap().nodes.len(), 512);
        let one_more = "[[nodes]]\nname = \"x\"\nnics = [ { network = \"n\" } ]\n";
        assert_eq!(
            parse(&lab(512, one_more)).unwrap_err(),
            "the lab has 513 nodes; klab runs at most 512 on one host"
        );
        assert_eq!(
            parse(&lab(513, "")).unwrap_err(),
            "node `v`: count 513 is out of range"
        );
    }

    #[test]
    fn timeouts_are_at_most_a_day() {
        let lab = |ssh: &str| {
            format!(
                "name = \"t\"\n[networks.n]\nmode = \"isolated\"\ncidr = \"10.0.0.0/24\"\n\
                 [[nodes]]\nname = \"v\"\nnics = [ {{ network = \"n\" }} ]\n[timeouts]\nssh = {ssh}\n"
            )
        };
        assert_eq!(
            parse(&lab("\"24h\"")).unwrap().timeouts.ssh,
            Duration::from_secs(86400)
        );
        assert_eq!(
            parse(&lab("86401")).unwrap_err(),
            "[timeouts] `ssh` 86401 is longer than 24h"
        );
        assert_eq!(
            parse(&lab("9223372036854775807")).unwrap_err(),
            "[timeouts] `ssh` 9223372036854775807 is longer than 24h"
        );
    }

    #[test]
    fn positions_count_characters() {
        let ctx = Ctx::new("a = 1\nné = \"x\"\n", "f");
        assert_eq!(ctx.position(0), (1, 1));
        assert_eq!(ctx.position(6), (2, 1));
        // `=` after the two-byte `é`.
        assert_eq!(ctx.position(10), (2, 4));
    }
}
