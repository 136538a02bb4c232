//! confd render suite: the shipped templates rendered in-process through confd's own path.
//!
//! One render here is what one daemon pass does before writing: read the template file,
//! [`template_data`] (snapshot -> JSON document) and [`Renderer::render`] (Handlebars with
//! confd's helpers, strict mode). The snapshot is built once per size (the source does that
//! as changes arrive, not per render). Each size is rendered repeatedly, for at least
//! [`MIN_RUNS`] runs and until [`BUDGET`] has passed or [`MAX_RUNS`] runs were made.

use crate::common::{ms3, Summary};
use crate::workload;
use confd::model::{template_data, Snapshot};
use confd::render::Renderer;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const MIN_RUNS: usize = 20;
const MAX_RUNS: usize = 500;
const BUDGET: Duration = Duration::from_secs(3);
const TEMPLATES: [&str; 2] = ["nginx.conf.hbs", "haproxy.cfg.hbs"];

struct Row {
    template: &'static str,
    instances: usize,
    services: usize,
    vhosts: usize,
    data: Summary,
    total: Summary,
    bytes: usize,
}

/// Renders each shipped template at each size and prints the table.
pub fn run(counts: &[usize]) {
    let vars = BTreeMap::new();
    let mut rows = Vec::new();
    for &n in counts {
        let snap = Snapshot::build(
            (0..n).map(|i| workload::instance(i, n)),
            BTreeMap::new(),
            &[],
        );
        let vhosts = template_data(&snap, &vars)["vhosts"]
            .as_array()
            .map_or(0, Vec::len);
        for template in TEMPLATES {
            let path = switchboard_tests::workspace_root()
                .join("templates")
                .join(template);
            let name = path.display().to_string();
            let mut renderer = Renderer::default();
            let (mut data_t, mut total_t) = (Vec::new(), Vec::new());
            let mut bytes = 0;
            let start = Instant::now();
            while total_t.len() < MIN_RUNS || (total_t.len() < MAX_RUNS && start.elapsed() < BUDGET)
            {
                let t0 = Instant::now();
                let source = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {name}: {e}"));
                let data = template_data(&snap, &vars);
                let t1 = Instant::now();
                let out = renderer
                    .render(&name, &source, &data)
                    .unwrap_or_else(|e| panic!("render failed: {e}"));
                let t2 = Instant::now();
                bytes = out.len();
                data_t.push(t1 - t0);
                total_t.push(t2 - t0);
            }
            rows.push(Row {
                template,
                instances: n,
                services: snap.services.len(),
                vhosts,
                data: Summary::of(data_t),
                total: Summary::of(total_t),
                bytes,
            });
        }
    }
    println!(
        "\n### confd: in-process render (read template + template_data + Handlebars render)\n"
    );
    println!(
        "| template        | instances | services | vhosts | runs | data median ms | render median ms | render p99 ms | output KiB |"
    );
    println!(
        "|-----------------|----------:|---------:|-------:|-----:|---------------:|-----------------:|--------------:|-----------:|"
    );
    for r in rows {
        println!(
            "| {:<15} | {:>9} | {:>8} | {:>6} | {:>4} | {:>14} | {:>16} | {:>13} | {:>10.1} |",
            r.template,
            r.instances,
            r.services,
            r.vhosts,
            r.total.n,
            ms3(r.data.median),
            ms3(r.total.median),
            ms3(r.total.p99),
            r.bytes as f64 / 1024.0
        );
    }
    println!(
        "\n\"render\" is the whole pass-side cost (file read + data + Handlebars); \"data\" is the \
         file read + template_data part of it."
    );
}
