//! confd render suite: the shipped templates rendered in-process through confd's own path.
//!
//! What one daemon pass does for a new snapshot: bring the template document up to date
//! ([`TemplateData::update`], once per snapshot, shared by every template), then per template
//! read the file and render it ([`Renderer::render_data`], Handlebars with confd's helpers,
//! strict mode). Measured separately:
//! - data, full: [`TemplateData::with_parts`] from scratch (confd's first snapshot), with the
//!   parts of the document the shipped templates read (`services`, `vhosts`, `kv`, `vars`);
//! - data, update: one instance changed (its port), the document updated: what every later
//!   change pays;
//! - render: file read + Handlebars, from a document whose generation is new each run (a
//!   render whose inputs did not change is not done at all; see `Renderer::render_data`).
//!
//! Each is repeated for at least [`MIN_RUNS`] runs and until [`BUDGET`] has passed or
//! [`MAX_RUNS`] runs were made. The goals of issue 14 are printed beside the figures.
//! `BENCH_RENDER_DUMP=DIR` also writes the outputs (see [`dump`]).

use crate::common::{ms3, thread_cpu, Summary};
use crate::workload;
use confd::data::{Parts, TemplateData, Vars};
use confd::model::Snapshot;
use confd::render::Renderer;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIN_RUNS: usize = 20;
const MAX_RUNS: usize = 500;
const BUDGET: Duration = Duration::from_secs(3);
const TEMPLATES: [&str; 2] = ["nginx.conf.hbs", "haproxy.cfg.hbs"];
/// Issue 14's goals at 10,000 instances: render median per template, and the template data.
const GOAL_RENDER: Duration = Duration::from_millis(20);
const GOAL_DATA: Duration = Duration::from_millis(5);

struct Row {
    template: &'static str,
    instances: usize,
    /// Heap bytes of the snapshot (its instances) and of the template document.
    snapshot_bytes: usize,
    document_bytes: usize,
    services: usize,
    vhosts: usize,
    full: Summary,
    update: Summary,
    render: Summary,
    /// The same renders in this thread's CPU time.
    render_cpu: Summary,
    bytes: usize,
}

/// Runs `f` repeatedly (see the module doc) and summarises its durations.
fn measure(mut f: impl FnMut() -> Duration) -> Summary {
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < MIN_RUNS || (t.len() < MAX_RUNS && start.elapsed() < BUDGET) {
        t.push(f());
    }
    Summary::of(t)
}

/// Two snapshots of `n` instances that differ in one instance's port.
fn snapshots(n: usize) -> (Arc<Snapshot>, Arc<Snapshot>) {
    let a = Snapshot::build(
        (0..n).map(|i| workload::instance(i, n)),
        Default::default(),
        &[],
    );
    let mut b = a.clone();
    if let Some(first) = b.services.values_mut().next().and_then(|v| v.first_mut()) {
        Arc::make_mut(first).port ^= 1;
    }
    (Arc::new(a), Arc::new(b))
}

