//! Provisioning steps as data: which phase runs on which nodes, in which order.

use super::types::{KubernetesSpec, ProvisionStep};

/// Steps for a Kubernetes lab, in execution order. Steps with no nodes are left out (a single
/// control plane has no `join-control-plane`, a lab without a VIP no `kube-vip`).
pub fn kubernetes_steps(k: &KubernetesSpec) -> Vec<ProvisionStep> {
    let all: Vec<String> = k
        .control_planes
        .iter()
        .chain(k.workers.iter())
        .cloned()
        .collect();
    let init = if k.init_node.is_empty() {
        Vec::new()
    } else {
        vec![k.init_node.clone()]
    };
    let other_cps: Vec<String> = k
        .control_planes
        .iter()
        .filter(|n| **n != k.init_node)
        .cloned()
        .collect();
    let vip_nodes = if k.control_plane_vip.is_some() {
        k.control_planes.clone()
    } else {
        Vec::new()
    };

    let candidates = [
        (
            "preflight",
            all.clone(),
            false,
            "swap off, kernel modules, sysctls, firewall and SELinux",
        ),
        (
            "containerd",
            all.clone(),
            false,
            "install containerd with the systemd cgroup driver",
        ),
        (
            "kubernetes-packages",
            all,
            false,
            "install and hold kubelet, kubeadm and kubectl",
        ),
        (
            "kube-vip",
            vip_nodes,
            false,
            "kube-vip static pod for the control-plane VIP",
        ),
        (
            "kubeadm-init",
            init.clone(),
            true,
            "kubeadm init on the first control plane",
        ),
        (
            "join-control-plane",
            other_cps,
            true,
            "join the other control planes, one at a time",
        ),
        (
            "join-workers",
            k.workers.clone(),
            true,
            "join the workers, one at a time",
        ),
        (
            "calico",
            init.clone(),
            true,
            "install Calico pinned to the cluster interface",
        ),
        (
            "wait-ready",
            init.clone(),
            true,
            "wait until every node is Ready",
        ),
        (
            "kubeconfig",
            init,
            true,
            "fetch the admin kubeconfig into the state directory",
        ),
    ];
    candidates
        .into_iter()
        .filter(|(_, nodes, _, _)| !nodes.is_empty())
        .map(|(id, nodes, serial, description)| ProvisionStep {
            id: id.to_string(),
            nodes,
            serial,
            description: description.to_string(),
        })
        .collect()
}
