//! PURE rendering: plan → libvirt XML and cloud-init files, from minijinja templates embedded in the
//! binary (`network-templates/`, `cloud-init/`) and optionally overridden by name. Never reads files:
//! the CLI reads `--templates DIR` and passes the contents in.

mod filters;
pub mod powershell;
mod value;

pub use filters::{xml_escape, yaml_quote};

use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

use crate::model::{Accel, NetworkMode};
use crate::plan::provision::{self, FileContent, Op, ProvisionPlan, template, value as pv};
use crate::plan::{
    API_PORT, KeyMaterial, KubernetesSpec, LabPlan, NetworkSpec, NodeSpec, OWNER_NS, OWNER_PREFIX,
};

pub const NETWORK_NAT: &str = "network-nat.xml.j2";
pub const NETWORK_BRIDGE: &str = "network-bridge.xml.j2";
pub const NETWORK_ISOLATED: &str = "network-isolated.xml.j2";
pub const DOMAIN: &str = "domain.xml.j2";
pub const POOL: &str = "pool.xml.j2";
pub const VOLUME_OVERLAY: &str = "volume-overlay.xml.j2";
pub const SNAPSHOT: &str = "snapshot.xml.j2";
pub const META_DATA: &str = "meta-data.j2";
pub const USER_DATA: &str = "user-data.j2";
pub const NETWORK_CONFIG: &str = "network-config.j2";

/// Every built-in template: (file name, source).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        NETWORK_NAT,
        include_str!("../../network-templates/network-nat.xml.j2"),
    ),
    (
        NETWORK_BRIDGE,
        include_str!("../../network-templates/network-bridge.xml.j2"),
    ),
    (
        NETWORK_ISOLATED,
        include_str!("../../network-templates/network-isolated.xml.j2"),
    ),
    (
        DOMAIN,
        include_str!("../../network-templates/domain.xml.j2"),
    ),
    (POOL, include_str!("../../network-templates/pool.xml.j2")),
    (
        SNAPSHOT,
        include_str!("../../network-templates/snapshot.xml.j2"),
    ),
    (
        VOLUME_OVERLAY,
        include_str!("../../network-templates/volume-overlay.xml.j2"),
    ),
    (META_DATA, include_str!("../../cloud-init/meta-data.j2")),
    (USER_DATA, include_str!("../../cloud-init/user-data.j2")),
    (
        NETWORK_CONFIG,
        include_str!("../../cloud-init/network-config.j2"),
    ),
    (
        template::KUBEADM_INIT,
        include_str!("../../kubeadm/kubeadm-init.yaml.j2"),
    ),
    (
        template::KUBEADM_JOIN,
        include_str!("../../kubeadm/kubeadm-join.yaml.j2"),
    ),
    (
        template::CONTAINERD_1,
        include_str!("../../containerd/containerd-1.toml.j2"),
    ),
    (
        template::CONTAINERD_2,
        include_str!("../../containerd/containerd-2.toml.j2"),
    ),
    (
        template::CRICTL,
        include_str!("../../containerd/crictl.yaml.j2"),
    ),
    (
        template::CALICO_KUSTOMIZATION,
        include_str!("../../calico/calico-kustomization.yaml.j2"),
    ),
    (
        template::CALICO_NODE_PATCH,
        include_str!("../../calico/calico-node-patch.yaml.j2"),
    ),
    (
        template::KEEPALIVED,
        include_str!("../../vip/keepalived.conf.j2"),
    ),
    (
        template::CHECK_APISERVER,
        include_str!("../../vip/check-apiserver.sh.j2"),
    ),
];

/// Every embedded template: [`BUILTIN`] plus the Hyper-V backend's `powershell/` scripts.
fn all_builtin() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    BUILTIN.iter().chain(powershell::BUILTIN_PS)
}

/// Stand-ins rendered when no key material exists yet (`klab plan`/`render` before `up`).
pub const PLACEHOLDER_USER_KEY: &str = "ssh-ed25519 AAAA-placeholder-generated-at-klab-up";
pub const PLACEHOLDER_HOST_PUBLIC: &str =
    "ssh-ed25519 AAAA-placeholder-host-key-generated-at-klab-up";
