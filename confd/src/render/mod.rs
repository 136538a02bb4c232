//! The render engine: one template source rendered against the document of a snapshot.
//!
//! Handlebars runs in strict mode so a missing key or a misspelt field is an error naming it
//! (instead of an empty string that produces a config with a hole), and with HTML escaping off:
//! `&amp;` in a proxy config is a bug, and the config-safe helpers do the real escaping.
//!
//! ## Rooms
//!
//! The engine is this folder, and only [`Renderer`], its [`Limits`] and [`RenderError`], and
//! the document ([`data`], which the bench builds by hand) are seen outside it. Imports run one
//! way, from the [`Renderer`] down, with no circle:
//!
//! - `mod.rs` (this file): the [`Renderer`]. It parses a template once per source, analyses it,
//!   applies the rewrites the analysis calls for, and renders it within its bounds, reusing
//!   the last output when neither the source nor the document changed.
//! - `analysis`: every walk that reads a parsed template, behind one entry point,
//!   `Analysis::of`: how deep it nests, which loops may reuse their texts, which lists it
//!   reads one entry at a time, which parts of the document it reads. The other rooms take its
//!   answers and analyse nothing themselves, so what the engine assumes about a template is
//!   written in one place. It is a leaf beside [`data`] (whose list and part names it uses).
//! - `each`: the `each` helper and the texts it keeps between renders (`Memo`), per loop
//!   site the analysis found.
//! - `stream`: the lists the document leaves out, rendered from the snapshot: it points the
//!   template's `find_service services` calls at its own helper, which reads the render's
//!   lists through `each`'s `Memo`; the loops themselves are `each`'s.
//! - `bounds`: [`Limits`], the accounting that holds a render to them (a thread-local budget
//!   every output, loop and partial counts against), and the rewrite that puts partials
//!   inside the helper that counts their depth. A leaf: `each` and `helpers` count through it.
//! - `helpers`: the template helpers; [`data`]: the document, built once per snapshot and
//!   updated where it changed.
//!
//! Analysis and rewrites are kept apart: an analysis reads a template and answers, a rewrite
//! (`stream::rewrite`, `bounds::nest_partials`) changes it and lives beside the helper that
//! renders what it writes.

mod analysis;
mod bounds;
pub mod data;
mod each;
mod helpers;
mod stream;

pub use bounds::{Limits, RENDER_STACK};

use crate::model::Snapshot;
use analysis::Analysis;
use bounds::{Active, Bounded, Breach, Counted, Nest, COUNTED, NEST};
use data::{Parts, TemplateData, Vars};
use each::Memo;
use handlebars::{Context, Handlebars, RenderContext, RenderErrorReason, Renderable};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use switchboard::Shutdown;

/// Why a template produced no output. Displayed as one line that names the template and,
/// where Handlebars knows it, the line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The template does not parse.
    #[error("{0}")]
    Syntax(String),
    /// Rendering failed: a missing key or misspelt field (strict mode), or a helper refused.
    #[error("{0}")]
    Render(String),
    /// No snapshot has arrived yet to render from.
    #[error("{0}: no snapshot to render from yet")]
    NoData(String),
    /// The template went past one of its [`Limits`].
    #[error("{template}: {bound}")]
    Limit {
        /// The template's name.
        template: String,
        /// Which bound, and its value.
        bound: String,
    },
    /// The render was stopped half way: confd is stopping or reloading its configuration.
    #[error("{0}: render stopped: confd is stopping or reloading its configuration")]
    Stopped(String),
}

/// A registry with confd's settings and helpers. Callers pass the template source read fresh
/// from disk on every render (so an edit is always seen); it is parsed again only when it
/// differs from the source last parsed under that name, since parsing dominated small renders.
pub struct Renderer {
    hb: Handlebars<'static>,
    parsed: HashMap<String, Parsed>,
    renders: u64,
    /// The document of the latest snapshot ([`Renderer::update_data`]), shared by every
    /// template rendered from it.
    data: Option<TemplateData>,
    /// The certificates the document marks its virtual hosts with ([`Renderer::set_certs`]).
    certs: std::sync::Arc<crate::certs::CertSet>,
    /// What loops over `services` and `vhosts` wrote per entry, reused for entries that did
    /// not change (see `each`).
    memo: Memo,
    /// Cancelled when renders are to stop half way (confd is stopping or reloading its configuration).
    stop: Option<Shutdown>,
}

