//! The Hyper-V backend without a Windows host: cmdlet JSON parsing against recorded outputs (with
//! Windows PowerShell 5.1's quirks), golden files of every generated script for the Hyper-V version
//! of seed 000's lab, and reconcile / ownership / teardown through a runner that replays recorded
//! outputs and fails on any script it did not expect.

use std::collections::BTreeSet;
use std::sync::Arc;

use klab::backend::Backend;
use klab::backend::hyperv::json::{self, JsonError};
use klab::backend::hyperv::{HyperVBackend, PsOutput, ReplayRunner};
use klab::observed::{DomainState, Observed, OwnerTag};
use klab::plan::{LabPlan, fixtures};
use klab::reconcile::{self, Action, KnownObjects, UpInput};
use klab::render::powershell::{HvLab, HvLayout, SwitchSteps, SwitchType};
use klab::render::{RenderedLab, Templates};

fn fixture(name: &str) -> serde_json::Value {
    let path = format!(
        "{}/tests/fixtures/hyperv/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_text(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/hyperv/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------- JSON parsing

#[test]
fn hyperv_get_vm_array_with_integer_states() {
    let vms = json::parse_vms(&fixture("get-vm.json")).unwrap();
    let got: Vec<(&str, &str, Vec<String>, Vec<String>)> = vms
        .iter()
        .map(|v| {
            (
                v.name.as_str(),
                v.state.as_str(),
                v.hard_drives.clone(),
                v.dvd_drives.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "klab-seed000hv-alma1",
                "Running",
                vec![r"C:\ProgramData\klab\pools\klab-seed000hv\alma1.vhdx".to_string()],
                vec![r"C:\ProgramData\klab\pools\klab-seed000hv\alma1-seed.iso".to_string()],
            ),
            (
                "win11-dev",
                "Off",
                vec![r"D:\VMs\win11-dev.vhdx".to_string()],
                vec![],
            ),
        ]
    );
    assert_eq!(
        json::owner_from_notes(&vms[0].notes),
        Some(OwnerTag {
            lab: "seed000hv".into(),
            node: Some("alma1".into())
        })
    );
    assert_eq!(json::owner_from_notes(&vms[1].notes), None);
}

#[test]
fn hyperv_get_vm_single_object_is_a_list_of_one() {
    let vms = json::parse_vms(&fixture("get-vm-single.json")).unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].name, "klab-seed000hv-alma-w1");
    assert_eq!(vms[0].state, "Off");
    assert_eq!(json::domain_state(&vms[0].state), DomainState::Shutoff);
    // DVDDrives was a single object too.
    assert_eq!(
        vms[0].dvd_drives,
        [r"C:\ProgramData\klab\pools\klab-seed000hv\alma-w1-seed.iso"]
    );
}

#[test]
fn hyperv_depth_truncation_is_a_clear_error() {
    let e = json::parse_vms(&fixture("get-vm-depth-truncated.json")).unwrap_err();
    assert_eq!(
        e,
        JsonError::Truncated {
            what: "Get-VM",
            field: "HardDrives[0]".into(),
            shown: r"@{Path=C:\ProgramData\klab\pools\klab-seed000hv\alma1.vhdx; …".into(),
        }
    );
    assert_eq!(
        e.to_string(),
        "Get-VM: `HardDrives[0]` is the string \"@{Path=C:\\\\ProgramData\\\\klab\\\\pools\\\\klab-seed000hv\\\\alma1.vhdx; …\" where an object was expected: the JSON was cut at ConvertTo-Json's depth limit (Windows PowerShell 5.1 defaults to -Depth 2; klab's scripts use -Depth 8)"
    );
    let e = json::parse_adapters(&fixture("get-vmnetworkadapter-type-names.json")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Get-VMNetworkAdapter: `[0]` is the string \"Microsoft.HyperV.PowerShell.VMNetworkAdapter\" where an object was expected: the JSON was cut at ConvertTo-Json's depth limit (Windows PowerShell 5.1 defaults to -Depth 2; klab's scripts use -Depth 8)"
    );
}

