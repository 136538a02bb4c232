//! What the render engine knows about a template, found once, when it is parsed: the one
//! analysis every other part of the engine reads.
//!
//! [`Analysis::of`] answers, for a parsed template:
//! - how deep its own blocks, subexpressions and partials nest ([`nesting`]), which the
//!   renderer holds against `max_render_depth` (see `bounds`);
//! - which loops may reuse what they wrote for unchanged entries (the loop sites `each`
//!   keeps texts for), and whether a loop body reads a loop variable;
//! - which of the lists (`services`, `vhosts`) it reads one entry at a time, so that they
//!   stay out of the document (`stream`), with the loops that stream them and the
//!   `find_service services ...` calls to answer from the snapshot;
//! - which large parts of the document ([`Parts`]) it reads, less the lists it streams.
//!
//! Every walker over a template's elements lives here, so what the engine assumes about a
//! template is written in one place; `each`, `stream` and the renderer take the answers and
//! walk nothing themselves. Every answer errs the safe way: towards rendering a loop every
//! time, towards keeping a list in the document, towards reading a part.
//!
//! The walkers other than [`nesting`] recurse into the template, so the renderer measures
//! [`nesting`] (with a stack of its own) before anything else, and refuses a template nested
//! past its bound before this analysis runs.
//!
//! Loops and calls are named by address (a [`SiteId`], a `*const HelperTemplate`): the address
//! of a loop's body, which sits on the heap inside its block's boxed element. It stays put
//! when the template moves into the registry, and the rewrites (`stream::rewrite`,
//! `bounds::nest_partials`) change elements in place around it, so the addresses found here
//! are those of the template that renders.

use super::data::{List, Parts};
use super::helpers;
use handlebars::template::{HelperTemplate, Parameter, Template, TemplateElement};
use handlebars::{Path, PathSeg};
use std::collections::HashMap;

/// A loop whose iterations may be reused: the address of its body in a parsed template.
pub(super) type SiteId = usize;

/// A loop whose iterations may be reused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loop {
    /// Whether the body reads a loop variable (`@index`, `@first`, `@last`, `@key`).
    pub locals: bool,
    /// The list it loops over when that list stays out of the document (see `stream`).
    pub stream: Option<List>,
}

/// Everything the engine needs to know about one parsed template (see the module doc).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Analysis {
    /// How deep its own blocks, subexpressions and partials nest ([`nesting`]).
    pub nesting: usize,
    /// The large parts of the document it reads, less the lists it streams.
    pub reads: Parts,
    /// The lists it never needs in the document.
    pub streams: Vec<List>,
    /// Its loops whose iterations may be reused, by the address of their body.
    pub loops: HashMap<SiteId, Loop>,
    /// Its top-level `find_service services ...` calls (when `services` streams), by address:
    /// what `stream::rewrite` points at the streamed helper.
    pub finds: Vec<*const HelperTemplate>,
}