/// A template as last parsed, and its last output.
struct Parsed {
    source: String,
    /// The large parts of the document it may read.
    reads: Parts,
    /// How deep its own blocks, subexpressions and partials nest ([`nesting`]).
    nesting: usize,
    /// The output of the last render from a [`TemplateData`], under that data's generation.
    last: Option<(u64, String)>,
}

impl Default for Renderer {
    fn default() -> Self {
        let mut hb = Handlebars::new();
        hb.set_strict_mode(true);
        hb.register_escape_fn(handlebars::no_escape);
        helpers::register(&mut hb);
        let memo = Memo::default();
        memo.register(&mut hb);
        stream::register(&memo, &mut hb);
        hb.register_helper(NEST, Box::new(Nest));
        hb.register_helper(COUNTED, Box::new(Counted));
        Renderer {
            hb,
            parsed: HashMap::new(),
            renders: 0,
            data: None,
            certs: Default::default(),
            memo,
            stop: None,
        }
    }
}

impl Renderer {
    /// Renders `source` (named `name` in errors) with `data`. The error is one line: where
    /// (template, line, column) and why (e.g. ``missing key or misspelt field `servces` ``).
    ///
    /// For one-off renders, within the default [`Limits`]: it copies `data` into a Handlebars
    /// context. The daemon renders through [`Renderer::render_current`], which does not.
    pub fn render(
        &mut self,
        name: &str,
        source: &str,
        data: &Value,
    ) -> Result<String, RenderError> {
        self.render_within(name, source, data, Limits::default())
    }

    /// [`Renderer::render`] within `limits`.
    pub fn render_within(
        &mut self,
        name: &str,
        source: &str,
        data: &Value,
        limits: Limits,
    ) -> Result<String, RenderError> {
        self.parse(name, source, limits.max_depth)?;
        self.renders += 1;
        let ctx = Context::from(data.clone());
        self.run(name, &ctx, limits)
    }

    /// A renderer whose renders stop half way, with [`RenderError::Stopped`], once `stop` is
    /// cancelled.
    pub fn stopping_on(stop: Shutdown) -> Renderer {
        Renderer {
            stop: Some(stop),
            ..Renderer::default()
        }
    }

    /// Renders the registered template `name` from `ctx` within `limits`.
    fn run(&self, name: &str, ctx: &Context, limits: Limits) -> Result<String, RenderError> {
        let nesting = self.parsed.get(name).map_or(0, |p| p.nesting);
        if nesting > limits.max_depth {
            return Err(RenderError::Limit {
                template: name.to_string(),
                bound: Breach::Depth(limits.max_depth).to_string(),
            });
        }
        let t = self.hb.get_template(name).expect("parsed before");
        let active = Active::start(limits, self.stop.clone());
        let mut out = Bounded::default();
        let mut rc = RenderContext::new(t.name.as_ref());
        let result = t.render(&self.hb, ctx, &mut rc, &mut out);
        // Whatever Handlebars made of the error on its way up, the breach says what happened.
        match (result, active.finish()) {
            (_, Some(Breach::Stopped)) => Err(RenderError::Stopped(name.to_string())),
            (_, Some(b)) => Err(RenderError::Limit {
                template: name.to_string(),
                bound: b.to_string(),
            }),
            (Err(e), None) => Err(render_error(name, e)),
            (Ok(()), None) => Ok(out.0),
        }
    }

    /// Renders `source` (named `name`) from the shared document `data`, without copying it.
    ///
    /// Renders only when an input changed: when the source and the document's generation are
    /// the ones of this template's last successful render, that output is returned as it is
    /// (the same inputs give the same output: templates see nothing but the document, and
    /// every helper is a pure function of its arguments). A failed render is not remembered,
    /// so it is tried again.
    ///
    /// Adds to `data` the parts this template reads that it lacks ([`TemplateData::ensure`]).
    /// Within the default [`Limits`].
    pub fn render_data(
        &mut self,
        name: &str,
        source: &str,
        data: &mut TemplateData,
    ) -> Result<String, RenderError> {
        self.render_data_within(name, source, data, Limits::default())
    }