#[test]
fn hyperv_switches_with_integer_and_string_enums() {
    let s = json::parse_switches(&fixture("get-vmswitch.json")).unwrap();
    let got: Vec<(&str, SwitchType, Option<OwnerTag>)> = s
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.switch_type,
                json::owner_from_notes(&s.notes),
            )
        })
        .collect();
    let ours = Some(OwnerTag {
        lab: "seed000hv".into(),
        node: None,
    });
    assert_eq!(
        got,
        vec![
            ("Default Switch", SwitchType::Internal, None),
            ("External LAN", SwitchType::External, None),
            (
                "klab-seed000hv-internal",
                SwitchType::Internal,
                ours.clone()
            ),
            ("lab-private", SwitchType::Private, None),
        ]
    );
    assert_eq!(
        s[1].adapter_description,
        "Intel(R) Ethernet Connection (7) I219-V"
    );
    let one = json::parse_switches(&fixture("get-vmswitch-single-strings.json")).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].name, "klab-seed000hv-outside");
    assert_eq!(one[0].switch_type, SwitchType::Internal);
    let bad = json::parse_switches(&serde_json::json!([{"Name": "x", "SwitchType": 7}]));
    assert_eq!(
        bad.unwrap_err().to_string(),
        "Get-VMSwitch: `SwitchType` 7 is not a switch type"
    );
}

#[test]
fn hyperv_netnat_single_object_and_ip_addresses() {
    let nats = json::parse_nats(&fixture("get-netnat-single.json")).unwrap();
    assert_eq!(
        nats,
        vec![json::NatInfo {
            name: "DockerNAT".into(),
            prefix: "172.17.0.0/16".into()
        }]
    );
    let ips = json::parse_ip_addresses(&fixture("get-netipaddress.json")).unwrap();
    let got: Vec<(&str, &str, u8)> = ips
        .iter()
        .map(|i| (i.alias.as_str(), i.ip.as_str(), i.prefix_length))
        .collect();
    assert_eq!(
        got,
        vec![
            ("Ethernet", "192.168.1.34", 24),
            ("vEthernet (klab-seed000hv-internal)", "10.10.1.1", 24),
            ("vEthernet (WSL (Hyper-V firewall))", "172.29.16.1", 20),
        ]
    );
}

#[test]
fn hyperv_network_adapters_and_macs() {
    let a = json::parse_adapters(&fixture("get-vmnetworkadapter.json")).unwrap();
    let got: Vec<(&str, &str, Option<&str>, String)> = a
        .iter()
        .map(|a| {
            (
                a.vm_name.as_str(),
                a.name.as_str(),
                a.switch_name.as_deref(),
                klab::render::powershell::colon_mac(&a.mac),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "klab-seed000hv-alma1",
                "ext0",
                Some("klab-seed000hv-outside"),
                "52:54:00:99:f1:f6".to_string()
            ),
            (
                "klab-seed000hv-alma1",
                "lab0",
                Some("klab-seed000hv-internal"),
                "52:54:00:e6:d1:8a".to_string()
            ),
            (
                "win11-dev",
                "Network Adapter",
                None,
                "00:15:5d:4b:01:11".to_string()
            ),
        ]
    );
}

// ---------------------------------------------------------------- golden scripts

fn seed_lab() -> (klab::model::Lab, LabPlan) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/labs/seed-000-hyperv.toml"
    ))
    .unwrap();
    let lab = klab::config::parse_str(&text, "labs/seed-000-hyperv.toml").unwrap();
    let mut inputs = fixtures::inputs(&lab.name);
    inputs.keys = Some(fixtures::test_keys(&lab));
    let plan = klab::plan::plan(&lab, &inputs);
    (lab, plan)
}

#[test]
fn hyperv_seed_000_maps_onto_switches_and_vms() {
    let (_, plan) = seed_lab();
    let hv = HvLab::from_plan(&plan, &HvLayout::default());
    let sw: Vec<(&str, SwitchType, Option<&str>, &str, bool)> = hv
        .switches
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.switch_type,
                s.host_ip.as_deref(),
                s.cidr.as_str(),
                s.nat,
            )
        })
        .collect();
    assert_eq!(
        sw,
        vec![
            (
                "klab-seed000hv-internal",
                SwitchType::Internal,
                Some("10.10.1.1"),
                "10.10.1.0/24",
                false
            ),
            (
                "klab-seed000hv-outside",
                SwitchType::Internal,
                Some("192.168.160.1"),
                "192.168.160.0/24",
                true
            ),
        ]
    );
    let vms: Vec<(&str, u32, u64, usize)> = hv
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.cpus, v.memory_bytes >> 20, v.nics.len()))
        .collect();
    assert_eq!(
        vms,
        vec![
            ("klab-seed000hv-alma1", 2, 4096, 2),
            ("klab-seed000hv-alma-w1", 2, 2048, 2),
            ("klab-seed000hv-alma-w2", 2, 2048, 2),
        ]
    );
    assert_eq!(
        hv.vms[0].disk,
        r"C:\ProgramData\klab\pools\klab-seed000hv\alma1.vhdx"
    );
    assert_eq!(
        hv.vms[0].parent,
        r"C:\ProgramData\klab\images\almalinux-9.vhdx"
    );
    assert_eq!(hv.vms[0].size_bytes, 20 << 30);
}