pub const PLACEHOLDER_HOST_PRIVATE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nplaceholder-generated-at-klab-up\n-----END OPENSSH PRIVATE KEY-----\n";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("unknown template `{name}` (templates are: {known})")]
    UnknownTemplate { name: String, known: String },
    #[error("template `{name}` has a syntax error")]
    Parse {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("rendering `{template}` for {object} failed")]
    Render {
        template: String,
        object: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("no host key for node `{node}` in the lab's key material")]
    MissingHostKey { node: String },
}

/// The template set: built-ins with optional overrides, compiled once.
pub struct Templates {
    env: Environment<'static>,
    overridden: Vec<String>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("overridden", &self.overridden)
            .finish()
    }
}

impl Templates {
    /// Built-ins, with `overrides` (template file name → source) replacing the ones they name.
    pub fn new(overrides: BTreeMap<String, String>) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .map_err(|source| RenderError::Parse {
                name: "<syntax>".into(),
                source,
            })?;
        env.set_syntax(syntax);
        env.add_filter("xml", filters::xml);
        env.add_filter("yaml", filters::yaml);
        env.add_filter("ps", powershell::ps_filter);

        for name in overrides.keys() {
            if !all_builtin().any(|(n, _)| n == name) {
                return Err(RenderError::UnknownTemplate {
                    name: name.clone(),
                    known: all_builtin()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let overridden: Vec<String> = overrides.keys().cloned().collect();
        let mut overrides = overrides;
        for (name, builtin) in all_builtin() {
            let source = overrides
                .remove(*name)
                .unwrap_or_else(|| (*builtin).to_string());
            env.add_template_owned(*name, source)
                .map_err(|source| RenderError::Parse {
                    name: (*name).to_string(),
                    source,
                })?;
        }
        Ok(Self { env, overridden })
    }

    /// The embedded templates only.
    pub fn builtin() -> Result<Self, RenderError> {
        Self::new(BTreeMap::new())
    }

    /// Names of the templates that were overridden.
    pub fn overridden(&self) -> &[String] {
        &self.overridden
    }

    /// The `<domainsnapshot>` XML for snapshot `name` of `node` in `lab`.
    pub fn snapshot_xml(&self, lab: &str, node: &str, name: &str) -> Result<String, RenderError> {
        self.render(
            SNAPSHOT,
            &format!("snapshot `{name}` of node `{node}`"),
            minijinja::context! { lab => lab, node => node, name => name },
        )
    }

    fn render(&self, template: &str, object: &str, ctx: Value) -> Result<String, RenderError> {
        let err = |source| RenderError::Render {
            template: template.to_string(),
            object: object.to_string(),
            source,
        };
        self.env
            .get_template(template)
            .and_then(|t| t.render(ctx))
            .map_err(err)
    }
}

/// cloud-init NoCloud seed contents of one node.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    /// Holds the node's private host key: never log it.
    pub user_data: String,
    pub network_config: String,
}

impl std::fmt::Debug for SeedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedFiles")
            .field("meta_data", &self.meta_data)
            .field(
                "user_data",
                &format_args!("<{} bytes>", self.user_data.len()),
            )
            .field("network_config", &self.network_config)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedNode {
    pub name: String,
    pub domain_xml: String,
    pub overlay_xml: String,
    pub seed: SeedFiles,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedLab {
    /// Pool XML when klab creates the pool.
    pub pool: Option<String>,
    /// (libvirt network name, network XML), in plan order.
    pub networks: Vec<(String, String)>,
    pub nodes: Vec<RenderedNode>,
    /// Every provisioning file with text content (secrets stay `${klab:…}` markers).
    pub provision: Vec<ProvisionFile>,
}

/// One file a provisioning phase writes on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionFile {
    pub node: String,
    pub phase: String,
    /// Path on the node.
    pub path: String,
    /// `Some("containerd-major=1")` when the file is one of several variants for one path.
    pub variant: Option<String>,
    pub mode: u32,
    pub content: String,
}

impl RenderedLab {
    /// Every rendered file as (relative path, content), for `klab render --out DIR`.
    pub fn files(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(pool) = &self.pool {
            out.push(("pool.xml".to_string(), pool.clone()));
        }
        for (name, xml) in &self.networks {
            out.push((format!("networks/{name}.xml"), xml.clone()));
        }
        for n in &self.nodes {
            let dir = format!("nodes/{}", n.name);
            out.push((format!("{dir}/domain.xml"), n.domain_xml.clone()));
            out.push((format!("{dir}/overlay.xml"), n.overlay_xml.clone()));
            out.push((
                format!("{dir}/cloud-init/meta-data"),
                n.seed.meta_data.clone(),
            ));
            out.push((
                format!("{dir}/cloud-init/user-data"),
                n.seed.user_data.clone(),
            ));
            out.push((
                format!("{dir}/cloud-init/network-config"),
                n.seed.network_config.clone(),
            ));
        }
        for f in &self.provision {
            let mut rel = format!("nodes/{}/provision{}", f.node, f.path);
            if let Some(v) = &f.variant {
                rel.push('.');
                rel.push_str(&v.replace('=', "-"));
            }
            out.push((rel, f.content.clone()));
        }
        out
    }
}

/// Render every libvirt object and seed of the plan. `keys = None` renders marked placeholders.
pub fn render_lab(
    plan: &LabPlan,
    keys: Option<&KeyMaterial>,
    t: &Templates,
) -> Result<RenderedLab, RenderError> {
    let ctx = minijinja::context! { lab => &plan.lab, pool => value::to_value(&plan.pool) };
    let pool = Some(t.render(POOL, &format!("pool `{}`", plan.pool.name), ctx)?);
    let networks = plan
        .networks
        .iter()
        .map(|n| Ok((n.name.clone(), render_network(plan, n, t)?)))
        .collect::<Result<Vec<_>, RenderError>>()?;
    let kubernetes = slim_kubernetes(plan);
    let shared = Shared {
        hosts: value::to_value(&plan.hosts),
        etc_hosts: Value::from(etc_hosts(plan)),
        pool: value::to_value(&plan.pool),
        kubernetes: value::to_value(&kubernetes),
    };
    let nodes = plan
        .nodes
        .iter()
        .map(|n| render_node(plan, n, keys, &shared, t))
        .collect::<Result<Vec<_>, RenderError>>()?;
    let provision = match resolve_with(plan, &shared.kubernetes, t)? {
        Some(p) => provision_files(&p),
        None => Vec::new(),
    };
    Ok(RenderedLab {
        pool,
        networks,
        nodes,
        provision,
    })
}

/// The Kubernetes spec without its phases: what templates see as `kubernetes`.
fn slim_kubernetes(plan: &LabPlan) -> Option<KubernetesSpec> {
    plan.kubernetes.as_ref().map(|k| KubernetesSpec {
        provision: ProvisionPlan::default(),
        ..k.clone()
    })
}

/// The plan's provisioning phases with every template rendered into text: what the runner runs.
/// `None` for a plain VM lab.
pub fn resolve_provision(
    plan: &LabPlan,
    t: &Templates,
) -> Result<Option<ProvisionPlan>, RenderError> {
    let kubernetes = value::to_value(&slim_kubernetes(plan));
    resolve_with(plan, &kubernetes, t)
}

fn resolve_with(
    plan: &LabPlan,
    kubernetes: &Value,
    t: &Templates,
) -> Result<Option<ProvisionPlan>, RenderError> {
    let Some(k) = &plan.kubernetes else {
        return Ok(None);
    };
    let mut out = k.provision.clone();
    let version = k
        .patch_version
        .clone()
        .unwrap_or_else(|| provision::marker(pv::KUBERNETES_VERSION));
    let refs = minijinja::context! {
        bootstrap_token => provision::marker(pv::BOOTSTRAP_TOKEN),
        certificate_key => provision::marker(pv::CERTIFICATE_KEY),
        ca_cert_hash => provision::marker(pv::CA_CERT_HASH),
        sandbox_image => provision::marker(pv::SANDBOX_IMAGE),
        vrrp_password => provision::marker(pv::VRRP_PASSWORD),
    };
    let (ipip, vxlan) = provision::calico_pool_modes(k.encapsulation);
    let cluster_prefix = plan
        .network(&k.cluster_network)
        .map(|n| n.prefix)
        .unwrap_or(32);
    for phase in &mut out.phases {
        for np in &mut phase.nodes {
            let has_template = np.ops.iter().any(
                |op| matches!(op, Op::File(f) if matches!(f.content, FileContent::Template { .. })),
            );
            let Some(node) = plan.node(&np.node).filter(|_| has_template) else {
                continue;
            };
            let object = format!("node `{}` ({})", node.name, phase.id.as_str());
            let cp_index = k.control_planes.iter().position(|c| *c == node.name);
            let peers: Vec<String> = k
                .control_planes
                .iter()
                .filter(|c| **c != node.name)
                .filter_map(|c| plan.node(c).map(|n| n.cluster_ip.to_string()))
                .collect();
            let ctx = minijinja::context! {
                lab => &plan.lab,
                node => value::to_value(node),
                kubernetes => kubernetes.clone(),
                k8s_version => &version,
                refs => refs.clone(),
                api_port => API_PORT,
                cri_socket => provision::CRI_SOCKET,
                control_plane => cp_index.is_some(),
                // With no workers the control planes must take pods (v1beta4: `taints: []`).
                schedulable_control_planes => k.workers.is_empty(),
                pool_ipip => ipip,
                pool_vxlan => vxlan,
                cluster_prefix => cluster_prefix,
                vrrp_router_id => provision::vrrp_router_id(&plan.lab),
                vrrp_priority => 150 - cp_index.unwrap_or(0).min(100) as u32,
                vrrp_peers => peers,
            };
            for op in &mut np.ops {
                if let Op::File(f) = op
                    && let FileContent::Template { template } = &f.content
                {
                    let text = t.render(template, &object, ctx.clone())?;
                    f.content = FileContent::Text { text };
                }
            }
        }
    }
    Ok(Some(out))
}

/// Every file op with text content, per node; variants of one path are told apart.
fn provision_files(p: &ProvisionPlan) -> Vec<ProvisionFile> {
    let mut out = Vec::new();
    for phase in &p.phases {
        for np in &phase.nodes {
            let files: Vec<&provision::FileOp> = np
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::File(f) => Some(f),
                    Op::Run(_) => None,
                })
                .collect();
            for f in &files {
                let FileContent::Text { text } = &f.content else {
                    continue;
                };
                let shared_path = files.iter().filter(|g| g.path == f.path).count() > 1;
                let variant = f
                    .when
                    .as_ref()
                    .filter(|_| shared_path)
                    .map(|w| format!("{}={}", w.value, w.is.join(",")));
                out.push(ProvisionFile {
                    node: np.node.clone(),
                    phase: phase.id.as_str().to_string(),
                    path: f.path.clone(),
                    variant,
                    mode: f.mode,
                    content: text.clone(),
                });
            }
        }
    }
    out
}

