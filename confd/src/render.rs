//! Rendering one template source against template data.
//!
//! Handlebars runs in strict mode so a missing key or a misspelt field is an error naming it
//! (instead of an empty string that produces a config with a hole), and with HTML escaping off:
//! `&amp;` in a proxy config is a bug, and the config-safe helpers do the real escaping.

use crate::data::{Parts, TemplateData, Vars};
use crate::each::Memo;
use crate::helpers;
use crate::model::Snapshot;
use crate::stream;
use handlebars::template::{Parameter, Template, TemplateElement};
use handlebars::{Context, Handlebars, Path, PathSeg, RenderErrorReason};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// What loops over `services` and `vhosts` wrote per entry, reused for entries that did
    /// not change (see [`crate::each`]).
    memo: Memo,
}

/// A template as last parsed, and its last output.
struct Parsed {
    source: String,
    /// The large parts of the document it may read.
    reads: Parts,
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
        Renderer {
            hb,
            parsed: HashMap::new(),
            renders: 0,
            data: None,
            memo,
        }
    }
}

impl Renderer {
    /// Renders `source` (named `name` in errors) with `data`. The error is one line: where
    /// (template, line, column) and why (e.g. ``missing key or misspelt field `servces` ``).
    ///
    /// For one-off renders: it copies `data` into a Handlebars context. The daemon renders
    /// through [`Renderer::render_data`], which does not.
    pub fn render(
        &mut self,
        name: &str,
        source: &str,
        data: &Value,
    ) -> Result<String, RenderError> {
        self.parse(name, source)?;
        self.renders += 1;
        let ctx = Context::from(data.clone());
        self.hb
            .render_with_context(name, &ctx)
            .map_err(|e| render_error(name, e))
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
    pub fn render_data(
        &mut self,
        name: &str,
        source: &str,
        data: &mut TemplateData,
    ) -> Result<String, RenderError> {
        self.parse(name, source)?;
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
        let out = self.hb.render_with_context(name, data.context());
        self.memo.finish(out.is_ok());
        let out = out.map_err(|e| render_error(name, e))?;
        parsed.last = Some((data.generation(), out.clone()));
        Ok(out)
    }

    /// Makes `snap` and `vars` the document [`Renderer::render_current`] renders from: built
    /// the first time, then updated where the snapshot changed (see [`TemplateData::update`]).
    pub fn update_data(&mut self, snap: Arc<Snapshot>, vars: &Vars) {
        match &mut self.data {
            Some(d) => {
                d.update(snap, vars);
            }
            // Parts are added as templates that read them are rendered.
            None => self.data = Some(TemplateData::with_parts(snap, vars, Parts::default())),
        }
    }

    /// [`Renderer::render_data`] from the document [`Renderer::update_data`] set.
    pub fn render_current(&mut self, name: &str, source: &str) -> Result<String, RenderError> {
        let mut data = self
            .data
            .take()
            .ok_or_else(|| RenderError::NoData(name.to_string()))?;
        let out = self.render_data(name, source, &mut data);
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
    fn parse(&mut self, name: &str, source: &str) -> Result<(), RenderError> {
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
        // Lists the template reads one entry at a time stay out of the document.
        let mut t = self
            .hb
            .get_template(name)
            .expect("registered above")
            .clone();
        let streams = stream::analyse(&t);
        if !streams.lists.is_empty() {
            stream::rewrite(&mut t, &streams);
            self.hb.register_template(name, t);
        }
        let t = self.hb.get_template(name).expect("registered above");
        let reads = reads(t).without(&streams.lists);
        self.memo.parsed(name, t);
        self.parsed.insert(
            name.to_string(),
            Parsed {
                source: source.to_string(),
                reads,
                last: None,
            },
        );
        Ok(())
    }
}

/// The large parts of the document ([`Parts`]) a template may read, found from its parsed
/// form, erring towards "reads it": a part left out is an error at render (strict mode names
/// the missing key), never a silent hole, but the analysis aims never to get there.
///
/// A path names a top-level key by its first name segment after any `@root`, `..` or `this`
/// (so `services`, `@root.vhosts.0`, `../service.web`). A path that names nothing (`this`,
/// `.`, `@root`, `..`) where it can mean the whole document, and any partial, read
/// everything. Only `each` and `with` move into a narrower context (their `else` does not);
/// every other block is taken to keep its parent's. Names inside narrower contexts (a field
/// such as `instances`) are taken as top-level keys too: harmless, as no part is called so.
pub fn reads(t: &Template) -> Parts {
    let mut names = Vec::new();
    if walk(&t.elements, false, &mut names) {
        return Parts::ALL;
    }
    let has = |k: &str| names.iter().any(|n| n == k);
    Parts {
        services: has("services"),
        service: has("service"),
        vhosts: has("vhosts"),
    }
}

/// Collects the top-level names `elements` may read; `true` when they may read everything.
/// `nested`: inside an `each` or `with` block, where `this` is not the document.
fn walk(elements: &[TemplateElement], nested: bool, names: &mut Vec<String>) -> bool {
    elements.iter().any(|e| match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => false,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            let narrows =
                h.block && matches!(&h.name, Parameter::Name(n) if n == "each" || n == "with");
            param(&h.name, nested, names)
                || h.params.iter().any(|p| param(p, nested, names))
                || h.hash.values().any(|p| param(p, nested, names))
                || h.template
                    .as_ref()
                    .is_some_and(|t| walk(&t.elements, nested || narrows, names))
                || h.inverse
                    .as_ref()
                    .is_some_and(|t| walk(&t.elements, nested, names))
        }
        TemplateElement::DecoratorExpression(d) | TemplateElement::DecoratorBlock(d) => {
            d.params.iter().any(|p| param(p, nested, names))
                || d.hash.values().any(|p| param(p, nested, names))
                || d.template
                    .as_ref()
                    .is_some_and(|t| walk(&t.elements, nested, names))
        }
        TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => true,
        // A future element kind: assume the worst.
        #[allow(unreachable_patterns)]
        _ => true,
    })
}