/// Every script the backend can generate for the lab, as (snapshot name, text).
fn all_scripts(plan: &LabPlan) -> Vec<(String, String)> {
    let t = Templates::builtin().unwrap();
    let layout = HvLayout::default();
    let hv = HvLab::from_plan(plan, &layout);
    let aliases: Vec<String> = hv.switches.iter().map(|s| s.alias.clone()).collect();
    let mut out = vec![
        t.ps_preflight().unwrap(),
        t.ps_wsl_forwarding(&aliases).unwrap(),
        t.ps_observe(&plan.prefix, &layout).unwrap(),
    ];
    out.push(
        t.ps_ensure_dir(&hv.dir, "klab-owner-seed000hv.tag")
            .unwrap(),
    );
    for s in &hv.switches {
        out.push(t.ps_get_network(s).unwrap());
        let steps = SwitchSteps {
            create: true,
            host_ip: true,
            nat_create: s.nat,
        };
        out.push(t.ps_ensure_switch(s, steps).unwrap());
        out.push(t.ps_remove_switch(&s.name).unwrap());
    }
    for v in &hv.vms {
        out.push(t.ps_new_disk(v).unwrap());
        out.push(t.ps_new_vm(v).unwrap());
        out.push(t.ps_start_vm(&v.name).unwrap());
        out.push(t.ps_stop_vm(&v.name).unwrap());
        out.push(t.ps_vm_state(&v.name).unwrap());
        out.push(t.ps_remove_vm(&v.name, &layout).unwrap());
        out.push(t.ps_remove_file(&v.seed).unwrap());
    }
    out.push(
        t.ps_remove_dir(&hv.dir, "klab-owner-seed000hv.tag")
            .unwrap(),
    );
    out.into_iter()
        .map(|s| {
            let object = s
                .object
                .rsplit(['\\', '/'])
                .next()
                .unwrap_or("")
                .to_string();
            (format!("{}__{object}", s.op), s.text)
        })
        .collect()
}

#[test]
fn hyperv_golden_scripts_for_seed_000() {
    let (_, plan) = seed_lab();
    let scripts = all_scripts(&plan);
    assert_eq!(scripts.len(), 3 + 1 + 2 * 3 + 3 * 7 + 1);
    for (name, text) in &scripts {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[1..4],
            [
                "$ErrorActionPreference = 'Stop'",
                "$ProgressPreference = 'SilentlyContinue'",
                "[Console]::OutputEncoding = [Text.Encoding]::UTF8",
            ],
            "{name}"
        );
        assert!(text.contains("-Depth 8 -Compress"), "{name}");
        assert!(
            text.contains("Write-KlabResult ("),
            "{name}: one JSON result"
        );
        insta::assert_snapshot!(format!("hyperv_seed-000-hyperv__{name}.ps1"), text);
    }
}

#[test]
fn hyperv_ensure_switch_variants() {
    let (_, plan) = seed_lab();
    let t = Templates::builtin().unwrap();
    let hv = HvLab::from_plan(&plan, &HvLayout::default());
    let outside = hv.switch("klab-seed000hv-outside").unwrap();
    let only_nat = t
        .ps_ensure_switch(
            outside,
            SwitchSteps {
                nat_create: true,
                ..SwitchSteps::default()
            },
        )
        .unwrap();
    assert!(!only_nat.text.contains("New-VMSwitch"));
    assert!(!only_nat.text.contains("New-NetIPAddress"));
    assert!(only_nat.text.contains(
        "New-NetNat -Name 'klab-seed000hv-outside' -InternalIPInterfaceAddressPrefix '192.168.160.0/24'"
    ));
    let mut external = outside.clone();
    external.switch_type = SwitchType::External;
    external.adapter = Some("Wi-Fi 2".into());
    external.host_ip = None;
    external.nat = false;
    let s = t
        .ps_ensure_switch(
            &external,
            SwitchSteps {
                create: true,
                ..SwitchSteps::default()
            },
        )
        .unwrap();
    assert!(s.text.contains(
        "New-VMSwitch -Name $name -NetAdapterName 'Wi-Fi 2' -AllowManagementOS $true -Notes $notes"
    ));
    let mut private = outside.clone();
    private.switch_type = SwitchType::Private;
    let s = t
        .ps_ensure_switch(
            &private,
            SwitchSteps {
                create: true,
                ..SwitchSteps::default()
            },
        )
        .unwrap();
    assert!(
        s.text
            .contains("New-VMSwitch -Name $name -SwitchType 'Private' -Notes $notes")
    );
}

