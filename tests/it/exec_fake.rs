//! The whole `up`/`down` flow minus SSH, on the recording fake backend: plan → reconcile → execute
//! → observe again. (Waiting for nodes needs real guests; the QEMU end-to-end test covers that.)

use std::collections::BTreeSet;
use std::sync::Arc;

use klab::backend::Backend;
use klab::backend::fake::FakeBackend;
use klab::cli::OutputFormat;
use klab::exec::{self, UpContext};
use klab::observed::DomainState;
use klab::output::Printer;
use klab::plan::{LabPlan, fixtures};
use klab::reconcile::{self, Action, KnownObjects, UpInput};

fn lab_plan() -> (klab::model::Lab, LabPlan) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/labs/e2e-isolated.toml"
    ))
    .unwrap();
    let lab = klab::config::parse_str(&text, "labs/e2e-isolated.toml").unwrap();
    let mut inputs = fixtures::inputs(&lab.name);
    inputs.keys = Some(fixtures::test_keys(&lab));
    let plan = klab::plan::plan(&lab, &inputs);
    (lab, plan)
}

/// Reconcile against the fake and apply everything but the SSH waits.
async fn up(fake: &FakeBackend, lab: &klab::model::Lab, plan: &LabPlan) -> Vec<Action> {
    let observed = fake.observe(&plan.prefix).unwrap();
    let todo = reconcile::plan_up(&UpInput {
        desired: plan,
        previous: Some(plan),
        observed: &observed,
        recreate: &BTreeSet::new(),
    })
    .unwrap();
    let keys = fixtures::test_keys(lab);
    let rendered = klab::render::render_lab(
        plan,
        Some(&keys),
        &klab::render::Templates::builtin().unwrap(),
    )
    .unwrap();
    let backend: Arc<dyn Backend> = Arc::new(fake.clone());
    let ctx = UpContext {
        backend,
        plan: Arc::new(plan.clone()),
        rendered: Arc::new(rendered),
        user_private_key: Arc::new(String::new()),
        host_keys: Arc::new(Default::default()),
        timeouts: lab.timeouts.clone(),
        printer: Printer::new(OutputFormat::Json),
        jobs: 2,
    };
    let no_wait: Vec<Action> = todo
        .actions
        .iter()
        .filter(|a| !matches!(a, Action::WaitNode { .. }))
        .cloned()
        .collect();
    exec::apply_up(&ctx, &no_wait).await.unwrap();
    todo.actions
}

#[tokio::test]
async fn up_is_idempotent_recreates_only_what_is_missing_and_down_leaves_foreign_objects() {
    let (lab, plan) = lab_plan();
    let fake = FakeBackend::new();
    fake.inject_network(
        "<network><name>klab-e2e-lookalike</name><bridge name='kltest-la9'/></network>",
        true,
    )
    .unwrap();
    fake.inject_domain(
        "<domain type='qemu'><name>klab-e2e-impostor</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
        DomainState::Running,
    )
    .unwrap();

    let first = up(&fake, &lab, &plan).await;
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::CreateNode { .. }))
            .count(),
        3
    );
    for n in &plan.nodes {
        assert_eq!(
            fake.domain(&n.domain).map(|d| d.state),
            Some(DomainState::Running)
        );
        let seed = fake
            .volume(&plan.pool.name, &n.seed.name)
            .expect("seed uploaded");
        let bytes = seed.data.expect("seed has data");
        assert_eq!(&bytes[43..54], b"CIDATA     ", "{}: FAT label", n.name);
        let overlay = fake
            .volume(&plan.pool.name, &n.overlay.name)
            .expect("overlay");
        assert!(overlay.xml.unwrap().contains("<compat>1.1</compat>"));
    }

    fake.clear_calls();
    let second = up(&fake, &lab, &plan).await;
    assert!(second.is_empty(), "second up must do nothing: {second:?}");
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());

    let victim = &plan.nodes[2];
    assert!(fake.delete_domain(&victim.domain));
    fake.clear_calls();
    let third = up(&fake, &lab, &plan).await;
    let created: Vec<_> = third
        .iter()
        .filter_map(|a| match a {
            Action::CreateNode { node } => Some(node.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(created, vec![victim.name.as_str()]);
    assert!(
        fake.mutations().iter().all(|m| m.contains(&victim.name)),
        "only the victim is touched: {:?}",
        fake.mutations()
    );

    let observed = fake.observe("klab-e2e").unwrap();
    let down = reconcile::plan_down("e2e", &observed, &KnownObjects::default());
    let backend: Arc<dyn Backend> = Arc::new(fake.clone());
    exec::apply_down(&backend, &Printer::new(OutputFormat::Json), &down.actions)
        .await
        .unwrap();
    assert_eq!(fake.domain_names(), vec!["klab-e2e-impostor".to_string()]);
    assert_eq!(fake.network_names(), vec!["klab-e2e-lookalike".to_string()]);
    assert!(!fake.pool_names().contains(&plan.pool.name));
    let left: Vec<_> = down.left.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(left, vec!["klab-e2e-impostor", "klab-e2e-lookalike"]);

    // Twice is safe.
    let again = reconcile::plan_down(
        "e2e",
        &fake.observe("klab-e2e").unwrap(),
        &KnownObjects::default(),
    );
    assert!(again.actions.is_empty());
}