    /// [`Renderer::render_data`] within `limits`.
    pub fn render_data_within(
        &mut self,
        name: &str,
        source: &str,
        data: &mut TemplateData,
        limits: Limits,
    ) -> Result<String, RenderError> {
        self.parse(name, source, limits.max_depth)?;
        let parsed = self.parsed.get_mut(name).expect("parsed above");
        data.ensure(parsed.reads);
        if let Some((generation, out)) = &parsed.last {
            if *generation == data.generation() {
                return Ok(out.clone());
            }
        }
        parsed.last = None;
        self.renders += 1;
        self.memo.begin(name, data.lists());
        let out = self.run(name, data.context(), limits);
        self.memo.finish(out.is_ok());
        let out = out?;
        let parsed = self.parsed.get_mut(name).expect("parsed above");
        parsed.last = Some((data.generation(), out.clone()));
        Ok(out)
    }

    /// Makes `snap` and `vars` the document [`Renderer::render_current`] renders from: built
    /// the first time, then updated where the snapshot changed (see [`TemplateData::update`]).
    pub fn update_data(&mut self, snap: Arc<Snapshot>, vars: &Vars) {
        let d = match &mut self.data {
            Some(d) => {
                d.update(snap, vars);
                d
            }
            // Parts are added as templates that read them are rendered.
            None => self
                .data
                .insert(TemplateData::with_parts(snap, vars, Parts::default())),
        };
        d.set_certs(self.certs.clone());
    }

    /// The certificates the next [`Renderer::update_data`] marks virtual hosts with.
    pub fn set_certs(&mut self, certs: std::sync::Arc<crate::certs::CertSet>) {
        self.certs = certs;
    }

    /// The routing warnings of the document [`Renderer::update_data`] set.
    pub fn route_warnings(&self) -> Vec<crate::routes::Warning> {
        self.data.as_ref().map(|d| d.warnings()).unwrap_or_default()
    }

    /// [`Renderer::render_data_within`] from the document [`Renderer::update_data`] set.
    pub fn render_current(
        &mut self,
        name: &str,
        source: &str,
        limits: Limits,
    ) -> Result<String, RenderError> {
        let mut data = self
            .data
            .take()
            .ok_or_else(|| RenderError::NoData(name.to_string()))?;
        let out = self.render_data_within(name, source, &mut data, limits);
        self.data = Some(data);
        out
    }

    #[cfg(test)]
    pub(crate) fn memo(&self) -> &Memo {
        &self.memo
    }

    /// How many times Handlebars rendered (not counting outputs reused by
    /// [`Renderer::render_data`]).
    pub fn renders(&self) -> u64 {
        self.renders
    }

    /// Parses `source` under `name` unless it is the source parsed last under that name.
    ///
    /// A template nested deeper than `max_depth` is refused here, before anything that walks
    /// it by recursion (its analysis, a copy of it) could run out of stack.
    fn parse(&mut self, name: &str, source: &str, max_depth: usize) -> Result<(), RenderError> {
        if self.parsed.get(name).map(|p| p.source.as_str()) == Some(source) {
            return Ok(());
        }
        // Forget the old parse first: a syntax error must never leave it in use.
        self.parsed.remove(name);
        self.hb.unregister_template(name);
        self.memo.forget(name);
        self.hb
            .register_template_string(name, source)
            .map_err(|e| {
                RenderError::Syntax(one_line(&format!("{name}: template syntax error: {e}")))
            })?;
        // Measured without recursion, before anything recurses into the template.
        let registered = self.hb.get_template(name).expect("registered above");
        if analysis::nesting(&registered.elements) > max_depth {
            self.hb.unregister_template(name);
            return Err(RenderError::Limit {
                template: name.to_string(),
                bound: Breach::Depth(max_depth).to_string(),
            });
        }
        // The copy is analysed, rewritten in place and registered: the loops the analysis
        // names by address are those of the template that renders (see `analysis`).
        let mut t = registered.clone();
        let analysis = Analysis::of(&t);
        stream::rewrite(&mut t, &analysis);
        bounds::nest_partials(&mut t);
        self.hb.register_template(name, t);
        self.memo.parsed(name, &analysis.loops);
        self.parsed.insert(
            name.to_string(),
            Parsed {
                source: source.to_string(),
                reads: analysis.reads,
                nesting: analysis.nesting,
                last: None,
            },
        );
        Ok(())
    }
}