/// Hostile text in every user-controlled field stays inside one single-quoted literal.
#[test]
fn hyperv_hostile_values_are_quoted_in_every_field() {
    let (_, plan) = seed_lab();
    let t = Templates::builtin().unwrap();
    let hostile = "x'; Remove-Item C:\\ -Recurse -Force; '$(Stop-Computer)`\n\u{2019}ノ";
    let quoted = "'x''; Remove-Item C:\\ -Recurse -Force; ''$(Stop-Computer)`\n\u{2019}\u{2019}ノ'";
    let mut hv = HvLab::from_plan(&plan, &HvLayout::default());
    let v = &mut hv.vms[0];
    v.name = hostile.into();
    v.disk = hostile.into();
    v.parent = hostile.into();
    v.seed = hostile.into();
    v.notes = hostile.into();
    v.nics[0].name = hostile.into();
    v.nics[0].switch = hostile.into();
    v.nics[0].mac = hostile.into();
    let vm = t.ps_new_vm(v).unwrap().text;
    // name, disk, seed, notes, NIC name, switch and MAC.
    assert_eq!(vm.matches(quoted).count(), 7, "{vm}");
    assert!(!vm.contains("'; Remove-Item C:\\ -Recurse -Force; '$"));
    let disk = t.ps_new_disk(v).unwrap().text;
    assert_eq!(disk.matches(quoted).count(), 2, "{disk}");
    let s = &mut hv.switches[1];
    s.name = hostile.into();
    s.alias = hostile.into();
    s.notes = hostile.into();
    s.cidr = hostile.into();
    s.host_ip = Some(hostile.into());
    s.adapter = Some(hostile.into());
    let all = SwitchSteps {
        create: true,
        host_ip: true,
        nat_create: true,
    };
    let sw = t.ps_ensure_switch(s, all).unwrap().text;
    // name, notes, alias, host ip, nat name, cidr.
    assert_eq!(sw.matches(quoted).count(), 6, "{sw}");
    let mut ext = s.clone();
    ext.switch_type = SwitchType::External;
    let sw = t.ps_ensure_switch(&ext, all).unwrap().text;
    assert_eq!(sw.matches(quoted).count(), 7, "{sw}");
    for text in [
        t.ps_remove_switch(hostile).unwrap().text,
        t.ps_start_vm(hostile).unwrap().text,
        t.ps_remove_vm(hostile, &HvLayout::default()).unwrap().text,
        t.ps_remove_file(hostile).unwrap().text,
        t.ps_observe(hostile, &HvLayout::default()).unwrap().text,
    ] {
        assert!(text.contains(quoted), "{text}");
    }
    // NUL cannot be passed at all.
    v.name = "a\0b".into();
    let e = t.ps_new_vm(&hv.vms[0]).unwrap_err();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    assert!(
        msg.contains("a NUL character cannot be passed to PowerShell"),
        "{msg}"
    );
}

#[test]
fn hyperv_templates_are_overridable() {
    let mut o = std::collections::BTreeMap::new();
    o.insert(
        "hyperv-start-vm.ps1.j2".to_string(),
        "{% extends \"hyperv-base.ps1.j2\" %}{% block body %}    Start-VM -Name {{ vm | ps }}\n    Write-KlabResult ([ordered]@{ Name = {{ vm | ps }} })\n{% endblock %}".to_string(),
    );
    let t = Templates::new(o).unwrap();
    assert_eq!(t.overridden(), ["hyperv-start-vm.ps1.j2"]);
    let s = t.ps_start_vm("klab-a-'b").unwrap();
    assert!(
        s.text.contains("    Start-VM -Name 'klab-a-''b'\n"),
        "{}",
        s.text
    );
    assert!(
        s.text
            .starts_with("# klab start-vm: generated from powershell/hyperv-start-vm.ps1.j2")
    );
}

// ---------------------------------------------------------------- reconcile through replay

struct Rig {
    replay: Arc<ReplayRunner>,
    backend: HyperVBackend,
    plan: LabPlan,
    rendered: RenderedLab,
}

