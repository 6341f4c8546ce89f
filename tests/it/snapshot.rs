//! Real snapshot and reset under QEMU/TCG (`cargo test --test it snapshot_ -- --include-ignored`):
//! `klab up --snapshot`, then a marker file and a broken second NIC inside the guest, then
//! `klab reset`: the marker is gone, the address is back, the clock is the host's (the ratio of
//! reset to fresh `up` is printed; scripts/bench-reset.sh is the benchmark).

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use super::e2e::{klab, ok};

const LAB: &str = "e2ecp";
const COPY: &str = "snap";
const NAME: &str = "e2ecp-snap";

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = klab(&["down", LAB, "--copy", COPY]);
    }
}

fn on(cmd: &str) -> String {
    ok(&["ssh", &format!("{NAME}/vm"), "--", cmd])
}

#[test]
#[ignore = "needs libvirt qemu:///system and the test guest image"]
fn snapshot_reset_puts_the_lab_back_in_seconds() {
    let lab_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/e2e-copies.toml");
    let lab_path = lab_file.to_str().unwrap();
    let _ = klab(&["down", LAB, "--copy", COPY]);
    let _down = Down;

    let t = Instant::now();
    let out = klab(&["up", lab_path, "--copy", COPY, "--snapshot"]);
    let up_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "klab up --snapshot failed");
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "snapshot", "list", LAB, "--copy", COPY, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(list["snapshots"][0]["name"], "initial", "{list}");

    let net1 = on("ip -o -4 addr show dev net1");
    assert!(net1.contains(" inet "), "{net1}");
    on("echo broken > /home/klab/marker && sudo ip addr flush dev net1");
    assert!(!on("ip -o -4 addr show dev net1").contains(" inet "));
    // The guest's clock after a revert is the one at the snapshot: let time pass so it shows.
    std::thread::sleep(std::time::Duration::from_secs(20));

    let t = Instant::now();
    let out = klab(&["reset", LAB, "--copy", COPY, "--output", "json"]);
    let reset_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "klab reset failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let behind = report["clock_behind"]["vm"]
        .as_f64()
        .expect("clock measured");
    assert!(behind > 15.0, "the reverted clock was not behind: {report}");

    assert_eq!(
        on("test -e /home/klab/marker && echo there || echo gone").trim(),
        "gone"
    );
    assert_eq!(on("ip -o -4 addr show dev net1"), net1, "net1 is back");
    let guest: f64 = on("date -u +%s.%N").trim().parse().unwrap();
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (host - guest).abs() < 10.0,
        "guest clock {guest} vs host {host}"
    );
    // The figure, not a timed assertion (scripts/bench-reset.sh is the benchmark).
    eprintln!(
        "reset / up = {reset_secs:.1}s / {up_secs:.1}s = {:.3}",
        reset_secs / up_secs
    );

    // Down removes the snapshots with the lab.
    ok(&["down", LAB, "--copy", COPY]);
    assert!(!klab::paths::state_root().join(NAME).exists());
}
