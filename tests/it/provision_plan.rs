//! The provisioning phases and kubeadm/Calico/containerd files of every Kubernetes lab: explicit
//! checks of what pins the cluster to the cluster network, and every kubeadm document round-tripped
//! through a test-only mirror of the v1beta4 types (kubeadm itself only warns on unknown fields).

use klab::plan::LabPlan;
use klab::plan::provision::{FileContent, Op, PhaseId, Schedule, value};
use klab::render::{self, Templates};

use super::labs_plan::{cases, render_with_test_keys};

/// kubeadm.k8s.io/v1beta4, field names from `cmd/kubeadm/app/apis/kubeadm/v1beta4/types.go`
/// (and `bootstraptoken/v1`). Every field is optional here: the point is that nothing unknown,
/// misspelt or mistyped gets through.
mod v1beta4 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InitConfiguration {
        pub api_version: String,
        pub kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bootstrap_tokens: Option<Vec<BootstrapToken>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub dry_run: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_registration: Option<NodeRegistrationOptions>,
        #[serde(rename = "localAPIEndpoint", skip_serializing_if = "Option::is_none")]
        pub local_api_endpoint: Option<ApiEndpoint>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub certificate_key: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub skip_phases: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub patches: Option<Patches>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeouts: Option<Timeouts>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ClusterConfiguration {
        pub api_version: String,
        pub kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub etcd: Option<Etcd>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub networking: Option<Networking>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub kubernetes_version: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub control_plane_endpoint: Option<String>,
        #[serde(rename = "apiServer", skip_serializing_if = "Option::is_none")]
        pub api_server: Option<ApiServer>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub controller_manager: Option<ControlPlaneComponent>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub scheduler: Option<ControlPlaneComponent>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub dns: Option<Dns>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub proxy: Option<Proxy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub certificates_dir: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_repository: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub feature_gates: Option<std::collections::BTreeMap<String, bool>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cluster_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub encryption_algorithm: Option<EncryptionAlgorithm>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub certificate_validity_period: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ca_certificate_validity_period: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub enum EncryptionAlgorithm {
        #[serde(rename = "RSA-2048")]
        Rsa2048,
        #[serde(rename = "RSA-3072")]
        Rsa3072,
        #[serde(rename = "RSA-4096")]
        Rsa4096,
        #[serde(rename = "ECDSA-P256")]
        EcdsaP256,
        #[serde(rename = "ECDSA-P384")]
        EcdsaP384,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct JoinConfiguration {
        pub api_version: String,
        pub kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub dry_run: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_registration: Option<NodeRegistrationOptions>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ca_cert_path: Option<String>,
        /// Required by kubeadm.
        pub discovery: Discovery,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub control_plane: Option<JoinControlPlane>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub skip_phases: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub patches: Option<Patches>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeouts: Option<Timeouts>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct NodeRegistrationOptions {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cri_socket: Option<String>,
        /// No omitempty upstream: absent = the default control-plane taint, `[]` = none.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub taints: Option<Vec<Taint>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub kubelet_extra_args: Option<Vec<Arg>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ignore_preflight_errors: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_pull_policy: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_pull_serial: Option<bool>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Taint {
        pub key: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub value: Option<String>,
        pub effect: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub time_added: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ApiEndpoint {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub advertise_address: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bind_port: Option<i32>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Discovery {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bootstrap_token: Option<BootstrapTokenDiscovery>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub file: Option<FileDiscovery>,
        #[serde(rename = "tlsBootstrapToken", skip_serializing_if = "Option::is_none")]
        pub tls_bootstrap_token: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct BootstrapTokenDiscovery {
        pub token: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub api_server_endpoint: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ca_cert_hashes: Option<Vec<String>>,
        #[serde(
            rename = "unsafeSkipCAVerification",
            skip_serializing_if = "Option::is_none"
        )]
        pub unsafe_skip_ca_verification: Option<bool>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct FileDiscovery {
        pub kube_config_path: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct JoinControlPlane {
        #[serde(rename = "localAPIEndpoint", skip_serializing_if = "Option::is_none")]
        pub local_api_endpoint: Option<ApiEndpoint>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub certificate_key: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Networking {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub service_subnet: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub pod_subnet: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub dns_domain: Option<String>,
    }

    /// ControlPlaneComponent inlined, plus certSANs.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ApiServer {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_args: Option<Vec<Arg>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_volumes: Option<Vec<HostPathMount>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_envs: Option<Vec<EnvVar>>,
        #[serde(rename = "certSANs", skip_serializing_if = "Option::is_none")]
        pub cert_sans: Option<Vec<String>>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ControlPlaneComponent {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_args: Option<Vec<Arg>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_volumes: Option<Vec<HostPathMount>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_envs: Option<Vec<EnvVar>>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Arg {
        pub name: String,
        pub value: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct HostPathMount {
        pub name: String,
        pub host_path: String,
        pub mount_path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub read_only: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub path_type: Option<String>,
    }

    /// corev1.EnvVar (valueFrom kept opaque).
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct EnvVar {
        pub name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub value: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub value_from: Option<serde_json::Value>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Dns {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_repository: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_tag: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disabled: Option<bool>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Proxy {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disabled: Option<bool>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Etcd {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub local: Option<LocalEtcd>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub external: Option<ExternalEtcd>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct LocalEtcd {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_repository: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image_tag: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub data_dir: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_args: Option<Vec<Arg>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub extra_envs: Option<Vec<EnvVar>>,
        #[serde(rename = "serverCertSANs", skip_serializing_if = "Option::is_none")]
        pub server_cert_sans: Option<Vec<String>>,
        #[serde(rename = "peerCertSANs", skip_serializing_if = "Option::is_none")]
        pub peer_cert_sans: Option<Vec<String>>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ExternalEtcd {
        pub endpoints: Vec<String>,
        pub ca_file: String,
        pub cert_file: String,
        pub key_file: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Patches {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub directory: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Timeouts {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub control_plane_component_health_check: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub kubelet_health_check: Option<String>,
        #[serde(rename = "kubernetesAPICall", skip_serializing_if = "Option::is_none")]
        pub kubernetes_api_call: Option<String>,
        #[serde(rename = "etcdAPICall", skip_serializing_if = "Option::is_none")]
        pub etcd_api_call: Option<String>,
        #[serde(rename = "tlsBootstrap", skip_serializing_if = "Option::is_none")]
        pub tls_bootstrap: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub discovery: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub upgrade_manifests: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct BootstrapToken {
        pub token: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub description: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ttl: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub expires: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub usages: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub groups: Option<Vec<String>>,
    }

    /// Only the KubeletConfiguration fields klab writes (kubelet.config.k8s.io/v1beta1 is not
    /// mirrored in full).
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct KubeletConfiguration {
        pub api_version: String,
        pub kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cgroup_driver: Option<String>,
    }
}

/// One parsed kubeadm document.
#[derive(Debug)]
enum Doc {
    Init(Box<v1beta4::InitConfiguration>),
    Cluster(Box<v1beta4::ClusterConfiguration>),
    Join(Box<v1beta4::JoinConfiguration>),
    Kubelet(Box<v1beta4::KubeletConfiguration>),
}

/// Parse every document of a rendered kubeadm file through the mirror and check it serializes back
/// to exactly what was written (nothing dropped, renamed or retyped).
fn round_trip(what: &str, text: &str) -> Vec<Doc> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let raw =
            serde_norway::Value::deserialize(de).unwrap_or_else(|e| panic!("{what}: YAML: {e}"));
        let kind = raw
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let api = raw
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
            what: &str,
            raw: &serde_norway::Value,
        ) -> T {
            let t: T = serde_norway::from_value(raw.clone())
                .unwrap_or_else(|e| panic!("{what}: not valid for the mirror types: {e}"));
            let back = serde_norway::to_value(&t).expect("serializes");
            assert_eq!(&back, raw, "{what}: does not round-trip");
            t
        }
        let doc = match (api.as_str(), kind.as_str()) {
            ("kubeadm.k8s.io/v1beta4", "InitConfiguration") => {
                Doc::Init(Box::new(typed(what, &raw)))
            }
            ("kubeadm.k8s.io/v1beta4", "ClusterConfiguration") => {
                Doc::Cluster(Box::new(typed(what, &raw)))
            }
            ("kubeadm.k8s.io/v1beta4", "JoinConfiguration") => {
                Doc::Join(Box::new(typed(what, &raw)))
            }
            ("kubelet.config.k8s.io/v1beta1", "KubeletConfiguration") => {
                Doc::Kubelet(Box::new(typed(what, &raw)))
            }
            other => panic!("{what}: unexpected document {other:?}"),
        };
        out.push(doc);
    }
    out
}

fn file<'a>(files: &'a [(String, String)], rel: &str) -> &'a str {
    files
        .iter()
        .find(|(p, _)| p == rel)
        .map(|(_, c)| c.as_str())
        .unwrap_or_else(|| panic!("no rendered file {rel}"))
}

fn node_arg(reg: &v1beta4::NodeRegistrationOptions) -> Vec<(&str, &str)> {
    reg.kubelet_extra_args
        .iter()
        .flatten()
        .map(|a| (a.name.as_str(), a.value.as_str()))
        .collect()
}

/// (case name, plan, rendered files as (relative path, content)).
type Case = (String, LabPlan, Vec<(String, String)>);

fn kubernetes_cases() -> Vec<Case> {
    cases()
        .into_iter()
        .filter(|(_, lab)| lab.kubernetes.is_some())
        .map(|(name, lab)| {
            let (p, r) = render_with_test_keys(&lab);
            (name, p, r.files())
        })
        .collect()
}

#[test]
fn kubeadm_documents_round_trip_and_pin_the_cluster_network() {
    let cases = kubernetes_cases();
    assert!(cases.len() >= 5, "Kubernetes labs: {}", cases.len());
    for (name, p, files) in &cases {
        let k = p.kubernetes.as_ref().expect("kubernetes");
        let cluster = p.network(&k.cluster_network).expect("cluster network");
        let in_cluster = |ip: &str| {
            let ip: std::net::Ipv4Addr = ip.parse().expect("an address");
            u32::from(ip) & u32::from(cluster.netmask) == u32::from(cluster.address)
        };
        let init = p.node(&k.init_node).expect("init node");
        let rel = format!("nodes/{}/provision/etc/klab/kubeadm/init.yaml", init.name);
        let docs = round_trip(&format!("{name}: {rel}"), file(files, &rel));
        assert_eq!(docs.len(), 3, "{name}: init, cluster, kubelet");
        let ip = init.cluster_ip.to_string();
        for d in &docs {
            match d {
                Doc::Init(i) => {
                    let ep = i.local_api_endpoint.as_ref().expect("localAPIEndpoint");
                    assert_eq!(ep.advertise_address.as_deref(), Some(ip.as_str()), "{name}");
                    assert!(in_cluster(&ip), "{name}");
                    let reg = i.node_registration.as_ref().expect("nodeRegistration");
                    assert_eq!(node_arg(reg), [("node-ip", ip.as_str())], "{name}");
                    assert_eq!(
                        i.certificate_key.as_deref(),
                        Some("${klab:certificate-key}"),
                        "{name}: the secret stays a marker"
                    );
                }
                Doc::Cluster(c) => {
                    let endpoint = match k.control_plane_vip {
                        Some(vip) => format!("{vip}:6443"),
                        None => format!("{ip}:6443"),
                    };
                    assert_eq!(
                        c.control_plane_endpoint.as_deref(),
                        Some(endpoint.as_str()),
                        "{name}"
                    );
                    assert_eq!(
                        c.encryption_algorithm,
                        Some(v1beta4::EncryptionAlgorithm::EcdsaP256)
                    );
                    let net = c.networking.as_ref().expect("networking");
                    assert_eq!(
                        net.pod_subnet.as_deref(),
                        Some(k.pod_cidr.as_str()),
                        "{name}"
                    );
                    assert_eq!(
                        net.service_subnet.as_deref(),
                        Some(k.service_cidr.as_str()),
                        "{name}"
                    );
                    let sans = c
                        .api_server
                        .as_ref()
                        .and_then(|a| a.cert_sans.clone())
                        .expect("certSANs");
                    if let Some(vip) = k.control_plane_vip {
                        assert!(sans.contains(&vip.to_string()), "{name}: VIP in SANs");
                    }
                    for cp in &k.control_planes {
                        let n = p.node(cp).expect("cp");
                        assert!(
                            sans.contains(&n.cluster_ip.to_string()),
                            "{name}: {cp} address"
                        );
                        assert!(sans.contains(cp), "{name}: {cp} name");
                    }
                }
                Doc::Kubelet(kc) => assert_eq!(kc.cgroup_driver.as_deref(), Some("systemd")),
                Doc::Join(_) => panic!("{name}: join document in init.yaml"),
            }
        }
        for node in p.nodes.iter().filter(|n| n.name != k.init_node) {
            let rel = format!("nodes/{}/provision/etc/klab/kubeadm/join.yaml", node.name);
            let docs = round_trip(&format!("{name}: {rel}"), file(files, &rel));
            let [Doc::Join(j)] = docs.as_slice() else {
                panic!("{name}: {rel} must be one JoinConfiguration");
            };
            let ip = node.cluster_ip.to_string();
            assert!(in_cluster(&ip), "{name}");
            let reg = j.node_registration.as_ref().expect("nodeRegistration");
            assert_eq!(
                node_arg(reg),
                [("node-ip", ip.as_str())],
                "{name}: {}",
                node.name
            );
            let bt = j
                .discovery
                .bootstrap_token
                .as_ref()
                .expect("bootstrapToken");
            assert_eq!(
                bt.api_server_endpoint.as_deref(),
                Some(k.control_plane_endpoint.as_str())
            );
            assert_eq!(
                bt.ca_cert_hashes.as_deref(),
                Some(&["${klab:ca-cert-hash}".to_string()][..])
            );
            assert_eq!(bt.token, "${klab:bootstrap-token}");
            let is_cp = k.control_planes.contains(&node.name);
            match &j.control_plane {
                Some(cp) => {
                    assert!(is_cp, "{name}: {} is a worker", node.name);
                    let ep = cp.local_api_endpoint.as_ref().expect("localAPIEndpoint");
                    assert_eq!(ep.advertise_address.as_deref(), Some(ip.as_str()));
                    assert_eq!(
                        cp.certificate_key.as_deref(),
                        Some("${klab:certificate-key}")
                    );
                }
                None => assert!(!is_cp, "{name}: {} lacks controlPlane", node.name),
            }
        }
    }
}

#[test]
fn seed_001_literals() {
    let (_, p, files) = kubernetes_cases()
        .into_iter()
        .find(|(n, _, _)| n == "seed-001-ha")
        .expect("seed-001-ha");
    let init = file(
        &files,
        "nodes/master01/provision/etc/klab/kubeadm/init.yaml",
    );
    assert!(init.contains("  advertiseAddress: \"192.168.3.11\"\n"));
    assert!(init.contains("controlPlaneEndpoint: \"192.168.3.10:6443\"\n"));
    assert!(init.contains("    - name: node-ip\n      value: \"192.168.3.11\"\n"));
    assert!(init.contains(
        "  certSANs:\n    - \"192.168.3.10\"\n    - \"192.168.3.11\"\n    - \"master01\"\n    - \"192.168.3.12\"\n    - \"master02\"\n    - \"192.168.3.13\"\n    - \"master03\"\n    - \"127.0.0.1\"\n"
    ));
    // Workers exist: control planes keep kubeadm's default taint.
    assert!(!init.contains("taints"));
    let join = file(
        &files,
        "nodes/master02/provision/etc/klab/kubeadm/join.yaml",
    );
    assert!(
        join.contains(
            "controlPlane:\n  localAPIEndpoint:\n    advertiseAddress: \"192.168.3.12\"\n"
        )
    );
    let worker = file(
        &files,
        "nodes/worker03/provision/etc/klab/kubeadm/join.yaml",
    );
    assert!(worker.contains("      value: \"192.168.3.23\"\n") && !worker.contains("controlPlane"));
    let patch = file(
        &files,
        "nodes/master01/provision/etc/klab/calico/calico-node-env.yaml",
    );
    assert!(patch.contains(
        "            - name: CALICO_IPV4POOL_CIDR\n              value: \"10.244.0.0/16\"\n"
    ));
    assert!(patch.contains("            - name: IP_AUTODETECTION_METHOD\n              value: \"kubernetes-internal-ip\"\n"));
    assert!(
        patch.contains(
            "            - name: CALICO_IPV4POOL_VXLAN\n              value: \"Always\"\n"
        )
    );
    assert!(
        patch
            .contains("            - name: CALICO_IPV4POOL_IPIP\n              value: \"Never\"\n")
    );
    let keepalived = file(
        &files,
        "nodes/master02/provision/etc/keepalived/keepalived.conf",
    );
    assert!(keepalived.contains("  priority 149\n"));
    assert!(keepalived.contains("  unicast_src_ip 192.168.3.12\n"));
    assert!(keepalived.contains("    192.168.3.11\n    192.168.3.13\n"));
    // The VIP as a /32 on the cluster NIC; the router id from the lab name (sha256("ha")[0] = 134,
    // computed with Python's hashlib); the password a run-time secret, never in the plan.
    assert!(keepalived.contains("    192.168.3.10/32 dev lab0\n"));
    assert!(keepalived.contains("  interface lab0\n"));
    assert!(keepalived.contains("  virtual_router_id 134\n"));
    assert!(keepalived.contains("    auth_type PASS\n    auth_pass ${klab:vrrp-password}\n"));
    assert!(
        keepalived.contains("    script \"/etc/keepalived/check-apiserver.sh\"\n")
            || keepalived.contains("  script \"/etc/keepalived/check-apiserver.sh\"\n")
    );
    let check = file(
        &files,
        "nodes/master02/provision/etc/keepalived/check-apiserver.sh",
    );
    assert!(check.contains("https://127.0.0.1:6443/readyz"));
    // Joins: control planes one at a time, workers in parallel, after the credentials refresh.
    let k = p.kubernetes.as_ref().expect("k");
    let ids: Vec<&str> = k.provision.phases.iter().map(|ph| ph.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "detect-os",
            "preflight",
            "package-repo",
            "resolve-version",
            "kubernetes-packages",
            "containerd",
            "vip",
            "kubeadm-init",
            "join-credentials",
            "join-control-plane",
            "join-workers",
            "calico",
            "wait-ready",
            "kubeconfig",
            "verify"
        ]
    );
    let cp = k
        .provision
        .phase(PhaseId::JoinControlPlane)
        .expect("cp joins");
    assert_eq!(cp.schedule, Schedule::Serial);
    let names: Vec<&str> = cp.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["master02", "master03"]);
    let w = k.provision.phase(PhaseId::JoinWorkers).expect("workers");
    assert_eq!(w.schedule, Schedule::Parallel);
    assert_eq!(w.nodes.len(), 4);
    let verify = k.provision.phase(PhaseId::Verify).expect("verify");
    let Op::Run(internal) = &verify.nodes[0].ops[0] else {
        panic!("verify runs commands");
    };
    assert!(internal.run.contains(
        "want='master01=192.168.3.11\nmaster02=192.168.3.12\nmaster03=192.168.3.13\nworker01=192.168.3.21\nworker02=192.168.3.22\nworker03=192.168.3.23\nworker04=192.168.3.24'"
    ));
    let Op::Run(calico) = &verify.nodes[0].ops[1] else {
        panic!("verify runs commands");
    };
    assert!(calico.run.contains("master01=192.168.3.11/24\n"));
}

#[test]
fn secrets_are_markers_in_the_plan_and_every_rendered_file() {
    for (name, p, files) in kubernetes_cases() {
        let json = serde_json::to_string(&p).expect("json");
        let k = p.kubernetes.as_ref().expect("k");
        let secret_inputs: Vec<&str> = k
            .provision
            .inputs
            .iter()
            .filter(|i| i.secret)
            .map(|i| i.name.as_str())
            .collect();
        let mut want = vec![
            value::CA_KEY,
            value::BOOTSTRAP_TOKEN,
            value::CERTIFICATE_KEY,
        ];
        if k.control_plane_vip.is_some() {
            want.push(value::VRRP_PASSWORD);
        }
        assert_eq!(secret_inputs, want, "{name}");
        assert!(!json.contains("PRIVATE KEY"), "{name}");
        // The CA key is written from its value at run time, 0600.
        let init = k.provision.phase(PhaseId::KubeadmInit).expect("init");
        let ca_key = init.nodes[0]
            .ops
            .iter()
            .find_map(|op| match op {
                Op::File(f) if f.path == "/etc/kubernetes/pki/ca.key" => Some(f),
                _ => None,
            })
            .expect("ca.key op");
        assert_eq!(ca_key.mode, 0o600);
        assert_eq!(
            ca_key.content,
            FileContent::Value {
                value: value::CA_KEY.into()
            }
        );
        for (path, content) in &files {
            if path.ends_with("kubeadm/init.yaml") || path.ends_with("kubeadm/join.yaml") {
                assert!(
                    content.contains("${klab:bootstrap-token}"),
                    "{name}: {path}"
                );
            }
        }
    }
}

#[test]
fn pinned_patch_skips_resolution_and_lab_settings_reach_the_files() {
    let mut lab = klab::plan::fixtures::generated_lab(3);
    let k = lab.kubernetes.as_mut().expect("k");
    k.version = "1.36.4".into();
    k.image_repository = Some("registry.lab:5000/k8s".into());
    k.package_repo = Some("http://10.0.0.1:8080/k8s".into());
    k.encapsulation = klab::model::Encapsulation::Ipip;
    let p = klab::plan::plan(&lab, &klab::plan::fixtures::inputs(&lab.name));
    let t = Templates::builtin().expect("templates");
    let resolved = render::resolve_provision(&p, &t)
        .expect("render")
        .expect("k8s");
    assert!(resolved.phase(PhaseId::ResolveVersion).is_none());
    assert!(
        resolved
            .inputs
            .iter()
            .all(|i| i.name != value::KUBERNETES_VERSION)
    );
    // Every template became text; no marker for the version is left anywhere.
    for ph in &resolved.phases {
        for np in &ph.nodes {
            for op in &np.ops {
                match op {
                    Op::File(f) => {
                        assert!(
                            !matches!(f.content, FileContent::Template { .. }),
                            "{}",
                            f.path
                        );
                        if let FileContent::Text { text } = &f.content {
                            assert!(!text.contains("${klab:kubernetes-version}"), "{}", f.path);
                        }
                    }
                    Op::Run(c) => {
                        assert!(!c.run.contains("${klab:kubernetes-version}"), "{}", c.name)
                    }
                }
            }
        }
    }
    let r = render::render_lab(&p, None, &t).expect("render");
    let files = r.files();
    let init = file(&files, "nodes/cp1/provision/etc/klab/kubeadm/init.yaml");
    assert!(init.contains("kubernetesVersion: \"v1.36.4\"\n"));
    assert!(init.contains("imageRepository: \"registry.lab:5000/k8s\"\n"));
    round_trip("pinned init.yaml", init);
    let sources = file(
        &files,
        "nodes/cp1/provision/etc/apt/sources.list.d/klab-kubernetes.sources",
    );
    assert_eq!(
        sources,
        "# klab: Kubernetes v1.36 packages\nTypes: deb\nURIs: http://10.0.0.1:8080/k8s/v1.36/deb/\nSuites: /\nSigned-By: /etc/apt/keyrings/klab-kubernetes.asc\n"
    );
    let patch = file(
        &files,
        "nodes/cp1/provision/etc/klab/calico/calico-node-env.yaml",
    );
    assert!(patch.contains("CALICO_IPV4POOL_IPIP\n              value: \"Always\"\n"));
    let packages = resolved
        .phase(PhaseId::KubernetesPackages)
        .expect("packages");
    let Op::Run(apt) = &packages.nodes[0].ops[0] else {
        panic!("install command first");
    };
    assert!(apt.run.contains("'kubeadm=1.36.4-*'"), "{}", apt.run);
    let containerd = resolved.phase(PhaseId::Containerd).expect("containerd");
    let sandbox = containerd.nodes[0]
        .ops
        .iter()
        .find_map(|op| match op {
            Op::Run(c) if c.name == "sandbox image kubeadm expects" => Some(c),
            _ => None,
        })
        .expect("sandbox");
    assert!(sandbox.run.contains(
        "kubeadm config images list --kubernetes-version v1.36.4 --image-repository registry.lab:5000/k8s"
    ));
}

#[test]
fn containerd_configs_per_major_version() {
    let (_, _, files) = kubernetes_cases()
        .into_iter()
        .find(|(n, _, _)| n == "quickstart")
        .expect("quickstart");
    let v1 = file(
        &files,
        "nodes/cp1/provision/etc/containerd/config.toml.containerd-major-1",
    );
    let v2 = file(
        &files,
        "nodes/cp1/provision/etc/containerd/config.toml.containerd-major-2",
    );
    let t1: toml::Table = v1.parse().expect("containerd 1.x config is TOML");
    let t2: toml::Table = v2.parse().expect("containerd 2.x config is TOML");
    assert_eq!(t1["version"].as_integer(), Some(2));
    assert_eq!(t2["version"].as_integer(), Some(3));
    let cri = &t1["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(cri["sandbox_image"].as_str(), Some("${klab:sandbox-image}"));
    assert_eq!(
        cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
        Some(true)
    );
    assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/opt/cni/bin"));
    let rt = &t2["plugins"]["io.containerd.cri.v1.runtime"];
    assert_eq!(
        rt["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
        Some(true)
    );
    assert_eq!(rt["cni"]["bin_dirs"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(rt["cni"]["bin_dirs"][0].as_str(), Some("/opt/cni/bin"));
    assert_eq!(
        t2["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
        Some("${klab:sandbox-image}")
    );
    assert_eq!(
        file(&files, "nodes/cp1/provision/etc/crictl.yaml"),
        "runtime-endpoint: unix:///run/containerd/containerd.sock\nimage-endpoint: unix:///run/containerd/containerd.sock\ntimeout: 10\n"
    );
}

#[test]
fn the_mirror_rejects_unknown_and_misplaced_fields() {
    let misspelt = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: InitConfiguration\nlocalAPIEndpoint:\n  advertiseAdress: 10.0.0.1\n";
    let err = serde_norway::from_str::<v1beta4::InitConfiguration>(misspelt).unwrap_err();
    assert!(err.to_string().contains("advertiseAdress"), "{err}");
    // v1beta3's map form of kubeletExtraArgs is gone in v1beta4.
    let old = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: JoinConfiguration\ndiscovery: {}\nnodeRegistration:\n  kubeletExtraArgs:\n    node-ip: 10.0.0.1\n";
    assert!(serde_norway::from_str::<v1beta4::JoinConfiguration>(old).is_err());
    // v1beta3's apiServer.timeoutForControlPlane moved to timeouts.
    let moved = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\napiServer:\n  timeoutForControlPlane: 4m0s\n";
    assert!(serde_norway::from_str::<v1beta4::ClusterConfiguration>(moved).is_err());
}

#[test]
fn control_planes_without_workers_take_pods() {
    let mut lab = klab::plan::fixtures::generated_lab(1);
    lab.nodes
        .retain(|n| n.role == klab::model::Role::ControlPlane);
    let p = klab::plan::plan(&lab, &klab::plan::fixtures::inputs(&lab.name));
    let t = Templates::builtin().expect("templates");
    let files = render::render_lab(&p, None, &t).expect("render").files();
    let init = file(&files, "nodes/cp1/provision/etc/klab/kubeadm/init.yaml");
    let docs = round_trip("single node", init);
    let Doc::Init(i) = &docs[0] else {
        panic!("InitConfiguration first");
    };
    assert_eq!(
        i.node_registration
            .as_ref()
            .and_then(|r| r.taints.as_ref())
            .map(Vec::len),
        Some(0)
    );
    let k = p.kubernetes.as_ref().expect("k");
    let ids: Vec<&str> = k.provision.phases.iter().map(|ph| ph.id.as_str()).collect();
    assert!(
        !ids.contains(&"join-credentials") && !ids.contains(&"join-workers"),
        "{ids:?}"
    );
}

/// The HA fixture's resolved phases through the runner, every node a `RecordingRemote` that
/// answers the captures like a fresh Debian 12 node with containerd 2.x.
#[tokio::test]
async fn runner_builds_the_ha_fixture_in_phase_order() {
    use klab::plan::secret::Secret;
    use klab::provision::Remote;
    use klab::provision::recording::{Recorded, RecordingRemote};
    use klab::provision::runner::{Event, NodeOutcome, Runner, Val, Values};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    let lab = klab::plan::fixtures::ha_lab();
    let p = klab::plan::plan(&lab, &klab::plan::fixtures::inputs(&lab.name));
    let t = Templates::builtin().expect("templates");
    let plan = render::resolve_provision(&p, &t)
        .expect("render")
        .expect("k8s");

    let mut remotes: BTreeMap<String, RecordingRemote> = BTreeMap::new();
    for (i, node) in p.nodes.iter().enumerate() {
        let r = fresh_debian_node(
            node,
            i,
            &plan.phases,
            "apiVersion: v1\nkind: Config\n",
            None,
        );
        remotes.insert(node.name.clone(), r);
    }
    let mut values = Values::default();
    values.set_public(
        value::CA_CERT,
        "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
    );
    values.set_secret(
        value::CA_KEY,
        Secret::new("-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n"),
    );
    values.set_public(
        value::CA_CERT_HASH,
        "sha256:0d85ef031b4b9a377e3170a57db66df240ab1b4676042a00bb944532cb6305c8",
    );
    values.set_secret(
        value::BOOTSTRAP_TOKEN,
        Secret::new("abcdef.0123456789abcdef"),
    );
    values.set_secret(value::CERTIFICATE_KEY, Secret::new("ab".repeat(32)));
    values.set_secret(value::VRRP_PASSWORD, Secret::new("pw345678"));
    values.set_public(value::CALICO_MANIFEST, "kind: DaemonSet\n");

    let order = Mutex::new(Vec::new());
    let record = |e: &Event| {
        if let Event::NodeStarted { phase, node } = e {
            order
                .lock()
                .unwrap()
                .push(format!("{} {node}", phase.as_str()));
        }
    };
    let reports = Runner::new(&remotes, 3, &record)
        .run(&plan, &mut values)
        .await
        .expect("every phase succeeds");
    assert_eq!(reports.len(), plan.phases.len());
    assert!(
        reports
            .iter()
            .all(|r| r.nodes.iter().all(|(_, o)| *o == NodeOutcome::Done))
    );
    assert_eq!(
        values.cluster.get(value::KUBERNETES_VERSION),
        Some(&Val::Public("1.36.4".into()))
    );
    assert!(matches!(
        values.cluster.get(value::ADMIN_KUBECONFIG),
        Some(Val::Secret(_))
    ));
    assert_eq!(
        values.get("w2", value::CONTAINERD_MAJOR),
        Some(&Val::Public("2".into()))
    );

    let order = order.into_inner().unwrap();
    let at = |s: &str| {
        order
            .iter()
            .position(|o| o == s)
            .unwrap_or_else(|| panic!("{s} ran"))
    };
    assert!(at("kubeadm-init cp1") < at("join-control-plane cp2"));
    assert!(at("join-control-plane cp2") < at("join-control-plane cp3"));
    assert!(at("join-control-plane cp3") < at("join-workers w1"));

    for (node, r) in &remotes {
        for call in r.calls() {
            let Recorded::Exec { command, stdin, .. } = call else {
                panic!("{node}: the runner writes files through exec");
            };
            let stdin = stdin
                .map(|s| String::from_utf8_lossy(&s).into_owned())
                .unwrap_or_default();
            assert!(
                !command.contains("${klab:") && !stdin.contains("${klab:"),
                "{node}: unfilled marker in {command}"
            );
            assert!(
                !command.contains("dnf install"),
                "{node}: took the dnf path on apt"
            );
            assert!(command.starts_with("sudo -n sh -c "), "{node}: {command}");
        }
    }
    let joins = |node: &str| {
        remotes[node]
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Recorded::Exec {
                    command,
                    stdin: Some(s),
                    ..
                } if command.contains("/etc/klab/kubeadm/join.yaml.klab-new") => {
                    Some(String::from_utf8_lossy(&s).into_owned())
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let w1 = joins("w1");
    assert_eq!(w1.len(), 1);
    assert!(w1[0].contains("    token: \"abcdef.0123456789abcdef\"\n"));
    assert!(w1[0].contains(
        "      - \"sha256:0d85ef031b4b9a377e3170a57db66df240ab1b4676042a00bb944532cb6305c8\"\n"
    ));
    assert!(
        !remotes["w1"]
            .commands()
            .iter()
            .any(|c| c.contains("kubeadm init"))
    );
    let config = remotes["cp2"]
        .calls()
        .into_iter()
        .find_map(|c| match c {
            Recorded::Exec {
                command,
                stdin: Some(s),
                ..
            } if command.contains("/etc/containerd/config.toml.klab-new") => {
                Some(String::from_utf8_lossy(&s).into_owned())
            }
            _ => None,
        })
        .expect("containerd config written");
    assert!(config.starts_with("# klab: minimal config for containerd 2.x"));
    assert!(config.contains("  sandbox = \"registry.k8s.io/pause:3.10.1\"\n"));
    let _ = remotes["cp1"].node();
}

#[test]
fn validate_warns_about_an_end_of_life_minor_and_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = dir.path().join("old.toml");
    std::fs::write(
        &lab,
        "name = \"old\"\n[networks.c]\nmode = \"isolated\"\ncidr = \"10.1.0.0/24\"\n\
         [[nodes]]\nname = \"cp\"\nrole = \"control-plane\"\nnics = [ { network = \"c\" } ]\n\
         [kubernetes]\nversion = \"1.33\"\ncluster-network = \"c\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(["validate", lab.to_str().expect("utf-8")])
        .env("KLAB_DATA_DIR", dir.path().join("data"))
        .output()
        .expect("run klab");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "warning: {}:10:11: [kubernetes] version 1.33 is past its end of life\n  \
             hint: it still builds, but gets no fixes; supported minors are 1.35, 1.36 and 1.37, e.g. version = \"1.36\"\n",
            lab.display()
        )
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
}

/// Every command and probe of every Kubernetes lab parses as a POSIX shell script (`sh -n`).
#[test]
fn every_script_is_valid_sh() {
    let t = Templates::builtin().expect("templates");
    let mut checked = 0;
    for (name, p, _) in kubernetes_cases() {
        let plan = render::resolve_provision(&p, &t)
            .expect("render")
            .expect("k8s");
        for ph in &plan.phases {
            for np in &ph.nodes {
                let mut scripts: Vec<(String, &str)> = np
                    .ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::Run(c) => Some((c.name.clone(), c.run.as_str())),
                        Op::File(_) => None,
                    })
                    .collect();
                if let Some(c) = np.probe.as_ref().and_then(|pr| pr.command.as_deref()) {
                    scripts.push(("probe".into(), c));
                }
                for (what, script) in scripts {
                    let out = std::process::Command::new("sh")
                        .args(["-n", "-c", script])
                        .output()
                        .expect("run sh");
                    assert!(
                        out.status.success(),
                        "{name}: {} on {}: `{what}` is not valid sh: {}\n{script}",
                        ph.id.as_str(),
                        np.node,
                        String::from_utf8_lossy(&out.stderr)
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} scripts");
}

/// A scripted fresh Debian 12 node with containerd 2.x: it answers the phases' captures (its own
/// product_uuid and MAC), `admin.conf` with `admin_conf`, the cluster's Node names with `node_names`
/// (default: every node of `phases`), and no probe of `phases` holds.
pub(crate) fn fresh_debian_node(
    node: &klab::plan::NodeSpec,
    index: usize,
    phases: &[klab::plan::provision::Phase],
    admin_conf: &str,
    node_names: Option<&str>,
) -> klab::provision::recording::RecordingRemote {
    use klab::provision::recording::{RecordingRemote, exit, ok};
    use klab::provision::runner::as_root;
    let mut r = RecordingRemote::new(&node.name)
        .on_prefix(
            "sudo -n sh -c '. /etc/os-release",
            ok(&format!(
                "os=debian-12\npkg=apt\nproduct-uuid=uuid-{index}\nmacs={}\n",
                node.nics[0].mac
            )),
        )
        .on_prefix(
            "sudo -n sh -c 'v=$(containerd --version",
            ok("containerd-major=2\n"),
        )
        .on_prefix(
            "sudo -n sh -c 'img=$(kubeadm config images list",
            ok("sandbox-image=registry.k8s.io/pause:3.10.1\n"),
        )
        .on_prefix(
            "sudo -n sh -c 'v=$(apt-cache madison",
            ok("kubernetes-version=1.36.4\n"),
        )
        .on(
            "sudo -n sh -c 'cat /etc/kubernetes/admin.conf'",
            ok(admin_conf),
        );
    // The cluster check of a rerun: every node of the phases is a Node.
    let members: std::collections::BTreeSet<&str> = phases
        .iter()
        .flat_map(|ph| ph.nodes.iter().map(|n| n.node.as_str()))
        .collect();
    let listing: String = members.iter().map(|n| format!("{n}\n")).collect();
    r = r.on(
        &as_root(klab::plan::provision::NODE_NAMES),
        ok(node_names.unwrap_or(&listing)),
    );
    for ph in phases {
        if let Some(np) = ph.node(&node.name)
            && let Some(cmd) = np.probe.as_ref().and_then(|pr| pr.command.as_ref())
        {
            let filled = cmd
                .replace("${klab:pkg}", "apt")
                .replace("${klab:kubernetes-version}", "1.36.4");
            r = r.on(&as_root(&filled), exit(1, ""));
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// keepalived on every HA lab in labs/, and control planes added or removed. Expected values come
// from the lab's TOML text (VIP, cluster network) and the plan's nodes (addresses, NIC names), not
// from the code that fills the templates.

/// Every `labs/*.toml` as (file stem, raw TOML, parsed lab): the folder iterated, never listed.
fn lab_files() -> Vec<(String, toml::Table, klab::model::Lab)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("labs");
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("labs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let stem = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let src = std::fs::read_to_string(&path).expect("read lab");
            let raw: toml::Table = src.parse().expect("TOML");
            let lab = klab::config::parse_str(&src, &format!("labs/{stem}.toml"))
                .unwrap_or_else(|d| panic!("labs/{stem}.toml: {d:?}"));
            (stem, raw, lab)
        })
        .collect()
}

/// `kubernetes.<key>` of a lab file, as written.
fn raw_kubernetes<'a>(raw: &'a toml::Table, key: &str) -> Option<&'a str> {
    raw.get("kubernetes")?.get(key)?.as_str()
}

/// The plan's control planes (by role, in plan order) with their cluster NIC (ifname, address).
fn control_planes(p: &LabPlan, cluster: &str) -> Vec<(String, String, std::net::Ipv4Addr)> {
    p.nodes
        .iter()
        .filter(|n| n.role == klab::model::Role::ControlPlane)
        .map(|n| {
            let nic = n
                .nics
                .iter()
                .find(|nic| nic.network == cluster)
                .unwrap_or_else(|| panic!("{} has no NIC on {cluster}", n.name));
            (n.name.clone(), nic.ifname.clone(), nic.ip)
        })
        .collect()
}

/// Trimmed values of every `key value` line.
fn settings<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
        .collect()
}

/// Trimmed lines of the `name {` … `}` block (the first one; blocks here do not nest).
fn block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("{name} {{");
    let mut lines = text.lines().map(str::trim);
    assert!(lines.any(|l| l == open), "no `{open}` block in:\n{text}");
    lines.take_while(|l| *l != "}").collect()
}

/// The unicast peers of a keepalived.conf, sorted.
fn peers(conf: &str) -> Vec<String> {
    let mut v: Vec<String> = block(conf, "unicast_peer")
        .into_iter()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn provision_file<'a>(
    r: &'a render::RenderedLab,
    node: &str,
    path: &str,
) -> &'a render::ProvisionFile {
    r.provision
        .iter()
        .find(|f| f.node == node && f.path == path)
        .unwrap_or_else(|| panic!("{node}: no rendered {path}"))
}

fn vip_files<'a>(r: &'a render::RenderedLab, node: &str) -> Vec<(&'a str, &'a str)> {
    r.provision
        .iter()
        .filter(|f| f.node == node && f.phase == PhaseId::Vip.as_str())
        .map(|f| (f.path.as_str(), f.content.as_str()))
        .collect()
}

/// Every node-ip and advertiseAddress written in the lab's kubeadm files.
fn kubeadm_addresses(name: &str, files: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, text) in files.iter().filter(|(rel, _)| {
        rel.ends_with("/etc/klab/kubeadm/init.yaml") || rel.ends_with("/etc/klab/kubeadm/join.yaml")
    }) {
        for d in round_trip(&format!("{name}: {rel}"), text) {
            let (reg, ep) = match &d {
                Doc::Init(i) => (i.node_registration.as_ref(), i.local_api_endpoint.as_ref()),
                Doc::Join(j) => (
                    j.node_registration.as_ref(),
                    j.control_plane
                        .as_ref()
                        .and_then(|c| c.local_api_endpoint.as_ref()),
                ),
                _ => continue,
            };
            out.extend(
                reg.into_iter()
                    .flat_map(node_arg)
                    .filter(|(k, _)| *k == "node-ip")
                    .map(|(_, v)| v.to_string()),
            );
            out.extend(ep.and_then(|e| e.advertise_address.clone()));
        }
    }
    out
}

const VRRP_PASSWORD_MARKER: &str = "${klab:vrrp-password}";

/// The asserts of one HA lab's keepalived files; returns the lab's virtual_router_id.
fn check_ha_lab(name: &str, raw: &toml::Table, p: &LabPlan, r: &render::RenderedLab) -> u32 {
    let files = r.files();
    let vip: std::net::Ipv4Addr = raw_kubernetes(raw, "control-plane-vip")
        .unwrap_or_else(|| panic!("{name}: an HA lab without control-plane-vip"))
        .parse()
        .expect("VIP");
    let cluster = raw_kubernetes(raw, "cluster-network").expect("cluster-network");
    let cps = control_planes(p, cluster);
    assert!(cps.len() > 1, "{name}");
    let k = p.kubernetes.as_ref().expect("kubernetes");

    // The vip phase: every control plane, nothing else, before kubeadm init; files re-checked.
    let ids: Vec<PhaseId> = k.provision.phases.iter().map(|ph| ph.id).collect();
    let at = |id| ids.iter().position(|i| *i == id).expect("phase");
    assert!(
        at(PhaseId::Vip) < at(PhaseId::KubeadmInit),
        "{name}: VIP before init"
    );
    let phase = k.provision.phase(PhaseId::Vip).expect("vip phase");
    let on: Vec<&str> = phase.nodes.iter().map(|n| n.node.as_str()).collect();
    let want: Vec<&str> = cps.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(on, want, "{name}: vip phase nodes");
    for np in &phase.nodes {
        assert!(
            np.probe.as_ref().is_some_and(|pr| pr.files_match),
            "{name}: {} vip probe must compare files",
            np.node
        );
    }

    let mut router_ids = Vec::new();
    let mut priorities = Vec::new();
    for (node, ifname, ip) in &cps {
        let what = format!("{name}: {node}");
        let conf_file = provision_file(r, node, klab::plan::provision::KEEPALIVED_CONF);
        assert_eq!(conf_file.mode, 0o600, "{what}: it holds the VRRP password");
        let conf = conf_file.content.as_str();
        assert_eq!(
            conf,
            file(
                &files,
                &format!("nodes/{node}/provision/etc/keepalived/keepalived.conf")
            ),
            "{what}"
        );
        assert_eq!(settings(conf, "interface"), [ifname.as_str()], "{what}");
        assert_eq!(settings(conf, "unicast_src_ip"), [ip.to_string()], "{what}");
        let mut others: Vec<String> = cps
            .iter()
            .filter(|(n, _, _)| n != node)
            .map(|(_, _, a)| a.to_string())
            .collect();
        others.sort();
        assert_eq!(peers(conf), others, "{what}: unicast peers");
        assert_eq!(
            block(conf, "virtual_ipaddress"),
            [format!("{vip}/32 dev {ifname}")],
            "{what}"
        );
        assert_eq!(
            block(conf, "authentication"),
            [
                "auth_type PASS",
                &format!("auth_pass {VRRP_PASSWORD_MARKER}")
            ],
            "{what}: the password stays a marker"
        );
        assert_eq!(
            klab::plan::provision::refs(conf),
            ["vrrp-password"],
            "{what}: no other run-time value"
        );
        assert!(
            !conf.contains("vrrp_mcast") && !conf.contains("mcast_src_ip"),
            "{what}"
        );
        let [id] = settings(conf, "virtual_router_id")[..] else {
            panic!("{what}: one virtual_router_id");
        };
        let id: u32 = id.parse().expect("router id");
        assert!((1..=255).contains(&id), "{what}: router id {id}");
        router_ids.push(id);
        let [prio] = settings(conf, "priority")[..] else {
            panic!("{what}: one priority");
        };
        priorities.push(prio.parse::<u32>().expect("priority"));
        assert_eq!(block(conf, "track_script"), ["check_apiserver"], "{what}");
        let script = block(conf, "vrrp_script check_apiserver");
        let path = klab::plan::provision::CHECK_APISERVER;
        assert!(
            script.contains(&format!("script \"{path}\"").as_str()),
            "{what}"
        );

        let check = provision_file(r, node, path);
        assert_eq!(check.mode, 0o755, "{what}");
        assert!(check.content.starts_with("#!/bin/sh\n"), "{what}");
        assert!(
            check
                .content
                .lines()
                .any(|l| l.contains("curl ") && l.contains("https://127.0.0.1:6443/readyz")),
            "{what}: the check curls the local apiserver:\n{}",
            check.content
        );
        // The vip phase writes exactly these two files.
        let mut paths: Vec<&str> = vip_files(r, node).into_iter().map(|(p, _)| p).collect();
        paths.sort();
        assert_eq!(
            paths,
            [path, klab::plan::provision::KEEPALIVED_CONF],
            "{what}"
        );
    }
    assert!(
        router_ids.windows(2).all(|w| w[0] == w[1]),
        "{name}: {router_ids:?}"
    );
    // The first control plane (kubeadm init's) holds the VIP first; no two share a priority.
    assert_eq!(cps[0].0, k.init_node, "{name}");
    let mut sorted = priorities.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(sorted, priorities, "{name}: strictly decreasing priorities");

    // The VIP: on the cluster network, never a node's address, node-ip or advertiseAddress.
    let net = p.network(cluster).expect("cluster network");
    assert_eq!(
        u32::from(vip) & u32::from(net.netmask),
        u32::from(net.address),
        "{name}: VIP on the cluster network"
    );
    for n in &p.nodes {
        assert!(
            n.nics.iter().all(|nic| nic.ip != vip),
            "{name}: {} has the VIP",
            n.name
        );
        assert_ne!(n.cluster_ip, vip, "{name}: {}", n.name);
    }
    let addrs = kubeadm_addresses(name, &files);
    assert!(addrs.len() >= p.nodes.len(), "{name}: {addrs:?}");
    assert!(
        !addrs.contains(&vip.to_string()),
        "{name}: the VIP in {addrs:?}"
    );
    assert_eq!(k.control_plane_endpoint, format!("{vip}:6443"), "{name}");
    // Calico takes the kubelet's InternalIP (the node-ip), so it can never pick the VIP.
    assert_eq!(k.calico_autodetect, "kubernetes-internal-ip", "{name}");
    let env = file(
        &files,
        &format!(
            "nodes/{}/provision/etc/klab/calico/calico-node-env.yaml",
            k.init_node
        ),
    );
    assert!(
        env.contains(
            "- name: IP_AUTODETECTION_METHOD\n              value: \"kubernetes-internal-ip\"\n"
        ),
        "{name}:\n{env}"
    );
    router_ids[0]
}

#[test]
fn keepalived_on_every_control_plane_of_every_ha_lab() {
    let mut ids: Vec<(String, u32)> = Vec::new();
    for (name, raw, lab) in lab_files() {
        let cps = lab
            .nodes
            .iter()
            .filter(|n| n.role == klab::model::Role::ControlPlane)
            .count();
        if lab.kubernetes.is_none() || cps < 2 {
            continue;
        }
        let (p, r) = render_with_test_keys(&lab);
        let id = check_ha_lab(&name, &raw, &p, &r);
        ids.push((name, id));
    }
    assert!(ids.len() >= 2, "HA labs in labs/: {ids:?}");
    let mut distinct: Vec<u32> = ids.iter().map(|(_, id)| *id).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "two HA labs share a router id: {ids:?}"
    );
}

/// labs/e2e-ha.toml with its control-plane entry's `count` set (the TOML edited, then validated).
fn e2e_ha_with(count: i64) -> (toml::Table, klab::model::Lab) {
    let (_, mut raw, _) = lab_files()
        .into_iter()
        .find(|(n, _, _)| n == "e2e-ha")
        .expect("labs/e2e-ha.toml");
    let nodes = raw
        .get_mut("nodes")
        .and_then(|n| n.as_array_mut())
        .expect("[[nodes]]");
    let cp = nodes
        .iter_mut()
        .find(|n| n.get("role").and_then(|r| r.as_str()) == Some("control-plane"))
        .and_then(|n| n.as_table_mut())
        .expect("control-plane entry");
    cp.insert("count".into(), toml::Value::Integer(count));
    let src = toml::to_string(&raw).expect("TOML");
    let lab = klab::config::parse_str(&src, "labs/e2e-ha.toml")
        .unwrap_or_else(|d| panic!("e2e-ha with count {count}: {d:?}"));
    (raw, lab)
}

#[test]
fn adding_and_removing_a_control_plane_updates_every_peer_list() {
    let (raw3, lab3) = e2e_ha_with(3);
    let (raw4, lab4) = e2e_ha_with(4);
    let (raw2, lab2) = e2e_ha_with(2);
    let (p3, r3) = render_with_test_keys(&lab3);
    let (p4, r4) = render_with_test_keys(&lab4);
    let (p2, r2) = render_with_test_keys(&lab2);
    // Each size is a valid HA lab on its own.
    let id3 = check_ha_lab("e2e-ha×3", &raw3, &p3, &r3);
    assert_eq!(
        check_ha_lab("e2e-ha×4", &raw4, &p4, &r4),
        id3,
        "router id kept"
    );
    assert_eq!(
        check_ha_lab("e2e-ha×2", &raw2, &p2, &r2),
        id3,
        "router id kept"
    );

    let cluster = raw_kubernetes(&raw3, "cluster-network").expect("cluster-network");
    let vip = raw_kubernetes(&raw3, "control-plane-vip").expect("VIP");
    let cps3 = control_planes(&p3, cluster);
    let cps4 = control_planes(&p4, cluster);
    assert_eq!(cps3.len(), 3);
    assert_eq!(cps4.len(), 4);
    assert_eq!(
        cps4[..3],
        cps3[..],
        "the old control planes keep names and addresses"
    );
    let (new, _, new_ip) = &cps4[3];

    // Every keepalived of the 4-node plan lists the three others.
    for (node, _, ip) in &cps4 {
        let conf = &provision_file(&r4, node, klab::plan::provision::KEEPALIVED_CONF).content;
        let p = peers(conf);
        assert_eq!(p.len(), 3, "{node}: {p:?}");
        assert!(!p.contains(&ip.to_string()), "{node} is not its own peer");
    }
    // The old control planes' vip files change (so files_match re-renders them), and only by the
    // new peer: router id, priority and VIP stay, the holder keeps the VIP across the reload.
    for (node, _, _) in &cps3 {
        let before = vip_files(&r3, node);
        let after = vip_files(&r4, node);
        assert_ne!(
            before, after,
            "{node}: vip files must differ after adding {new}"
        );
        let conf3 = &provision_file(&r3, node, klab::plan::provision::KEEPALIVED_CONF).content;
        let conf4 = &provision_file(&r4, node, klab::plan::provision::KEEPALIVED_CONF).content;
        assert!(peers(conf4).contains(&new_ip.to_string()), "{node}");
        assert_eq!(
            conf4.replacen(&format!("    {new_ip}\n"), "", 1),
            *conf3,
            "{node}: only the new peer is added"
        );
        let check = klab::plan::provision::CHECK_APISERVER;
        assert_eq!(
            provision_file(&r3, node, check).content,
            provision_file(&r4, node, check).content
        );
    }
    // The new node joins as a control plane, one at a time, through the VIP.
    let k4 = p4.kubernetes.as_ref().expect("k");
    let joins = k4
        .provision
        .phase(PhaseId::JoinControlPlane)
        .expect("cp joins");
    assert_eq!(joins.schedule, Schedule::Serial);
    let joining: Vec<&str> = joins.nodes.iter().map(|n| n.node.as_str()).collect();
    let want: Vec<&str> = cps4[1..].iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(joining, want);
    let files4 = r4.files();
    let rel = format!("nodes/{new}/provision/etc/klab/kubeadm/join.yaml");
    let docs = round_trip(&rel, file(&files4, &rel));
    let [Doc::Join(j)] = docs.as_slice() else {
        panic!("{rel}: one JoinConfiguration");
    };
    let cp = j.control_plane.as_ref().expect("a control-plane join");
    assert_eq!(
        cp.local_api_endpoint
            .as_ref()
            .and_then(|e| e.advertise_address.as_deref()),
        Some(new_ip.to_string().as_str())
    );
    assert_eq!(
        cp.certificate_key.as_deref(),
        Some("${klab:certificate-key}")
    );
    let endpoint = format!("{vip}:6443");
    assert_eq!(
        j.discovery
            .bootstrap_token
            .as_ref()
            .and_then(|b| b.api_server_endpoint.as_deref()),
        Some(endpoint.as_str()),
        "{new} joins through the VIP"
    );
    assert!(k4.cert_sans.contains(&new.to_string()), "{new} in certSANs");

    // Removal: with two control planes, nobody lists cp3 any more.
    let cps2 = control_planes(&p2, cluster);
    assert_eq!(cps2[..], cps3[..2]);
    let (gone, _, gone_ip) = &cps3[2];
    assert!(p2.node(gone).is_none(), "{gone} left the plan");
    for (node, _, _) in &cps2 {
        let conf2 = &provision_file(&r2, node, klab::plan::provision::KEEPALIVED_CONF).content;
        assert!(
            !peers(conf2).contains(&gone_ip.to_string()),
            "{node} still lists {gone}"
        );
        assert_ne!(vip_files(&r3, node), vip_files(&r2, node), "{node}");
    }
    assert!(
        r2.provision.iter().all(|f| f.node != *gone),
        "{gone}: nothing rendered"
    );
}

#[test]
fn a_second_control_plane_without_a_vip_is_refused() {
    let (mut raw, _) = e2e_ha_with(2);
    raw.get_mut("kubernetes")
        .and_then(|k| k.as_table_mut())
        .expect("[kubernetes]")
        .remove("control-plane-vip");
    let src = toml::to_string(&raw).expect("TOML");
    assert!(klab::config::parse_str(&src, "labs/e2e-ha.toml").is_err());
}

#[test]
fn single_control_plane_labs_have_no_keepalived() {
    let mut seen = 0;
    for (name, raw, lab) in lab_files() {
        let cps = lab
            .nodes
            .iter()
            .filter(|n| n.role == klab::model::Role::ControlPlane)
            .count();
        if lab.kubernetes.is_none() || cps != 1 {
            continue;
        }
        seen += 1;
        assert!(
            raw_kubernetes(&raw, "control-plane-vip").is_none(),
            "{name}"
        );
        let (p, r) = render_with_test_keys(&lab);
        let k = p.kubernetes.as_ref().expect("k");
        assert!(k.control_plane_vip.is_none(), "{name}");
        assert!(
            k.provision.phase(PhaseId::Vip).is_none(),
            "{name}: a vip phase"
        );
        assert!(
            k.provision
                .inputs
                .iter()
                .all(|i| i.name != value::VRRP_PASSWORD),
            "{name}: a VRRP password"
        );
        for (rel, text) in r.files() {
            assert!(!rel.contains("keepalived"), "{name}: {rel}");
            assert!(
                !text.contains("keepalived"),
                "{name}: {rel} mentions keepalived"
            );
        }
        let init = p.node(&k.init_node).expect("init");
        assert_eq!(
            k.control_plane_endpoint,
            format!("{}:6443", init.cluster_ip),
            "{name}"
        );
    }
    assert!(seen >= 1, "no single-control-plane Kubernetes lab in labs/");
}