fn rig() -> Rig {
    let (lab, plan) = seed_lab();
    let keys = fixtures::test_keys(&lab);
    let templates = Arc::new(Templates::builtin().unwrap());
    let rendered = klab::render::render_lab(&plan, Some(&keys), &templates).unwrap();
    let replay = Arc::new(ReplayRunner::new());
    let layout = HvLayout::default();
    let hv = HvLab::from_plan(&plan, &layout);
    let backend = HyperVBackend::new(replay.clone(), templates, layout, Some(hv));
    Rig {
        replay,
        backend,
        plan,
        rendered,
    }
}

/// Apply reconcile actions one by one on the backend (what the executor does, minus SSH waits).
fn apply(r: &Rig, actions: &[Action]) {
    klab::usecase::hyperv::apply(&r.backend, &r.plan, &r.rendered, actions).unwrap();
}

fn up_actions(r: &Rig, observed: &Observed) -> Vec<Action> {
    reconcile::plan_up(&UpInput {
        desired: &r.plan,
        previous: Some(&r.plan),
        observed,
        recreate: &BTreeSet::new(),
        journal: None,
        seed_hashes: &std::collections::BTreeMap::new(),
    })
    .unwrap()
    .actions
}

#[test]
fn hyperv_up_on_an_empty_host_then_up_again_is_a_noop() {
    let r = rig();
    r.replay.expect(
        "observe klab-seed000hv",
        &fixture_text("observe-empty.json"),
    );
    let observed = r.backend.observe(&r.plan.prefix).unwrap();
    assert_eq!(observed, Observed::default());
    let actions = up_actions(&r, &observed);
    let pool_dir = r"C:\ProgramData\klab\pools\klab-seed000hv";
    let empty_net = fixture_text("get-network-empty.json");
    r.replay
        .expect(&format!("ensure-dir {pool_dir}"), "[{}]")
        .expect("get-network klab-seed000hv-internal", &empty_net)
        .expect("ensure-switch klab-seed000hv-internal", "[{}]")
        .expect("get-network klab-seed000hv-outside", &empty_net)
        .expect("ensure-switch klab-seed000hv-outside", "[{}]");
    for n in ["alma1", "alma-w1", "alma-w2"] {
        r.replay
            .expect(&format!(r"new-disk {pool_dir}\{n}.vhdx"), "[{}]")
            .expect(&format!("new-vm klab-seed000hv-{n}"), "[{}]");
    }
    apply(&r, &actions);
    assert_eq!(r.replay.unexpected(), Vec::<String>::new());
    assert_eq!(r.replay.pending(), Vec::<String>::new());
    // The vfat seeds went to the host as ISO 9660 images (25 header sectors + the three files).
    let files = r.replay.files();
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!(r"{pool_dir}\alma1-seed.iso"),
            format!(r"{pool_dir}\alma-w1-seed.iso"),
            format!(r"{pool_dir}\alma-w2-seed.iso"),
        ]
    );
    assert!(
        files.iter().all(|(_, n)| n % 2048 == 0 && *n >= 28 * 2048),
        "{files:?}"
    );
    // The switch scripts created everything: switch, host address, and the NAT on `outside` only.
    let ran = r.replay.ran();
    let by_key = |k: &str| ran.iter().find(|s| s.key() == k).unwrap().text.clone();
    let internal = by_key("ensure-switch klab-seed000hv-internal");
    assert!(internal.contains("-SwitchType 'Internal' -Notes $notes"));
    assert!(internal.contains(
        "New-NetIPAddress -InterfaceAlias 'vEthernet (klab-seed000hv-internal)' -IPAddress '10.10.1.1' -PrefixLength 24"
    ));
    assert!(!internal.contains("New-NetNat"));
    assert!(
        by_key("ensure-switch klab-seed000hv-outside")
            .contains("New-NetNat -Name 'klab-seed000hv-outside'")
    );

    // Up again: everything observed, nothing but the SSH waits to do, and no script runs.
    r.replay.expect(
        "observe klab-seed000hv",
        &fixture_text("observe-seed000hv-up.json"),
    );
    let observed = r.backend.observe(&r.plan.prefix).unwrap();
    let again = up_actions(&r, &observed);
    assert!(
        again.iter().all(|a| matches!(a, Action::WaitNode { .. })),
        "{again:?}"
    );
    let before = r.replay.ran().len();
    apply(&r, &again);
    assert_eq!(r.replay.ran().len(), before);
    assert_eq!(r.replay.unexpected(), Vec::<String>::new());
}