fn param(p: &Parameter, nested: bool, names: &mut Vec<String>) -> bool {
    match p {
        Parameter::Name(n) => {
            names.push(n.clone());
            false
        }
        Parameter::Path(Path::Relative((segs, _))) => {
            let prefixed = segs.first().is_some_and(|s| matches!(s, PathSeg::Ruled(_)));
            match segs.iter().find_map(|s| match s {
                PathSeg::Named(n) => Some(n),
                _ => None,
            }) {
                Some(n) => {
                    names.push(n.clone());
                    false
                }
                // `@root`, `..`: the document (or an outer context, possibly the document).
                None if prefixed => true,
                // `this` or `.`: the document unless inside `each` or `with`.
                None => !nested,
            }
        }
        // `@root` alone parses as the local variable `root`: the whole document. Other
        // local variables (`@index`, `@key`) are not document data.
        Parameter::Path(Path::Local((_, name, _))) => name == "root",
        Parameter::Literal(_) => false,
        Parameter::Subexpression(sub) => walk(std::slice::from_ref(&sub.element), nested, names),
        #[allow(unreachable_patterns)]
        _ => true,
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
        use crate::data::TemplateData;
        use crate::model::{tests::inst, Snapshot};
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

    #[test]
    fn finds_the_parts_a_template_reads() {
        let none = Parts::default();
        let only = |services, service, vhosts| Parts {
            services,
            service,
            vhosts,
        };
        let cases = [
            ("plain {{vars.listen}} {{kv.x}}", none),
            ("{{#each services}}{{name}}{{#each instances}}{{addr this}}{{/each}}{{/each}}", only(true, false, false)),
            ("{{#each service.web}}{{port}}{{/each}}", only(false, true, false)),
            ("{{#each vhosts}}{{host}}{{/each}}{{#with (find_service services \"a\" \"b\")}}{{name}}{{/with}}", only(true, false, true)),
            ("{{#each kv}}{{@root.service.web.0.port}}{{/each}}", only(false, true, false)),
            ("{{#each kv}}{{../vhosts}}{{/each}}", only(false, false, true)),
            ("{{#if vars.x}}{{json (lookup service \"web\")}}{{/if}}", only(false, true, false)),
            ("{{#each kv}}{{this}}{{/each}}", none),
            ("{{#each kv}}{{else}}{{json this}}{{/each}}", Parts::ALL),
            ("{{#if vars.x}}{{json this}}{{/if}}", Parts::ALL),
            ("{{json this}}", Parts::ALL),
            ("{{lookup @root vars.key}}", Parts::ALL),
            ("{{#each kv}}{{lookup ../this \"x\"}}{{/each}}", Parts::ALL),
            ("{{> other}}", Parts::ALL),
            ("{{#*inline \"p\"}}{{services}}{{/inline}}", only(true, false, false)),
        ];
        for (src, want) in cases {
            let mut hb = Handlebars::new();
            hb.register_template_string("t", src).unwrap();
            assert_eq!(reads(hb.get_template("t").unwrap()), want, "{src}");
        }
        // The shipped templates read `services`, `vhosts` and `vars`: `service` is not built.
        for t in ["nginx.conf.hbs", "haproxy.cfg.hbs"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../templates")
                .join(t);
            let mut hb = Handlebars::new();
            hb.register_template_file("t", &path).unwrap();
            assert_eq!(
                reads(hb.get_template("t").unwrap()),
                only(true, false, true),
                "{t}"
            );
        }
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
        assert_eq!(r.render_current("a", "{{vars}}").unwrap(), "[object]");
        assert_eq!(
            r.render_current("b", "{{#each service.web}}{{port}}{{/each}}")
                .unwrap(),
            "80"
        );
        assert_eq!(
            r.render_current("c", "{{#each services}}{{name}}{{/each}}")
                .unwrap(),
            "web"
        );
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