impl Analysis {
    /// The analysis of `t`. `t` must nest no deeper than the render's bound allows: all but
    /// [`nesting`] recurse (see the module doc).
    pub fn of(t: &Template) -> Analysis {
        let nesting = nesting(&t.elements);
        // Partials, decorators or block parameters can change what a name means anywhere:
        // no loop is reused and no list streams.
        let (loops, streamed) = if everywhere(&t.elements) {
            let mut loops = sites(&t.elements);
            let streamed = streams(t, &loops);
            for (site, list) in &streamed.loops {
                if let Some(l) = loops.get_mut(site) {
                    l.stream = Some(*list);
                }
            }
            (loops, streamed)
        } else {
            (HashMap::new(), Streams::default())
        };
        Analysis {
            nesting,
            reads: reads(t).without(&streamed.lists),
            streams: streamed.lists,
            loops,
            finds: streamed.finds,
        }
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
fn reads(t: &Template) -> Parts {
    let mut names = Vec::new();
    if reads_in(&t.elements, false, &mut names) {
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
fn reads_in(elements: &[TemplateElement], nested: bool, names: &mut Vec<String>) -> bool {
    elements.iter().any(|e| match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => false,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            let narrows =
                h.block && matches!(&h.name, Parameter::Name(n) if n == "each" || n == "with");
            reads_param(&h.name, nested, names)
                || h.params.iter().any(|p| reads_param(p, nested, names))
                || h.hash.values().any(|p| reads_param(p, nested, names))
                || h.template
                    .as_ref()
                    .is_some_and(|t| reads_in(&t.elements, nested || narrows, names))
                || h.inverse
                    .as_ref()
                    .is_some_and(|t| reads_in(&t.elements, nested, names))
        }
        TemplateElement::DecoratorExpression(d) | TemplateElement::DecoratorBlock(d) => {
            d.params.iter().any(|p| reads_param(p, nested, names))
                || d.hash.values().any(|p| reads_param(p, nested, names))
                || d.template
                    .as_ref()
                    .is_some_and(|t| reads_in(&t.elements, nested, names))
        }
        TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => true,
        // A future element kind: assume the worst.
        #[allow(unreachable_patterns)]
        _ => true,
    })
}

fn reads_param(p: &Parameter, nested: bool, names: &mut Vec<String>) -> bool {
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
        Parameter::Subexpression(sub) => {
            reads_in(std::slice::from_ref(&sub.element), nested, names)
        }
        #[allow(unreachable_patterns)]
        _ => true,
    }
}

/// How deep blocks, subexpressions and partials nest in `elements` (a partial counts one: what
/// it includes is counted as it renders, see `bounds`; an inline partial's body counts from
/// where it is written). Measured with a stack of its own, not by recursion: it is what keeps
/// a template nested deeper than a thread's stack away from the code that recurses.
pub(super) fn nesting(elements: &[TemplateElement]) -> usize {
    /// Elements, or parameters, below `.1` levels.
    enum Item<'a> {
        Elements(&'a [TemplateElement], usize),
        Params(Vec<&'a Parameter>, usize),
    }
    let mut todo = vec![Item::Elements(elements, 0)];
    let mut deepest = 0;
    while let Some(item) = todo.pop() {
        match item {
            Item::Params(params, below) => {
                for p in params {
                    if let Parameter::Subexpression(sub) = p {
                        deepest = deepest.max(below + 1);
                        todo.push(Item::Elements(
                            std::slice::from_ref(&*sub.element),
                            below + 1,
                        ));
                    }
                }
            }
            Item::Elements(es, below) => {
                for e in es {
                    match e {
                        TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                            todo.push(Item::Params(
                                h.params.iter().chain(h.hash.values()).collect(),
                                below,
                            ));
                        }
                        TemplateElement::HelperBlock(h) => {
                            let level = below + 1;
                            deepest = deepest.max(level);
                            todo.push(Item::Params(
                                h.params.iter().chain(h.hash.values()).collect(),
                                level,
                            ));
                            for t in [&h.template, &h.inverse].into_iter().flatten() {
                                todo.push(Item::Elements(&t.elements, level));
                            }
                        }
                        TemplateElement::DecoratorExpression(d)
                        | TemplateElement::DecoratorBlock(d) => {
                            todo.push(Item::Params(
                                d.params.iter().chain(d.hash.values()).collect(),
                                below,
                            ));
                            if let Some(t) = &d.template {
                                todo.push(Item::Elements(&t.elements, below));
                            }
                        }
                        TemplateElement::PartialExpression(d)
                        | TemplateElement::PartialBlock(d) => {
                            let level = below + 1;
                            deepest = deepest.max(level);
                            todo.push(Item::Params(
                                d.params.iter().chain(d.hash.values()).collect(),
                                level,
                            ));
                            if let Some(t) = &d.template {
                                todo.push(Item::Elements(&t.elements, level));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    deepest
}

/// What a template reads of the lists one entry at a time.
#[derive(Debug, Default)]
struct Streams {
    /// The lists it never needs in the document.
    lists: Vec<List>,
    /// Its top-level loops over those lists, by the address of their body.
    loops: HashMap<SiteId, List>,
    /// Its top-level `find_service services ...` calls (when `services` streams), by address.
    finds: Vec<*const HelperTemplate>,
}

/// What `t`, a template with neither partials, decorators nor block parameters, reads of the
/// lists one entry at a time (see `stream`); `sealed`: its loop sites.
fn streams(t: &Template, sealed: &HashMap<SiteId, Loop>) -> Streams {
    let mut uses = Uses::default();
    scan(&t.elements, 0, sealed, &mut uses);
    if uses.whole {
        return Streams::default();
    }
    let lists: Vec<List> = List::ALL
        .into_iter()
        .filter(|l| !uses.other.contains(l))
        .collect();
    Streams {
        loops: uses
            .loops
            .into_iter()
            .filter(|(_, l)| lists.contains(l))
            .collect(),
        finds: if lists.contains(&List::Services) {
            uses.finds
        } else {
            Vec::new()
        },
        lists,
    }
}

/// How a template reads the lists.
#[derive(Default)]
struct Uses {
    /// Top-level loops with a sealed body over a list.
    loops: Vec<(SiteId, List)>,
    /// Top-level `find_service services ...` calls.
    finds: Vec<*const HelperTemplate>,
    /// Lists read in some other way.
    other: Vec<List>,
    /// The whole document may be read (`this` or `@root` where it is the document).
    whole: bool,
}

impl Uses {
    /// A read of the document's key `key`.
    fn key(&mut self, key: &str) {
        if let Some(l) = List::from_key(key) {
            self.other.push(l);
        }
    }
}

/// `depth`: how many `each` or `with` bodies enclose `elements` (their `else` does not
/// count): at 0, `this` is the document. Other block helpers are taken to keep their
/// parent's context, which errs the safe way both for names (taken as the document's keys)
/// and for `..` (taken to reach the document sooner).
fn scan(
    elements: &[TemplateElement],
    depth: usize,
    sealed: &HashMap<SiteId, Loop>,
    uses: &mut Uses,
) {
    for e in elements {
        let h = match e {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => continue,
            TemplateElement::Expression(h)
            | TemplateElement::HtmlExpression(h)
            | TemplateElement::HelperBlock(h) => h,
            _ => {
                uses.whole = true;
                continue;
            }
        };
        // A bare `{{addr}}` parses as a path, a call with arguments as a name.
        let name = match &h.name {
            Parameter::Name(n) => Some(n.as_str()),
            Parameter::Path(Path::Relative((_, raw))) => Some(raw.as_str()),
            _ => None,
        };
        let first = h.params.first().and_then(bare_list);
        if depth == 0 && h.block && name == Some("each") && h.params.len() == 1 {
            let body = h.template.as_ref().map(|t| t as *const Template as SiteId);
            if let (Some(list), Some(body), true) = (first, body, h.hash.is_empty()) {
                if sealed.contains_key(&body) {
                    // The body reads nothing outside its entry but `@root.vars`.
                    uses.loops.push((body, list));
                    if let Some(inverse) = &h.inverse {
                        scan(&inverse.elements, depth, sealed, uses);
                    }
                    continue;
                }
            }
        }
        let params: &[Parameter] = if depth == 0
            && !h.block
            && name == Some("find_service")
            && first == Some(List::Services)
        {
            uses.finds.push(&**h as *const HelperTemplate);
            &h.params[1..]
        } else {
            scan_param(&h.name, depth, uses);
            // Called bare, these helpers read `this` (see `helpers`).
            if h.params.is_empty() && name.is_some_and(helpers::reads_this) && depth == 0 {
                uses.whole = true;
            }
            &h.params
        };
        for p in params.iter().chain(h.hash.values()) {
            scan_param(p, depth, uses);
        }
        let narrows = h.block && matches!(name, Some("each" | "with"));
        if let Some(t) = &h.template {
            scan(&t.elements, depth + usize::from(narrows), sealed, uses);
        }
        if let Some(t) = &h.inverse {
            scan(&t.elements, depth, sealed, uses);
        }
    }
}

/// The list a parameter names when it is just its key (`services`, `vhosts`).
fn bare_list(p: &Parameter) -> Option<List> {
    match p {
        Parameter::Path(Path::Relative((segs, _))) => match segs.as_slice() {
            [PathSeg::Named(n)] => List::from_key(n),
            _ => None,
        },
        _ => None,
    }
}

fn scan_param(p: &Parameter, depth: usize, uses: &mut Uses) {
    match p {
        // A helper's name, or a key when no helper is called so.
        Parameter::Name(n) => {
            if depth == 0 {
                uses.key(n);
            }
        }
        Parameter::Path(Path::Relative((segs, raw))) => {
            // Leading rules are `@root` or `..` (the `@` of a local variable makes a local
            // path); Handlebars' rule type is not public, so the raw text tells which.
            let from_root = raw.starts_with("@root");
            let ups = segs
                .iter()
                .take_while(|s| matches!(s, PathSeg::Ruled(_)))
                .count();
            if !from_root && ups < depth {
                return;
            }
            match segs.iter().find_map(|s| match s {
                PathSeg::Named(n) => Some(n),
                _ => None,
            }) {
                Some(n) => uses.key(n),
                None => uses.whole = true,
            }
        }
        // `@root` alone parses as the local variable `root`.
        Parameter::Path(Path::Local((_, name, _))) => {
            if name == "root" {
                uses.whole = true;
            }
        }
        Parameter::Literal(_) => {}
        Parameter::Subexpression(s) => {
            let e = std::slice::from_ref(&*s.element);
            // A subexpression has no body: no sites to find in it.
            scan(e, depth, &HashMap::new(), uses);
        }
        #[allow(unreachable_patterns)]
        _ => uses.whole = true,
    }
}

/// The loops in `elements` whose iterations may be reused, by the address of their body: a
/// loop whose body reads nothing outside its entry but `@root.vars` (see `each`). Only for a
/// template of which [`everywhere`] holds.
fn sites(elements: &[TemplateElement]) -> HashMap<SiteId, Loop> {
    let mut found = HashMap::new();
    collect(elements, &mut found);
    found
}

/// Whether nothing in `elements` can change what a name means inside a loop body: no
/// partials, decorators or block parameters.
fn everywhere(elements: &[TemplateElement]) -> bool {
    elements.iter().all(|e| match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => true,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            h.block_param.is_none()
                && h.params.iter().chain(h.hash.values()).all(sub_everywhere)
                && [&h.template, &h.inverse]
                    .iter()
                    .all(|t| t.as_ref().map_or(true, |t| everywhere(&t.elements)))
        }
        _ => false,
    })
}

fn sub_everywhere(p: &Parameter) -> bool {
    match p {
        Parameter::Subexpression(s) => everywhere(std::slice::from_ref(&s.element)),
        _ => true,
    }
}

fn collect(elements: &[TemplateElement], found: &mut HashMap<SiteId, Loop>) {
    for e in elements {
        let (TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h)) = e
        else {
            continue;
        };
        let each = h.block && matches!(&h.name, Parameter::Name(n) if n == "each");
        if let (true, Some(body)) = (each, &h.template) {
            let mut locals = false;
            if sealed(&body.elements, &mut locals) {
                let site = Loop {
                    locals,
                    stream: None,
                };
                found.insert(body as *const Template as SiteId, site);
            }
        }
        for t in [&h.template, &h.inverse].into_iter().flatten() {
            collect(&t.elements, found);
        }
    }
}

/// Whether `elements`, inside a loop body, read nothing outside the body's entry but
/// `@root.vars`; sets `locals` when they read a loop variable (`@index`, `@first`, ...).
fn sealed(elements: &[TemplateElement], locals: &mut bool) -> bool {
    elements.iter().all(|e| match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => true,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            !matches!(&h.name, Parameter::Name(n) if n == "log")
                && std::iter::once(&h.name)
                    .chain(&h.params)
                    .chain(h.hash.values())
                    .all(|p| param_sealed(p, locals))
                && [&h.template, &h.inverse]
                    .iter()
                    .all(|t| t.as_ref().map_or(true, |t| sealed(&t.elements, locals)))
        }
        _ => false,
    })
}

fn param_sealed(p: &Parameter, locals: &mut bool) -> bool {
    match p {
        Parameter::Name(_) | Parameter::Literal(_) => true,
        // `@root.vars...` is the only way out of the entry allowed; `..` leaves it (even
        // from a loop inside the body, not told apart here).
        Parameter::Path(Path::Relative((_, raw))) => {
            if let Some(rest) = raw.strip_prefix("@root") {
                rest == ".vars" || rest.starts_with(".vars.") || rest.starts_with(".vars/")
            } else {
                !raw.contains("..")
            }
        }
        Parameter::Path(Path::Local((level, name, _))) => {
            if *level > 0 || name == "root" {
                return false;
            }
            // Anywhere in the body: inside a `with` they may still be the loop's.
            if matches!(name.as_str(), "index" | "first" | "last" | "key") {
                *locals = true;
            }
            true
        }
        Parameter::Subexpression(s) => sealed(std::slice::from_ref(&s.element), locals),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::each::tests::shipped;
    use handlebars::Handlebars;

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

    fn lists(src: &str) -> Vec<List> {
        let mut hb = Handlebars::new();
        hb.register_template_string("t", src).unwrap();
        Analysis::of(hb.get_template("t").unwrap()).streams
    }

    #[test]
    fn streams_only_lists_read_one_entry_at_a_time() {
        let both = List::ALL.to_vec();
        for name in ["haproxy.cfg.hbs", "nginx.conf.hbs"] {
            assert_eq!(lists(&shipped(name)), both, "{name}");
        }
        let services = vec![List::Services];
        let vhosts = vec![List::Vhosts];
        for (src, want) in [
            (
                "{{#each services}}{{#each instances}}{{id}}{{/each}}{{/each}}",
                &both,
            ),
            (
                "{{#if vars.x}}{{#each vhosts}}{{host}}{{/each}}{{/if}}",
                &both,
            ),
            (
                "{{#each services}}{{name}}{{else}}{{#each vhosts}}x{{/each}}{{/each}}",
                &both,
            ),
            (
                "{{#with (find_service services \"a\")}}{{name}}{{/with}}",
                &both,
            ),
            (
                "{{#each vars}}{{#each services}}{{name}}{{/each}}{{/each}}",
                &both,
            ),
            // Read otherwise: kept in the document.
            ("{{#each services}}{{../vars}}{{/each}}", &vhosts),
            ("{{#if services}}x{{/if}}", &vhosts),
            ("{{services.[0].name}}", &vhosts),
            ("{{#with vars}}{{../services}}{{/with}}", &vhosts),
            (
                "{{#with vars}}{{#with x}}{{../../vhosts}}{{/with}}{{/with}}",
                &services,
            ),
            ("{{#each vars}}{{@root.vhosts}}{{/each}}", &services),
            ("{{find_service @root.services \"a\"}}", &vhosts),
            (
                "{{#find_service services \"a\"}}x{{/find_service}}",
                &vhosts,
            ),
            ("{{#each services key=1}}{{name}}{{/each}}", &vhosts),
            (
                "{{#each (default services services)}}{{name}}{{/each}}",
                &vhosts,
            ),
            ("{{#with vars}}{{else}}{{services}}{{/with}}", &vhosts),
        ] {
            assert_eq!(&lists(src), want, "{src}");
        }
        // The whole document, or what might be: nothing streams.
        for src in [
            "{{#each services}}x{{/each}}{{json this}}",
            "{{#each services}}x{{/each}}{{json @root}}",
            "{{#each services}}x{{/each}}{{#each vars}}{{json ../this}}{{/each}}",
            "{{#each services}}x{{/each}}{{#if vars.a}}{{lookup this \"vhosts\"}}{{/if}}",
            "{{#each services}}x{{/each}}{{addr}}",
            "{{#each services}}x{{/each}}{{> other}}",
            "{{#each services as |s|}}{{s.name}}{{/each}}",
        ] {
            assert_eq!(lists(src), Vec::<List>::new(), "{src}");
        }
    }
}