#[test]
fn hyperv_ensure_network_is_a_noop_when_switch_address_and_nat_exist() {
    let r = rig();
    let doc = r#"[{"Switches":[{"Name":"klab-seed000hv-outside","SwitchType":1,"Notes":"klab:lab=seed000hv","NetAdapterInterfaceDescription":null}],"Nats":{"Name":"shared","InternalIPInterfaceAddressPrefix":"192.168.0.0/16"},"Addresses":{"InterfaceAlias":"vEthernet (klab-seed000hv-outside)","IPAddress":"192.168.160.1","PrefixLength":24}}]"#;
    r.replay.expect("get-network klab-seed000hv-outside", doc);
    r.backend
        .ensure_network("klab-seed000hv-outside", "<network/>")
        .unwrap();
    assert_eq!(r.replay.ran_keys(), ["get-network klab-seed000hv-outside"]);
}

#[test]
fn hyperv_nat_conflict_and_foreign_switch_are_refused_with_the_reason() {
    let r = rig();
    r.replay.expect(
        "get-network klab-seed000hv-outside",
        &fixture_text("get-network-docker-nat.json"),
    );
    let e = r
        .backend
        .ensure_network("klab-seed000hv-outside", "<network/>")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "ensure network `klab-seed000hv-outside`: this host already has the NAT network `DockerNAT` (172.17.0.0/16), which does not cover 192.168.160.0/24, and Windows allows one NAT per host: remove it (`Remove-NetNat -Name …`) if nothing needs it, or give the nat network a cidr inside it"
    );
    let foreign = r#"[{"Switches":[{"Name":"klab-seed000hv-internal","SwitchType":"Internal","Notes":"","NetAdapterInterfaceDescription":""}],"Nats":[],"Addresses":[]}]"#;
    r.replay
        .expect("get-network klab-seed000hv-internal", foreign);
    let e = r
        .backend
        .ensure_network("klab-seed000hv-internal", "<network/>")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "ensure network `klab-seed000hv-internal`: a switch `klab-seed000hv-internal` exists without klab's tag in its Notes; klab leaves it alone (rename or remove it)"
    );
    // Nothing but the two reads ran.
    assert_eq!(
        r.replay.ran_keys(),
        [
            "get-network klab-seed000hv-outside",
            "get-network klab-seed000hv-internal"
        ]
    );
}

#[test]
fn hyperv_cmdlet_errors_surface_their_own_message() {
    let r = rig();
    let envelope = r#"{"klabError":true,"message":"You do not have the required permission to complete this task. Contact the administrator of the authorization policy for the computer 'DESKTOP-1'.","errorId":"VirtualizationException,Microsoft.HyperV.PowerShell.Commands.StartVM","category":"PermissionDenied","command":"Start-VM"}"#;
    r.replay.expect_output(
        "start-vm klab-seed000hv-alma1",
        PsOutput {
            stdout: envelope.into(),
            stderr: String::new(),
            code: Some(1),
        },
    );
    let e = r.backend.start_domain("klab-seed000hv-alma1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "start domain `klab-seed000hv-alma1`: Start-VM: You do not have the required permission to complete this task. Contact the administrator of the authorization policy for the computer 'DESKTOP-1'. (VirtualizationException,Microsoft.HyperV.PowerShell.Commands.StartVM)"
    );
    // An unexpected script is refused by the replay runner, and surfaces as a backend error.
    let e = r.backend.remove_domain("klab-seed000hv-alma1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "remove domain `klab-seed000hv-alma1`: replay: unexpected script `remove-vm klab-seed000hv-alma1` (nothing more was expected)"
    );
}