/// Renders each shipped template at each size and prints the table.
pub fn run(counts: &[usize]) {
    let vars = Vars::new();
    let mut rows = Vec::new();
    for &n in counts {
        let before = crate::live_bytes();
        let (a, b) = snapshots(n);
        // Two snapshots sharing all but one instance: about one snapshot's worth.
        let snapshot_bytes = crate::live_bytes().saturating_sub(before);
        let before = crate::live_bytes();
        // The parts of the document the shipped templates read, as the daemon finds them.
        let mut data = TemplateData::with_parts(a.clone(), &vars, Parts::default());
        for template in TEMPLATES {
            let path = template_path(template);
            let source = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let out = Renderer::default()
                .render_data(template, &source, &mut data)
                .unwrap_or_else(|e| panic!("render failed: {e}"));
            dump(template, n, &out);
        }
        let parts = data.parts();
        let document_bytes = crate::live_bytes().saturating_sub(before);
        let full = measure(|| {
            let t0 = Instant::now();
            let d = TemplateData::with_parts(a.clone(), &vars, parts);
            let t = t0.elapsed();
            drop(d);
            t
        });
        let vhosts = data.value()["vhosts"].as_array().map_or(0, Vec::len);
        let mut flip = false;
        let update = measure(|| {
            flip = !flip;
            let next = if flip { &b } else { &a };
            let t0 = Instant::now();
            assert!(data.update(next.clone(), &vars), "the snapshots differ");
            t0.elapsed()
        });
        for template in TEMPLATES {
            let path = template_path(template);
            let name = path.display().to_string();
            let mut renderer = Renderer::default();
            let mut bytes = 0;
            let mut cpu = Vec::new();
            let render = measure(|| {
                flip = !flip;
                data.update(if flip { b.clone() } else { a.clone() }, &vars);
                let (t0, c0) = (Instant::now(), thread_cpu());
                let source = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {name}: {e}"));
                let out = renderer
                    .render_data(&name, &source, &mut data)
                    .unwrap_or_else(|e| panic!("render failed: {e}"));
                let t = t0.elapsed();
                cpu.push(thread_cpu() - c0);
                bytes = out.len();
                t
            });
            let render_cpu = Summary::of(cpu);
            rows.push(Row {
                template,
                instances: n,
                snapshot_bytes,
                document_bytes,
                services: a.services.len(),
                vhosts,
                full,
                update,
                render,
                render_cpu,
                bytes,
            });
        }
    }
    println!(
        "\n### confd: in-process render (template data once per snapshot, then each template)\n"
    );
    println!(
        "| template        | instances | services | vhosts | data full ms | data update ms | runs | render median ms | render p99 ms | render CPU median ms | output KiB |"
    );
    println!(
        "|-----------------|----------:|---------:|-------:|-------------:|---------------:|-----:|-----------------:|--------------:|---------------------:|-----------:|"
    );
    for r in &rows {
        println!(
            "| {:<15} | {:>9} | {:>8} | {:>6} | {:>12} | {:>14} | {:>4} | {:>16} | {:>13} | {:>20} | {:>10.1} |",
            r.template,
            r.instances,
            r.services,
            r.vhosts,
            ms3(r.full.median),
            ms3(r.update.median),
            r.render.n,
            ms3(r.render.median),
            ms3(r.render.p99),
            ms3(r.render_cpu.median),
            r.bytes as f64 / 1024.0
        );
    }
    println!(
        "\n\"data full\" builds the document from scratch (first snapshot); \"data update\" \
         brings it to a snapshot with one instance changed (every later change); both are paid \
         once per snapshot, whatever the number of templates. \"render\" is file read + \
         Handlebars for one template; its CPU time (this thread's) is what it costs when other \
         processes share the cores."
    );
    for r in rows.iter().filter(|r| r.instances == 10_000) {
        println!(
            "\nGoal (issue 14), {} at 10,000 instances: render median under {} ms: {} ms, {} \
             (CPU {} ms).",
            r.template,
            GOAL_RENDER.as_millis(),
            ms3(r.render.median),
            met(r.render.median <= GOAL_RENDER),
            ms3(r.render_cpu.median)
        );
    }
    println!("\nMemory (heap bytes requested, without the allocator's overhead):\n");
    println!("| instances | snapshot MiB | per instance KiB | template document MiB | per instance KiB |");
    println!("|----------:|-------------:|-----------------:|----------------------:|-----------------:|");
    for r in rows.iter().step_by(TEMPLATES.len()) {
        let per = |b: usize| b as f64 / 1024.0 / r.instances as f64;
        println!(
            "| {:>9} | {:>12.1} | {:>16.2} | {:>21.1} | {:>16.2} |",
            r.instances,
            r.snapshot_bytes as f64 / 1048576.0,
            per(r.snapshot_bytes),
            r.document_bytes as f64 / 1048576.0,
            per(r.document_bytes)
        );
    }
    if let Some(r) = rows.iter().find(|r| r.instances == 10_000) {
        println!(
            "\nGoal (issue 14), template data at 10,000 instances under {} ms: update {} ms, {}; \
             full build (first snapshot only) {} ms, {}.",
            GOAL_DATA.as_millis(),
            ms3(r.update.median),
            met(r.update.median <= GOAL_DATA),
            ms3(r.full.median),
            met(r.full.median <= GOAL_DATA)
        );
    }
}

/// With `BENCH_RENDER_DUMP=DIR`, writes each template's output at each size to
/// `DIR/<template>.<instances>`: how a change to the templates or the helpers is checked to
/// give the same configs byte for byte (`cmp` the dumps of two builds).
fn dump(template: &str, n: usize, out: &str) {
    if let Some(dir) = std::env::var_os("BENCH_RENDER_DUMP") {
        let path = std::path::Path::new(&dir).join(format!("{template}.{n}"));
        std::fs::write(&path, out)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

fn template_path(template: &str) -> std::path::PathBuf {
    switchboard_tests::workspace_root()
        .join("templates")
        .join(template)
}

/// How a goal reads in the report.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