/// A render error as one line: where (template, line, column) and why.
fn render_error(name: &str, e: handlebars::RenderError) -> RenderError {
    let reason = match e.reason() {
        RenderErrorReason::MissingVariable(Some(p)) => {
            format!("missing key or misspelt field `{p}`")
        }
        RenderErrorReason::MissingVariable(None) => "missing key or misspelt field".into(),
        other => other.to_string(),
    };
    RenderError::Render(one_line(&match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("{name}:{l}:{c}: {reason}"),
        _ => format!("{name}: {reason}"),
    }))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reparses_only_changed_sources_and_never_keeps_a_broken_one() {
        let mut r = Renderer::default();
        let d = json!({"v": 1});
        assert_eq!(r.render("t", "a{{v}}", &d).unwrap(), "a1");
        assert_eq!(r.render("t", "a{{v}}", &d).unwrap(), "a1");
        assert_eq!(r.render("t", "b{{v}}", &d).unwrap(), "b1");
        assert!(r.render("t", "c{{#if}}", &d).is_err());
        assert!(r.render("t", "c{{#if}}", &d).is_err());
        assert_eq!(r.render("t", "c{{v}}", &d).unwrap(), "c1");
    }

    #[test]
    fn renders_only_when_the_source_or_the_data_changed() {
        use crate::model::{tests::inst, Snapshot};
        use crate::render::data::TemplateData;
        use std::sync::Arc;
        let snap = |addr: &str| {
            Arc::new(Snapshot::build(
                vec![inst("web", "a", addr, 80)],
                Default::default(),
                &[],
            ))
        };
        let vars = Default::default();
        let mut d = TemplateData::build(snap("10.0.0.1"), &vars);
        let d = &mut d;
        let mut r = Renderer::default();
        let t = "{{#each service.web}}{{addr this}} {{/each}}";
        let u = "{{#each services}}{{name}} {{/each}}";
        assert_eq!(r.render_data("t", t, d).unwrap(), "10.0.0.1:80 ");
        assert_eq!(r.render_data("u", u, d).unwrap(), "web ");
        assert_eq!(r.renders(), 2);
        // Same inputs: the last output, no render.
        assert_eq!(r.render_data("t", t, d).unwrap(), "10.0.0.1:80 ");
        assert_eq!(r.renders(), 2);
        // An equal snapshot is no new input either.
        d.update(snap("10.0.0.1"), &vars);
        assert_eq!(r.render_data("t", t, d).unwrap(), "10.0.0.1:80 ");
        assert_eq!(r.renders(), 2);
        // New data: rendered again, each template once.
        d.update(snap("10.0.0.2"), &vars);
        assert_eq!(r.render_data("t", t, d).unwrap(), "10.0.0.2:80 ");
        assert_eq!(r.render_data("t", t, d).unwrap(), "10.0.0.2:80 ");
        assert_eq!(r.renders(), 3);
        // An edited source: rendered again; a failing one is not remembered.
        assert_eq!(
            r.render_data("t", "x{{#each service.web}}{{port}}{{/each}}", d)
                .unwrap(),
            "x80"
        );
        assert_eq!(r.renders(), 4);
        assert!(r.render_data("t", "{{nope}}", d).is_err());
        assert!(r.render_data("t", "{{nope}}", d).is_err());
        assert_eq!(r.renders(), 6);
    }

    /// A template whose parts were left out of the shared document gets them before it
    /// renders, whatever rendered first.
    #[test]
    fn parts_are_added_for_the_template_that_reads_them() {
        use crate::model::{tests::inst, Snapshot};
        use std::sync::Arc;
        let snap = Arc::new(Snapshot::build(
            vec![inst("web", "a", "10.0.0.1", 80)],
            Default::default(),
            &[],
        ));
        let mut r = Renderer::default();
        r.update_data(snap, &Default::default());
        assert_eq!(
            r.render_current("a", "{{vars}}", Limits::default())
                .unwrap(),
            "[object]"
        );
        assert_eq!(
            r.render_current(
                "b",
                "{{#each service.web}}{{port}}{{/each}}",
                Limits::default()
            )
            .unwrap(),
            "80"
        );
        assert_eq!(
            r.render_current(
                "c",
                "{{#each services}}{{name}}{{/each}}",
                Limits::default()
            )
            .unwrap(),
            "web"
        );
    }

    fn limits(max_depth: usize, max_output: usize) -> Limits {
        Limits {
            max_depth,
            max_output,
            ..Limits::default()
        }
    }

    /// The error of rendering `src` as `t.hbs` within `l`, checked to be one line naming the
    /// template.
    fn refused(r: &mut Renderer, src: &str, data: &Value, l: Limits) -> String {
        let e = r
            .render_within("t.hbs", src, data, l)
            .expect_err(src)
            .to_string();
        assert!(e.starts_with("t.hbs: "), "{src}: {e}");
        assert!(!e.contains('\n'), "{src}: {e}");
        e
    }

    /// Recursion through partials ends at the depth bound, whatever path it takes, with or
    /// without output, and on a 2 MiB test thread at the default bound (no stack overflow).
    #[test]
    fn recursive_partials_stop_at_the_depth_bound() {
        let mut r = Renderer::default();
        let d = json!({"list": [1, 2], "name": "x"});
        // Registered templates that include each other.
        r.render("ping", "{{#if name}}{{> pong}}{{/if}}", &d)
            .unwrap_err();
        r.render("pong", "p{{> ping}}", &d).unwrap_err();
        for src in [
            "{{#*inline \"a\"}}x{{> a}}{{/inline}}{{> a}}",
            "{{#*inline \"a\"}}{{> a}}{{/inline}}{{> a}}",
            "{{#*inline \"a\"}}{{#each @root.list}}{{> a}}{{/each}}{{/inline}}{{> a}}",
            "{{#*inline \"a\"}}{{#> a}}x{{/a}}{{/inline}}{{> a}}",
            "{{#*inline \"a\"}}{{> (lookup this \"name\")}}{{/inline}}{{#*inline \"x\"}}{{> a}}{{/inline}}{{> a}}",
            "{{> ping}}",
        ] {
            for l in [Limits::default(), limits(5, 1 << 20)] {
                let e = refused(&mut r, src, &d, l);
                assert!(
                    e.contains(&format!("nest deeper than max_render_depth ({})", l.max_depth)),
                    "{src}: {e}"
                );
            }
        }
        // Partials that do not recurse render, up to the bound and not past it.
        let chain = "{{#*inline \"a\"}}a{{/inline}}{{#*inline \"b\"}}{{> a}}{{/inline}}{{> b}}";
        assert_eq!(
            r.render_within("t.hbs", chain, &d, limits(2, 1 << 20))
                .unwrap(),
            "a"
        );
        refused(&mut r, chain, &d, limits(1, 1 << 20));
    }

    /// The deepest render a bound allows (partials nested to the bound, each inside a `with`,
    /// and loops nested to the bound in the last one) fits a 2 MiB thread stack (a test
    /// thread's) at the default bound, and [`RENDER_STACK`] at the ceiling, in a debug build;
    /// one partial more is refused. So is, before anything recurses into it, a template whose
    /// own nesting is deeper than a thread's stack would hold.
    #[test]
    fn the_deepest_render_allowed_fits_its_thread_stack() {
        // `{{> p0}}`, then `partials` of `{{#with this}}{{> next}}{{/with}}`: 1 + 2 x partials.
        let deepest = |max: usize, partials: usize| {
            let mut src = format!(
                "{{{{#*inline \"p{partials}\"}}}}{}x{}{{{{/inline}}}}",
                "{{#each @root.t}}".repeat(max),
                "{{/each}}".repeat(max)
            );
            for i in 0..partials {
                src += &format!(
                    "{{{{#*inline \"p{i}\"}}}}{{{{#with this}}}}{{{{> p{}}}}}{{{{/with}}}}{{{{/inline}}}}",
                    i + 1
                );
            }
            src + "{{> p0}}"
        };
        for (max, stack) in [
            (Limits::DEFAULT_MAX_DEPTH, 2 << 20),
            (Limits::DEPTH_CEILING, RENDER_STACK),
        ] {
            // Both bounds are even: 1 + 2 x (max / 2 - 1) is one level short of the bound.
            let (ok, over) = (deepest(max, max / 2 - 1), deepest(max, max / 2));
            std::thread::Builder::new()
                .stack_size(stack)
                .spawn(move || {
                    let l = limits(max, 1 << 30);
                    let d = json!({"t": [1]});
                    let mut r = Renderer::default();
                    assert_eq!(r.render_within("t.hbs", &ok, &d, l).unwrap(), "x");
                    let e = refused(&mut r, &over, &d, l);
                    assert!(e.contains(&format!("max_render_depth ({max})")), "{e}");
                })
                .unwrap()
                .join()
                .unwrap();
        }
        // Deeper than a 2 MiB stack holds for the analysis of partials: refused unparsed.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let mut r = Renderer::default();
                for open in ["{{#> p}}", "{{#each list}}"] {
                    let close = if open.contains('>') {
                        "{{/p}}"
                    } else {
                        "{{/each}}"
                    };
                    let src = open.repeat(1000) + &close.repeat(1000);
                    let e = refused(&mut r, &src, &json!({}), Limits::default());
                    assert!(e.contains("max_render_depth (64)"), "{e}");
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn nesting_is_measured_when_parsed_and_checked_before_rendering() {
        let cases = [
            ("plain {{x}}", 0),
            (
                "{{#if a}}{{#each b}}{{x}}{{/each}}{{else}}{{#with c}}y{{/with}}{{/if}}",
                2,
            ),
            ("{{x (a (b (c d)))}}", 3),
            ("{{#if (a (b c))}}{{/if}}", 3),
            ("{{#if a}}{{else if b}}{{else if c}}{{/if}}", 3),
            ("{{> p}}", 1),
            ("{{#*inline \"p\"}}{{#if a}}{{> q}}{{/if}}{{/inline}}", 2),
            ("{{#> p}}{{#if a}}x{{/if}}{{/p}}", 2),
        ];
        for (src, want) in cases {
            let t = handlebars::Template::compile(src).unwrap();
            assert_eq!(analysis::nesting(&t.elements), want, "{src}");
        }
        // The shipped templates are far within the default.
        for name in ["nginx.conf.hbs", "haproxy.cfg.hbs"] {
            let t =
                handlebars::Template::compile(&crate::render::each::tests::shipped(name)).unwrap();
            assert!(analysis::nesting(&t.elements) <= 6, "{name}");
        }
        let mut r = Renderer::default();
        let deep = |n: usize| "{{#if a}}".repeat(n) + "x" + &"{{/if}}".repeat(n);
        let d = json!({"a": true});
        assert_eq!(
            r.render_within("t.hbs", &deep(8), &d, limits(8, 100))
                .unwrap(),
            "x"
        );
        let e = refused(&mut r, &deep(9), &d, limits(8, 100));
        assert!(e.contains("max_render_depth (8)"), "{e}");
    }

    /// Every way a render writes or builds text counts against one bound; at the bound is
    /// allowed, one byte past it is not.
    #[test]
    fn output_bound_covers_every_way_a_render_writes() {
        let list: Vec<u32> = (0..100).collect();
        let d = json!({"list": list, "s": "0123456789"});
        let ten_each = "{{#each list}}{{../s}}{{/each}}"; // 1,000 bytes
        let cases = [
            // Plain writes, loops, partials, partial blocks whose body is never included.
            (ten_each.to_string(), 1000),
            ("{{#*inline \"p\"}}{{@root.s}}{{/inline}}{{#each list}}{{> p}}{{/each}}".into(), 1000),
            // (10 more: the partial's context, `s`, copied while it renders.)
            (
                "{{#*inline \"p\"}}{{/inline}}{{#> p s}}{{#each @root.list}}{{@root.s}}{{/each}}{{/p}}"
                    .into(),
                1010,
            ),
            // Text a helper makes: 1,000 bytes twice (made, then written).
            ("{{join list \"..........\"}}".into(), 2 * (99 * 10 + 190)),
            // `concat` fed back: 20, 40, 80 ... bytes held as made.
            (
                "{{#with (concat s s) as |a|}}{{#with (concat a a) as |b|}}\
                 {{#with (concat b b) as |c|}}{{/with}}{{/with}}{{/with}}"
                    .into(),
                20 + 40 + 80,
            ),
        ];
        for (src, bytes) in cases {
            let mut r = Renderer::default();
            let at = r.render_within("t.hbs", &src, &d, limits(64, bytes));
            assert!(at.is_ok(), "{src}: at the bound: {at:?}");
            let e = refused(&mut r, &src, &d, limits(64, bytes - 1));
            assert!(
                e.contains(&format!("passed max_render_output ({} bytes)", bytes - 1)),
                "{src}: {e}"
            );
        }
        // The copy of the context each partial gets: recursion over a large context fails
        // on its bytes before its depth.
        let big = json!({"blob": "x".repeat(10_000)});
        let e = refused(
            &mut Renderer::default(),
            "{{#*inline \"a\"}}{{> a}}{{/inline}}{{> a}}",
            &big,
            limits(1000, 50_000),
        );
        assert!(e.contains("contexts its partials copy"), "{e}");
    }

    /// Loops that reuse the text of unchanged entries, and loops that stream their list, are
    /// bounded like any other: a reused text counts as it is written.
    #[test]
    fn output_bound_covers_reused_and_streamed_loops() {
        use crate::model::{tests::inst, Snapshot};
        use crate::render::data::TemplateData;
        let snap = |port: u16| {
            Arc::new(Snapshot::build(
                (0..50).map(|i| {
                    inst(
                        &format!("s{i}"),
                        "a",
                        "10.0.0.1",
                        if i == 0 { port } else { 80 },
                    )
                }),
                Default::default(),
                &[],
            ))
        };
        let vars = Default::default();
        for (how, parts) in [
            ("in the document", Parts::ALL),
            ("streamed", Parts::default()),
        ] {
            let mut r = Renderer::default();
            let mut d = TemplateData::with_parts(snap(80), &vars, parts);
            let src =
                "{{#each services}}{{name}}{{#each instances}} {{addr this}}{{/each}}\n{{/each}}";
            let full = r
                .render_data_within("t.hbs", src, &mut d, Limits::default())
                .unwrap();
            assert!(full.len() > 500, "{how}");
            // One service changed: the others' texts are reused, and still counted.
            d.update(snap(81), &vars);
            let e = r
                .render_data_within("t.hbs", src, &mut d, limits(64, full.len() - 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_render_output"), "{how}: {e}");
            let again = r
                .render_data_within("t.hbs", src, &mut d, limits(64, full.len()))
                .unwrap();
            assert_eq!(again.len(), full.len(), "{how}");
        }
    }

    /// A render that goes on without writing ends at its time bound, and any long render ends
    /// once its stop token is cancelled.
    #[test]
    fn time_bound_and_stop_end_a_render_under_way() {
        let list: Vec<u32> = (0..1000).collect();
        let d = json!({"list": list});
        // 10^9 iterations that write nothing: far longer than any bound here.
        let src = "{{#each list}}{{#each ../list}}{{#each ../../list}}{{/each}}{{/each}}{{/each}}";
        let l = Limits {
            max_time: std::time::Duration::from_millis(100),
            ..Limits::default()
        };
        let e = refused(&mut Renderer::default(), src, &d, l);
        assert!(e.contains("longer than max_render_time (100ms)"), "{e}");
        let stop = Shutdown::new();
        let mut r = Renderer::stopping_on(stop.clone());
        stop.cancel();
        let e = r
            .render_within("t.hbs", src, &d, Limits::default())
            .unwrap_err();
        assert_eq!(e, RenderError::Stopped("t.hbs".into()));
        assert_eq!(
            e.to_string(),
            "t.hbs: render stopped: confd is stopping or reloading its configuration"
        );
    }

    /// Putting partials inside the counting blocks changes nothing in what they render:
    /// standalone lines, indentation, inline partials, partial blocks, hash and context
    /// arguments, errors.
    #[test]
    fn nested_partials_render_as_handlebars_renders_them() {
        let partials = [
            ("row", "<{{name}}{{#if @index}}:{{@index}}{{/if}}>\n"),
            ("frame", "[{{> @partial-block}}]"),
            ("hashed", "{{a}}-{{b}}"),
            ("layout", "head\n  {{> @partial-block}}\nfoot\n"),
        ];
        let templates = [
            "{{#each list}}\n  {{> row}}\n{{/each}}",
            "a\n  {{> row}}\nb",
            "{{#> frame}}x{{name}}{{/frame}}",
            "{{#> frame}}{{#*inline \"in\"}}i{{/inline}}{{> in}}{{/frame}}",
            "{{#> missing}}fallback {{name}}{{/missing}}",
            "{{> hashed a=name b=\"lit\"}}{{> hashed obj}}",
            "{{#*inline \"p\"}}{{name}},{{/inline}}{{#each list}}{{> p}}{{/each}}",
            "{{#with obj}}{{> hashed}}{{/with}}",
            "{{#> layout}}\nbody\n{{/layout}}",
            "{{> (lookup this \"which\")}}",
            "{{> nosuch}}",
            "{{#*inline \"p\"}}{{nope}}{{/inline}}x\n{{> p}}",
        ];
        let d = json!({
            "list": [{"name": "a"}, {"name": "b"}],
            "name": "n",
            "obj": {"a": 1, "b": 2},
            "which": "row",
        });
        let mut plain = Handlebars::new();
        plain.set_strict_mode(true);
        helpers::register(&mut plain);
        let mut r = Renderer::default();
        for (name, src) in partials {
            plain.register_partial(name, src).unwrap();
            let _ = r.render(name, src, &d);
        }
        let mut failing = 0;
        for src in templates {
            let want = plain.render_template(src, &d);
            match (r.render("t", src, &d), want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{src}"),
                (Err(_), Err(_)) => failing += 1,
                (got, want) => panic!("{src}: {got:?} / {want:?}"),
            }
        }
        // `nosuch` and `nope`.
        assert_eq!(failing, 2);
    }

    #[test]
    fn renders_without_html_escaping() {
        let mut r = Renderer::default();
        let out = r.render("t", "a {{v}} b", &json!({"v": "<&\"'>"})).unwrap();
        assert_eq!(out, "a <&\"'> b");
    }

    #[test]
    fn errors_name_template_place_and_key() {
        let mut r = Renderer::default();
        let cases = [
            (
                "x\n{{servces}}",
                "t.hbs:2:1: missing key or misspelt field `servces`",
            ),
            (
                "{{#each services}}{{nmae}}{{/each}}",
                "missing key or misspelt field",
            ),
            ("{{#each services}}", "t.hbs: template syntax error"),
            ("{{nosuchhelper 1}}", "nosuchhelper"),
        ];
        for (src, want) in cases {
            let e = r
                .render("t.hbs", src, &json!({"services": [{"name": "a"}]}))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{src}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = r
            .render(
                "t.hbs",
                "{{#each services}}{{nmae}}{{/each}}",
                &json!({"services": [{"name": "a"}]}),
            )
            .unwrap_err();
        assert!(
            matches!(&e, RenderError::Render(m) if m.contains("nmae")),
            "{e}"
        );
    }
}