#[test]
fn hyperv_down_removes_only_tagged_objects() {
    let r = rig();
    r.replay.expect(
        "observe klab-seed000hv",
        &fixture_text("observe-seed000hv-with-lookalikes.json"),
    );
    let observed = r.backend.observe(&r.plan.prefix).unwrap();
    let impostor = observed
        .domains
        .iter()
        .find(|d| d.name == "klab-seed000hv-impostor")
        .unwrap();
    assert_eq!(impostor.owner, None);
    assert_eq!(impostor.state, DomainState::Running);
    assert_eq!(observed.pools[0].owner.as_deref(), Some("seed000hv"));
    assert_eq!(
        observed
            .volumes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        [
            "klab-owner-seed000hv.tag",
            "alma1.qcow2",
            "alma1-seed.img",
            "alma-w1.qcow2",
            "alma-w1-seed.img",
            "alma-w2.qcow2",
            "alma-w2-seed.img"
        ]
    );
    let known = KnownObjects {
        pool: Some((r.plan.pool.name.clone(), true)),
        volumes: r
            .plan
            .nodes
            .iter()
            .flat_map(|n| [n.overlay.name.clone(), n.seed.name.clone()])
            .collect(),
    };
    let down = reconcile::plan_down("seed000hv", &observed, &known);
    let left: Vec<&str> = down.left.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        left,
        ["klab-seed000hv-impostor", "klab-seed000hv-lookalike"]
    );
    let pool_dir = r"C:\ProgramData\klab\pools\klab-seed000hv";
    let mut expected = Vec::new();
    for a in &down.actions {
        expected.push(match a {
            Action::RemoveDomain { domain, .. } => format!("remove-vm {domain}"),
            Action::RemoveVolume { volume, .. } => format!(
                r"remove-file {pool_dir}\{}",
                klab::render::powershell::hv_file_name(volume)
            ),
            Action::RemoveNetwork { network } => format!("remove-switch {network}"),
            Action::RemovePool { .. } => format!("remove-dir {pool_dir}"),
            other => panic!("down must only remove: {other:?}"),
        });
    }
    for k in &expected {
        r.replay.expect(k, "[{}]");
    }
    apply(&r, &down.actions);
    assert_eq!(r.replay.unexpected(), Vec::<String>::new());
    assert_eq!(r.replay.pending(), Vec::<String>::new());
    let ran = r.replay.ran_keys();
    assert!(
        ran.iter()
            .all(|k| !k.contains("impostor") && !k.contains("lookalike")),
        "{ran:?}"
    );
    for vm in ["alma1", "alma-w1", "alma-w2"] {
        assert!(
            ran.contains(&format!("remove-vm klab-seed000hv-{vm}")),
            "{ran:?}"
        );
    }
    assert!(ran.contains(&"remove-switch klab-seed000hv-internal".to_string()));
    assert!(ran.contains(&"remove-switch klab-seed000hv-outside".to_string()));
    assert_eq!(ran.last().unwrap(), &format!("remove-dir {pool_dir}"));
    // The removal scripts themselves refuse untagged objects and delete only under klab's root.
    let rm = r
        .replay
        .ran()
        .into_iter()
        .find(|s| s.op == "remove-vm")
        .unwrap();
    assert!(
        rm.text
            .contains("does not carry klab's tag; klab leaves it alone")
    );
    assert!(
        rm.text.contains("$root = 'C:\\ProgramData\\klab\\pools\\'"),
        "{}",
        rm.text
    );
}

/// `up --dry-run` on Hyper-V: the same flow over a runner that executes nothing and records the
/// scripts it would run.
#[test]
fn hyperv_dry_run_records_the_scripts_of_an_up() {
    let (lab, plan) = seed_lab();
    let keys = fixtures::test_keys(&lab);
    let templates = Arc::new(Templates::builtin().unwrap());
    let rendered = klab::render::render_lab(&plan, Some(&keys), &templates).unwrap();
    let dry = Arc::new(klab::backend::hyperv::DryRunRunner::new());
    let layout = HvLayout::default();
    let hv = HvLab::from_plan(&plan, &layout);
    let backend = HyperVBackend::new(dry.clone(), templates, layout, Some(hv));
    assert_eq!(backend.preflight(true).unwrap(), vec![]);
    let observed = backend.observe(&plan.prefix).unwrap();
    let r = Rig {
        replay: Arc::new(ReplayRunner::new()),
        backend,
        plan,
        rendered,
    };
    let actions = up_actions(&r, &observed);
    apply(&r, &actions);
    let keys: Vec<String> = dry.scripts().iter().map(|s| s.key()).collect();
    let d = r"C:\ProgramData\klab\pools\klab-seed000hv";
    assert_eq!(
        keys,
        vec![
            "preflight host".to_string(),
            "observe klab-seed000hv".into(),
            format!("ensure-dir {d}"),
            "get-network klab-seed000hv-internal".into(),
            "ensure-switch klab-seed000hv-internal".into(),
            "get-network klab-seed000hv-outside".into(),
            "ensure-switch klab-seed000hv-outside".into(),
            format!(r"new-disk {d}\alma1.vhdx"),
            "new-vm klab-seed000hv-alma1".into(),
            format!(r"new-disk {d}\alma-w1.vhdx"),
            "new-vm klab-seed000hv-alma-w1".into(),
            format!(r"new-disk {d}\alma-w2.vhdx"),
            "new-vm klab-seed000hv-alma-w2".into(),
        ]
    );
    assert!(r.replay.ran().is_empty());
}

