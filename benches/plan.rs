//! `cargo bench --bench plan`: plan + render of a 200-node lab (and parse + validate of the same lab
//! as TOML once the loader exists). Prints median and p95 in ms; the target is < 50 ms.

use std::time::{Duration, Instant};

use klab::plan::{self, fixtures};
use klab::render::{self, Templates};

const NODES: usize = 200;
const ITERATIONS: usize = 30;

fn generated_toml(nodes: usize) -> String {
    let mut s = String::from(
        "name = \"big\"\n\n[networks.outside]\nmode = \"nat\"\ncidr = \"172.16.0.0/16\"\n\n\
         [networks.cluster]\nmode = \"isolated\"\ncidr = \"10.10.0.0/16\"\n\n\
         [[nodes]]\nname = \"cp1\"\nrole = \"control-plane\"\n\
         nics = [ { network = \"outside\" }, { network = \"cluster\" } ]\n\n",
    );
    s.push_str(&format!(
        "[[nodes]]\nname = \"w\"\ncount = {}\nrole = \"worker\"\n\
         nics = [ {{ network = \"outside\" }}, {{ network = \"cluster\" }} ]\n\n\
         [kubernetes]\nversion = \"1.36\"\ncluster-network = \"cluster\"\n",
        nodes - 1
    ));
    s
}

fn measure(label: &str, mut f: impl FnMut()) {
    f(); // warm-up
    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = times[times.len() / 2];
    let p95 = times[(times.len() * 95).div_ceil(100).saturating_sub(1)];
    println!(
        "{label}: median {:.2} ms, p95 {:.2} ms ({ITERATIONS} runs)",
        ms(median),
        ms(p95)
    );
}

fn main() {
    let templates = Templates::builtin().expect("built-in templates parse");
    let lab = fixtures::generated_lab(NODES);
    let keys = fixtures::test_keys(&lab);
    let mut inputs = fixtures::inputs(&lab.name);
    inputs.keys = Some(keys.clone());

    measure(&format!("plan, {NODES} nodes"), || {
        std::hint::black_box(plan::plan(&lab, &inputs));
    });
    measure(&format!("plan + render, {NODES} nodes"), || {
        let p = plan::plan(&lab, &inputs);
        let r = render::render_lab(&p, Some(&keys), &templates).expect("render");
        std::hint::black_box(r);
    });

    let toml = generated_toml(NODES);
    match klab::config::parse_str(&toml, "bench.toml") {
        Ok(parsed) => {
            let keys = fixtures::test_keys(&parsed);
            measure(
                &format!("parse + validate + plan + render, {NODES} nodes"),
                || {
                    let lab = klab::config::parse_str(&toml, "bench.toml").expect("parses");
                    let mut inputs = fixtures::inputs(&lab.name);
                    inputs.keys = Some(keys.clone());
                    let p = plan::plan(&lab, &inputs);
                    let r = render::render_lab(&p, Some(&keys), &templates).expect("render");
                    std::hint::black_box(r);
                },
            );
        }
        Err(d) => println!(
            "parse + validate: skipped, the generated lab file does not load yet ({})",
            d.0.first()
                .map(|x| x.message.as_str())
                .unwrap_or("no message")
        ),
    }
}
