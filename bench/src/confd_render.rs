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
//! [`MAX_RUNS`] runs were made. The goals are printed beside the figures.
//! `BENCH_RENDER_DUMP=DIR` also writes the outputs (see [`dump`]).

use crate::common::{ms3, thread_cpu, Summary};
use crate::workload;
use confd::model::Snapshot;
use confd::render::data::{List, Parts, TemplateData, Vars};
use confd::render::Renderer;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIN_RUNS: usize = 20;
const MAX_RUNS: usize = 500;
const BUDGET: Duration = Duration::from_secs(3);
const TEMPLATES: [&str; 2] = ["nginx.conf.hbs", "haproxy.cfg.hbs"];
/// The goals at 10,000 instances: render median per template, and the template data.
const GOAL_RENDER: Duration = Duration::from_millis(20);
const GOAL_DATA: Duration = Duration::from_millis(5);

struct Row {
    template: &'static str,
    instances: usize,
    /// What each structure the daemon holds costs on the heap (see [`Mem`]).
    snapshot: Mem,
    mirror: Mem,
    document: Mem,
    outputs: Mem,
    services: usize,
    vhosts: usize,
    full: Summary,
    update: Summary,
    render: Summary,
    /// The same renders in this thread's CPU time.
    render_cpu: Summary,
    /// A render that reuses nothing (the first, or after `vars` changed), CPU time.
    full_render_cpu: Summary,
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
        // Two snapshots sharing all but one instance: about one snapshot's worth.
        let ((a, b), snapshot) = mem(|| snapshots(n));
        // The etcd source's mirror: key -> the parsed instance (shared with the snapshot).
        let (mirror_map, mirror) = mem(|| {
            a.services
                .values()
                .flatten()
                .map(|i| (format!("/services/{}/{}", i.name, i.id), Some(i.clone())))
                .collect::<std::collections::BTreeMap<_, _>>()
        });
        // The parts of the document the shipped templates read, as the daemon finds them.
        let parts = {
            let mut d = TemplateData::with_parts(a.clone(), &vars, Parts::default());
            for template in TEMPLATES {
                let out = Renderer::default()
                    .render_data(template, &source(template), &mut d)
                    .unwrap_or_else(|e| panic!("render failed: {e}"));
                dump(template, n, &out);
            }
            d.parts()
        };
        let (mut data, document) = mem(|| TemplateData::with_parts(a.clone(), &vars, parts));
        // Each template's renderer keeps its parse and its last output (the render skip).
        let (renderers, outputs) = mem(|| {
            TEMPLATES.map(|template| {
                let mut r = Renderer::default();
                r.render_data(template, &source(template), &mut data)
                    .unwrap_or_else(|e| panic!("render failed: {e}"));
                r
            })
        });
        drop(renderers);
        drop(mirror_map);
        let full = measure(|| {
            let t0 = Instant::now();
            let d = TemplateData::with_parts(a.clone(), &vars, parts);
            let t = t0.elapsed();
            drop(d);
            t
        });
        let vhosts = data.lists().entries(List::Vhosts).len();
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
            // Nothing reusable: `vars` change every run (a variable no template reads), so
            // every loop renders every entry again, as on the first render.
            let other: Vars = [("bench_unread".to_string(), serde_json::json!(1))].into();
            let mut cold_cpu = Vec::new();
            measure(|| {
                flip = !flip;
                data.update(a.clone(), if flip { &other } else { &vars });
                let (t0, c0) = (Instant::now(), thread_cpu());
                renderer
                    .render_data(&name, &source(template), &mut data)
                    .unwrap_or_else(|e| panic!("render failed: {e}"));
                cold_cpu.push(thread_cpu() - c0);
                t0.elapsed()
            });
            let full_render_cpu = Summary::of(cold_cpu);
            // The same snapshot as the first render, through the texts reused since.
            data.update(b.clone(), &vars);
            renderer
                .render_data(&name, &source(template), &mut data)
                .unwrap_or_else(|e| panic!("render failed: {e}"));
            data.update(a.clone(), &vars);
            let again = renderer
                .render_data(&name, &source(template), &mut data)
                .unwrap_or_else(|e| panic!("render failed: {e}"));
            dump(&format!("{template}.again"), n, &again);
            rows.push(Row {
                template,
                instances: n,
                snapshot,
                mirror,
                document,
                outputs,
                services: a.services.len(),
                vhosts,
                full,
                update,
                render,
                render_cpu,
                full_render_cpu,
                bytes,
            });
        }
    }
    println!(
        "\n### confd: in-process render (template data once per snapshot, then each template)\n"
    );
    println!(
        "| template        | instances | services | vhosts | data full ms | data update ms | runs | render median ms | render p99 ms | render CPU median ms | full render CPU median ms | output KiB |"
    );
    println!(
        "|-----------------|----------:|---------:|-------:|-------------:|---------------:|-----:|-----------------:|--------------:|---------------------:|--------------------------:|-----------:|"
    );
    for r in &rows {
        println!(
            "| {:<15} | {:>9} | {:>8} | {:>6} | {:>12} | {:>14} | {:>4} | {:>16} | {:>13} | {:>20} | {:>25} | {:>10.1} |",
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
            ms3(r.full_render_cpu.median),
            r.bytes as f64 / 1024.0
        );
    }
    println!(
        "\n\"data full\" builds the document from scratch (first snapshot); \"data update\" \
         brings it to a snapshot with one instance changed (every later change); both are paid \
         once per snapshot, whatever the number of templates. \"render\" is file read + \
         Handlebars for one template after that one-instance change (the loops over `services` \
         and `vhosts` reuse what they wrote for unchanged entries); its CPU time (this \
         thread's) is what it costs when other processes share the cores. \"full render\" \
         reuses nothing (the first render, or one after `vars` changed)."
    );
    for r in rows.iter().filter(|r| r.instances == 10_000) {
        println!(
            "\nGoal, {} at 10,000 instances: render median under {} ms: {} ms, {} \
             (CPU {} ms).",
            r.template,
            GOAL_RENDER.as_millis(),
            ms3(r.render.median),
            met(r.render.median <= GOAL_RENDER),
            ms3(r.render_cpu.median)
        );
    }
    println!(
        "\nMemory per structure the daemon holds: bytes requested, and bytes the allocator \
         counts in use for them (its per-block overhead and rounding included; glibc, one \
         arena). The mirror is the etcd source's map from key to parsed instance (the \
         instances themselves are the snapshot's, shared); the renderers hold each template's \
         parse and its last output.\n"
    );
    println!("| instances | structure | requested MiB | in use MiB | in use per instance KiB |");
    println!("|----------:|-----------|--------------:|-----------:|------------------------:|");
    for r in rows.iter().step_by(TEMPLATES.len()) {
        let mut total = Mem {
            requested: 0,
            in_use: 0,
        };
        for (what, m) in [
            ("snapshot", r.snapshot),
            ("etcd mirror", r.mirror),
            ("template document", r.document),
            ("renderers", r.outputs),
        ] {
            total.requested += m.requested;
            total.in_use += m.in_use;
            print_mem(r.instances, what, m);
        }
        print_mem(r.instances, "total", total);
    }
    if let Some(r) = rows.iter().find(|r| r.instances == 10_000) {
        println!(
            "\nGoal, template data at 10,000 instances under {} ms: update {} ms, {}; \
             full build (first snapshot only) {} ms, {}.",
            GOAL_DATA.as_millis(),
            ms3(r.update.median),
            met(r.update.median <= GOAL_DATA),
            ms3(r.full.median),
            met(r.full.median <= GOAL_DATA)
        );
    }
}

fn print_mem(instances: usize, what: &str, m: Mem) {
    println!(
        "| {:>9} | {:<17} | {:>13.1} | {:>10.1} | {:>23.2} |",
        instances,
        what,
        m.requested as f64 / 1048576.0,
        m.in_use as f64 / 1048576.0,
        m.in_use as f64 / 1024.0 / instances as f64
    );
}

/// Heap cost of a structure: bytes requested (what the program asked for), and bytes the
/// allocator counts in use for it (with its per-block overhead and rounding).
#[derive(Clone, Copy)]
struct Mem {
    requested: usize,
    in_use: usize,
}

/// Runs `f` and returns its result with the heap it still holds (see [`Mem`]).
fn mem<T>(f: impl FnOnce() -> T) -> (T, Mem) {
    let in_use = || confd::memory::heap().map_or(0, |h| h.in_use + h.mapped);
    let (b0, h0) = (crate::live_bytes(), in_use());
    let v = f();
    let m = Mem {
        requested: crate::live_bytes().saturating_sub(b0),
        in_use: in_use().saturating_sub(h0),
    };
    (v, m)
}

/// A shipped template's source.
fn source(template: &str) -> String {
    let path = template_path(template);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
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