/// The Hyper-V seed ISO as blkid sees it: an iso9660 volume labelled CIDATA.
#[test]
fn hyperv_seed_iso_is_iso9660_labelled_cidata() {
    let Some(blkid) = crate::tools::require("blkid", "util-linux") else {
        return;
    };
    let img = klab::backend::hyperv::iso::build_cidata_iso(&[
        ("meta-data", b"instance-id: i-1\nlocal-hostname: alma1\n"),
        ("user-data", b"#cloud-config\n"),
        ("network-config", b"version: 2\n"),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.iso");
    std::fs::write(&path, &img).unwrap();
    let out = std::process::Command::new(blkid)
        .args(["-p", "-o", "export"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "blkid failed: {text}");
    let fields: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("LABEL=") || l.starts_with("TYPE="))
        .collect();
    assert_eq!(fields, ["LABEL=CIDATA", "TYPE=iso9660"], "{text}");
}

/// qcow2 → dynamic VHDX, once: a second call reuses the cached file.
#[test]
fn hyperv_base_vhdx_is_converted_once_and_cached() {
    let Some(qemu_img) = crate::tools::require("qemu-img", "qemu-utils") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("almalinux-9.qcow2");
    let made = std::process::Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let vhdx = dir.path().join("images/almalinux-9.vhdx");
    let t = klab::backend::hyperv::vhdx::CONVERT_TIMEOUT;
    assert_eq!(
        klab::backend::hyperv::vhdx::ensure_base_vhdx(&qcow2, &vhdx, t),
        Ok(true)
    );
    let info = std::process::Command::new(&qemu_img)
        .args(["info", "--output", "json"])
        .arg(&vhdx)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["virtual-size"], 16 << 20);
    assert_eq!(
        klab::backend::hyperv::vhdx::ensure_base_vhdx(&qcow2, &vhdx, t),
        Ok(false)
    );
    let names: Vec<String> = std::fs::read_dir(dir.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["almalinux-9.vhdx"], "no .part file is left");
    let e =
        klab::backend::hyperv::vhdx::ensure_base_vhdx(&dir.path().join("missing.qcow2"), &vhdx, t)
            .unwrap_err();
    assert!(
        e.ends_with("missing.qcow2: No such file or directory (os error 2)"),
        "{e}"
    );
}

#[test]
fn hyperv_domain_state_stop_and_observed_nics() {
    let r = rig();
    r.replay
        .expect(
            "vm-state klab-seed000hv-alma1",
            r#"[{"Name":"klab-seed000hv-alma1","State":"Running","Notes":"klab:lab=seed000hv node=alma1"}]"#,
        )
        .expect("vm-state klab-seed000hv-alma9", "[]")
        .expect("stop-vm klab-seed000hv-alma1", "[{}]")
        .expect(
            "observe klab-seed000hv",
            r#"[{"VMs":{"Name":"klab-seed000hv-alma1","State":3,"Notes":"klab:lab=seed000hv node=alma1","HardDrives":[],"DvdDrives":[],"NetworkAdapters":[{"VMName":"klab-seed000hv-alma1","Name":"ext0","SwitchName":"klab-seed000hv-outside","MacAddress":"52540099F1F6"},{"VMName":"klab-seed000hv-alma1","Name":"lab0","SwitchName":"","MacAddress":"525400E6D18A"}]},"Switches":[],"Pools":[]}]"#,
        );
    assert_eq!(
        r.backend.domain_state("klab-seed000hv-alma1").unwrap(),
        Some(DomainState::Running)
    );
    assert_eq!(
        r.backend.domain_state("klab-seed000hv-alma9").unwrap(),
        None
    );
    r.backend.stop_domain("klab-seed000hv-alma1").unwrap();
    let o = r.backend.observe("klab-seed000hv").unwrap();
    assert_eq!(o.domains[0].state, DomainState::Shutoff);
    assert_eq!(
        o.domains[0].nics,
        vec![
            klab::observed::ObservedNic {
                network: "klab-seed000hv-outside".into(),
                attached: Some(true)
            },
            klab::observed::ObservedNic {
                network: String::new(),
                attached: Some(false)
            },
        ]
    );
    assert!(r.replay.pending().is_empty());
}