/// Template values every node shares, converted once per lab rather than once per node.
struct Shared {
    hosts: Value,
    etc_hosts: Value,
    pool: Value,
    kubernetes: Value,
}

/// The full `/etc/hosts` every node gets: loopback lines, then the plan's entries.
pub fn etc_hosts(plan: &LabPlan) -> String {
    let mut out = String::from(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n",
    );
    for h in &plan.hosts {
        out.push_str(&h.ip.to_string());
        for n in &h.names {
            out.push(' ');
            out.push_str(n);
        }
        out.push('\n');
    }
    out
}

fn render_network(plan: &LabPlan, n: &NetworkSpec, t: &Templates) -> Result<String, RenderError> {
    let template = match n.mode {
        NetworkMode::Nat => NETWORK_NAT,
        NetworkMode::Bridge => NETWORK_BRIDGE,
        NetworkMode::Isolated => NETWORK_ISOLATED,
    };
    let ctx = minijinja::context! {
        lab => &plan.lab,
        owner_ns => OWNER_NS,
        owner_prefix => OWNER_PREFIX,
        network => value::to_value(n),
    };
    t.render(template, &format!("network `{}`", n.key), ctx)
}

fn render_node(
    plan: &LabPlan,
    node: &NodeSpec,
    keys: Option<&KeyMaterial>,
    shared: &Shared,
    t: &Templates,
) -> Result<RenderedNode, RenderError> {
    let object = format!("node `{}`", node.name);
    let (user_key, host_private, host_public) = match keys {
        Some(k) => {
            let (_, hk) = k
                .host_keys
                .iter()
                .find(|(n, _)| *n == node.name)
                .ok_or_else(|| RenderError::MissingHostKey {
                    node: node.name.clone(),
                })?;
            (
                k.user_public_key.as_str(),
                hk.private_openssh.as_str(),
                hk.public_openssh.as_str(),
            )
        }
        None => (
            PLACEHOLDER_USER_KEY,
            PLACEHOLDER_HOST_PRIVATE,
            PLACEHOLDER_HOST_PUBLIC,
        ),
    };
    let image = plan.images.iter().find(|i| i.key == node.image);
    // `auto` that was not resolved against the hypervisor renders TCG: it works everywhere.
    let kvm = plan.accel == Accel::Kvm;
    let node_value = value::to_value(node);

    let domain_ctx = minijinja::context! {
        lab => &plan.lab,
        owner_ns => OWNER_NS,
        owner_prefix => OWNER_PREFIX,
        node => node_value.clone(),
        image => value::to_value(&image),
        pool => shared.pool.clone(),
        domain_type => if kvm { "kvm" } else { "qemu" },
        cpu_passthrough => kvm,
    };
    let domain_xml = t.render(DOMAIN, &object, domain_ctx)?;
    let overlay_xml = t.render(
        VOLUME_OVERLAY,
        &object,
        minijinja::context! { lab => &plan.lab, node => node_value.clone(), volume => value::to_value(&node.overlay) },
    )?;
    let seed_ctx = minijinja::context! {
        lab => &plan.lab,
        node => node_value,
        hosts => shared.hosts.clone(),
        etc_hosts => shared.etc_hosts.clone(),
        user_public_key => user_key,
        host_key => minijinja::context! { private => host_private, public => host_public },
        kubernetes => shared.kubernetes.clone(),
    };
    Ok(RenderedNode {
        name: node.name.clone(),
        domain_xml,
        overlay_xml,
        seed: SeedFiles {
            meta_data: t.render(META_DATA, &object, seed_ctx.clone())?,
            user_data: t.render(USER_DATA, &object, seed_ctx.clone())?,
            network_config: t.render(NETWORK_CONFIG, &object, seed_ctx)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{fixtures, plan};

    fn planned(lab: &crate::model::Lab) -> LabPlan {
        plan(lab, &fixtures::inputs(&lab.name))
    }

    fn builtin() -> Templates {
        Templates::builtin().expect("builtin templates parse")
    }

    #[test]
    fn renders_every_object_of_the_plan() {
        let lab = fixtures::ha_lab();
        let p = planned(&lab);
        let r = render_lab(&p, None, &builtin()).expect("render");
        assert!(
            r.pool
                .as_deref()
                .is_some_and(|x| x.contains("<name>klab-demo</name>"))
        );
        let names: Vec<&str> = r.networks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["klab-demo-cluster", "klab-demo-lan", "klab-demo-outside"]
        );
        assert_eq!(r.nodes.len(), 5);
        let files = r.files();
        // Provisioning: per node modules, sysctls, apt source, dnf repo, Docker repo, containerd 1.x
        // and 2.x, crictl (8 × 5); keepalived + check on 3 control planes; init.yaml; 4 join.yaml;
        // 2 Calico files. The CA and the Calico manifest are run-time values, not rendered.
        assert_eq!(files.len(), 1 + 3 + 5 * 5 + 8 * 5 + 2 * 3 + 1 + 4 + 2);
        assert!(
            files
                .iter()
                .any(|(p, _)| p
                    == "nodes/cp1/provision/etc/containerd/config.toml.containerd-major-2")
        );
        assert!(
            files
                .iter()
                .any(|(p, _)| p == "nodes/w1/cloud-init/network-config")
        );
        assert!(files.iter().any(|(p, _)| p == "networks/klab-demo-lan.xml"));
    }

    #[test]
    fn network_modes_pick_their_templates() {
        let p = planned(&fixtures::ha_lab());
        let r = render_lab(&p, None, &builtin()).expect("render");
        let get = |n: &str| &r.networks.iter().find(|(x, _)| x == n).expect("network").1;
        let nat = get("klab-demo-outside");
        assert!(nat.contains("<forward mode='nat'>"));
        assert!(!nat.contains("<dhcp"));
        assert!(nat.contains("<ip address='192.168.150.1' netmask='255.255.255.0'/>"));
        let iso = get("klab-demo-cluster");
        assert!(!iso.contains("<forward"));
        assert!(iso.contains("<dns enable='no'/>") && iso.contains("<mtu size='1450'/>"));
        let br = get("klab-demo-lan");
        assert!(br.contains("<forward mode='bridge'/>") && br.contains("<bridge name='br0'/>"));
        assert!(!br.contains("<ip"));
    }

    #[test]
    fn domain_xml_reflects_node_image_and_accel() {
        let p = planned(&fixtures::ha_lab());
        let r = render_lab(&p, None, &builtin()).expect("render");
        let cp1 = &r.nodes[0].domain_xml;
        assert!(cp1.starts_with("<domain type='qemu'>"));
        assert!(!cp1.contains("host-passthrough"));
        assert!(cp1.contains("<memory unit='MiB'>4096</memory>"));
        assert!(cp1.contains("<source file='/var/lib/klab/pools/demo/cp1.qcow2'/>"));
        assert!(cp1.contains("<boot dev='hd'/>") && !cp1.contains("<kernel>"));
        assert!(cp1.contains("<log file='/var/lib/klab/console/klab-demo-cp1.log' append='off'/>"));
        let w1 = &r.nodes[3].domain_xml;
        assert!(w1.contains("<kernel>/var/lib/klab/images/custom.vmlinuz</kernel>"));
        assert!(w1.contains("<cmdline>root=/dev/vda rw console=ttyS0 ds=nocloud</cmdline>"));
        assert_eq!(w1.matches("<interface type='network'>").count(), 3);
        // Every lab has its own pool, so disks are files at known paths.
        let plain = planned(&fixtures::plain_lab());
        let r = render_lab(&plain, None, &builtin()).expect("render");
        assert!(r.pool.is_some());
        assert!(
            r.nodes[0]
                .domain_xml
                .contains("<source file='/var/lib/klab/pools/plain/vm1.qcow2'/>")
        );
    }

    #[test]
    fn user_controlled_values_are_escaped() {
        let mut p = planned(&fixtures::ha_lab());
        p.nodes[0].console_log = "/tmp/a&b<c>'d\".log".into();
        p.nodes[0].user = "we\"ird\nuser".into();
        let r = render_lab(&p, None, &builtin()).expect("render");
        assert!(
            r.nodes[0]
                .domain_xml
                .contains("/tmp/a&amp;b&lt;c&gt;&apos;d&quot;.log")
        );
        assert!(
            r.nodes[0]
                .seed
                .user_data
                .contains("- name: \"we\\\"ird\\nuser\"")
        );
    }

    #[test]
    fn keys_are_rendered_or_marked_placeholders() {
        let lab = fixtures::ha_lab();
        let p = planned(&lab);
        let keys = fixtures::test_keys(&lab);
        let r = render_lab(&p, Some(&keys), &builtin()).expect("render");
        let ud = &r.nodes[1].seed.user_data;
        assert!(ud.contains("FAKE-TEST-HOST-KEY-cp2"));
        assert!(ud.contains(&keys.user_public_key));
        assert!(!ud.contains("placeholder"));
        let r = render_lab(&p, None, &builtin()).expect("render");
        assert!(r.nodes[1].seed.user_data.contains(PLACEHOLDER_USER_KEY));
        assert!(
            r.nodes[1]
                .seed
                .user_data
                .contains("placeholder-host-key-generated-at-klab-up")
        );
        // Debug never shows the user-data (it holds the private host key).
        let dbg = format!("{:?}", r.nodes[1].seed);
        assert!(!dbg.contains("PRIVATE KEY") && dbg.contains("bytes>"));
    }

    #[test]
    fn missing_host_key_is_an_error_naming_the_node() {
        let lab = fixtures::ha_lab();
        let p = planned(&lab);
        let mut keys = fixtures::test_keys(&lab);
        keys.host_keys.retain(|(n, _)| n != "w2");
        let err = render_lab(&p, Some(&keys), &builtin()).expect_err("must fail");
        assert!(matches!(&err, RenderError::MissingHostKey { node } if node == "w2"));
        assert!(err.to_string().contains("`w2`"));
    }

    #[test]
    fn overrides_replace_builtins_and_unknown_names_are_refused() {
        let p = planned(&fixtures::ha_lab());
        let mut o = BTreeMap::new();
        o.insert(
            META_DATA.to_string(),
            "id: {{ node.instance_id | yaml }}\n".to_string(),
        );
        let t = Templates::new(o).expect("override parses");
        assert_eq!(t.overridden(), [META_DATA]);
        let r = render_lab(&p, None, &t).expect("render");
        assert_eq!(
            r.nodes[0].seed.meta_data,
            format!("id: \"{}\"\n", p.nodes[0].instance_id)
        );

        let mut o = BTreeMap::new();
        o.insert("nope.j2".to_string(), String::new());
        let err = Templates::new(o).expect_err("unknown name");
        assert!(matches!(&err, RenderError::UnknownTemplate { name, .. } if name == "nope.j2"));
        assert!(err.to_string().contains(USER_DATA));

        let mut o = BTreeMap::new();
        o.insert(DOMAIN.to_string(), "{% if %}".to_string());
        assert!(
            matches!(Templates::new(o), Err(RenderError::Parse { name, .. }) if name == DOMAIN)
        );
    }

    #[test]
    fn provisioning_templates_are_overridable() {
        let p = planned(&fixtures::ha_lab());
        let mut o = BTreeMap::new();
        o.insert(
            template::CRICTL.to_string(),
            "runtime-endpoint: {{ cri_socket }}\ntimeout: 30\n".to_string(),
        );
        let r = render_lab(&p, None, &Templates::new(o).expect("parses")).expect("render");
        let crictl = r
            .files()
            .into_iter()
            .find(|(path, _)| path == "nodes/w2/provision/etc/crictl.yaml")
            .expect("crictl.yaml");
        assert_eq!(
            crictl.1,
            "runtime-endpoint: unix:///run/containerd/containerd.sock\ntimeout: 30\n"
        );
        let resolved = resolve_provision(&p, &builtin())
            .expect("render")
            .expect("kubernetes");
        assert!(resolved.phases.iter().all(|ph| ph.nodes.iter().all(|n| n
            .ops
            .iter()
            .all(|op| !matches!(op, Op::File(f) if matches!(f.content, FileContent::Template { .. }))))));
        assert_eq!(
            resolve_provision(&planned(&fixtures::plain_lab()), &builtin()).expect("ok"),
            None
        );
    }

    #[test]
    fn undefined_values_are_errors_not_empty_strings() {
        let p = planned(&fixtures::ha_lab());
        let mut o = BTreeMap::new();
        o.insert(
            USER_DATA.to_string(),
            "{{ node.no_such_field }}".to_string(),
        );
        let t = Templates::new(o).expect("parses");
        let err = render_lab(&p, None, &t).expect_err("strict undefined");
        assert!(
            matches!(&err, RenderError::Render { template, object, .. } if template == USER_DATA && object == "node `cp1`"),
            "{err:?}"
        );
        let mut o = BTreeMap::new();
        o.insert(
            META_DATA.to_string(),
            "{{ node.nics[0].gateway | yaml }}{{ node.nics[1].gateway | yaml }}".to_string(),
        );
        let t = Templates::new(o).expect("parses");
        assert!(render_lab(&p, None, &t).is_err(), "yaml of none must fail");
    }

    #[test]
    fn templates_keep_trailing_newline_and_trim_blocks() {
        let p = planned(&fixtures::ha_lab());
        let r = render_lab(&p, None, &builtin()).expect("render");
        for (path, content) in r.files() {
            assert!(content.ends_with('\n'), "{path} lacks its final newline");
            assert!(!content.contains("\n\n\n"), "{path} has stray blank lines");
            assert!(!content.contains("{%") && !content.contains("{{"), "{path}");
        }
    }
}
