//! Rendering `services` and `vhosts` without the document holding them.
//!
//! Why: Handlebars renders from one `serde_json::Value` tree, and at 10,000 instances these two
//! lists are most of confd's memory (about 2 KiB per instance and copy: an object of nine
//! fields is a B-tree node of 640 bytes, nine key strings and the values). Yet the shipped
//! templates, and most others, read them in only two ways, each of which sees one entry at a
//! time:
//! - a top-level `{{#each services}}` (or `vhosts`) whose body sees nothing but its entry and
//!   `vars` (the loops [`super::each`] reuses): the loop builds each entry from the snapshot
//!   as it comes to it (or not at all, when it reuses the entry's text) and renders the body
//!   in a context of that entry and `vars`;
//! - `find_service services ...` at the top level: answered from the snapshot, building only
//!   the service it returns.
//!
//! A template that reads a list in any other way (or that might: `this` or `@root` where it
//! is the whole document, `..` up to it, partials, decorators, block parameters) gets the list
//! in the document as before. The analysis errs towards the document: a read it cannot place
//! keeps the list there. The output is the same either way (a unit test renders a set of
//! templates both ways); a list another template needs in the document is used from there.

use crate::render::data::List;
use crate::render::each::{everywhere, sites, Memo, SiteId};
use crate::render::helpers;
use handlebars::template::{HelperTemplate, Parameter, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, Path, PathSeg, RenderContext, RenderError,
    RenderErrorReason, ScopedJson, Template,
};
use serde_json::Value;
use std::collections::HashMap;

/// The name `find_service services ...` is given in a template that streams `services`.
/// Not a name a template can write (it has a space), so only those calls reach it.
pub const FIND_SERVICE: &str = "find_service (streamed)";

/// What a template reads of the lists one entry at a time.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Streams {
    /// The lists it never needs in the document.
    pub lists: Vec<List>,
    /// Its top-level loops over those lists, by the address of their body.
    pub loops: HashMap<SiteId, List>,
    /// Its top-level `find_service services ...` calls (when `services` streams), by address.
    finds: Vec<*const HelperTemplate>,
}

/// What `t` reads of the lists one entry at a time (see the module doc).
pub fn analyse(t: &Template) -> Streams {
    if !everywhere(&t.elements) {
        // Partials, decorators or block parameters: names may mean anything.
        return Streams::default();
    }
    let sealed = sites(t);
    let mut uses = Uses::default();
    scan(&t.elements, 0, &sealed, &mut uses);
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

/// Points the top-level `find_service services ...` calls of `t` at the streamed helper
/// ([`FIND_SERVICE`]), which answers from the snapshot when the document lacks `services`.
/// `streams` must be `analyse(t)` of this very `t` (calls are found by address).
pub fn rewrite(t: &mut Template, streams: &Streams) {
    if !streams.finds.is_empty() {
        rewrite_elements(&mut t.elements, &streams.finds);
    }
}

fn rewrite_elements(elements: &mut [TemplateElement], finds: &[*const HelperTemplate]) {
    for e in elements {
        let (TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h)) = e
        else {
            continue;
        };
        if finds.contains(&(&**h as *const HelperTemplate)) {
            h.name = Parameter::Name(FIND_SERVICE.into());
            h.params[0] = Parameter::Literal(Value::String(List::Services.key().into()));
        }
        for p in h.params.iter_mut().chain(h.hash.values_mut()) {
            if let Parameter::Subexpression(s) = p {
                rewrite_elements(std::slice::from_mut(&mut *s.element), finds);
            }
        }
        for t in [&mut h.template, &mut h.inverse].into_iter().flatten() {
            rewrite_elements(&mut t.elements, finds);
        }
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
    sealed: &HashMap<SiteId, crate::render::each::Site>,
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
            param(&h.name, depth, uses);
            // Called bare, these helpers read `this` (see `helpers`).
            if h.params.is_empty() && name.is_some_and(helpers::reads_this) && depth == 0 {
                uses.whole = true;
            }
            &h.params
        };
        for p in params.iter().chain(h.hash.values()) {
            param(p, depth, uses);
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

fn param(p: &Parameter, depth: usize, uses: &mut Uses) {
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

/// `find_service services name tag` where `services` streams: from the document when it holds
/// `services` (another template needs it there, or a one-off render of a full document), else
/// from the snapshot of the render under way.
pub struct FindService {
    pub memo: Memo,
}

impl HelperDef for FindService {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        // As `find_service`, which lets a missing name or tag be empty.
        let args: Vec<Option<&Value>> = h
            .params()
            .iter()
            .map(|p| (!p.is_value_missing()).then(|| p.value()))
            .collect();
        let (name, tag) = helpers::service_query(args.get(1..).unwrap_or_default());
        // The call is at the top level (see `analyse`): `services` there is the document's.
        let found = match ctx.data().get(List::Services.key()) {
            Some(Value::Array(services)) => helpers::pick_service(services, &name, &tag),
            _ => self
                .memo
                .lists()
                .ok_or_else(|| {
                    RenderErrorReason::Other(
                        "helper find_service: no `services` to search (no render under way)".into(),
                    )
                })?
                .find_service(&name, &tag),
        };
        Ok(ScopedJson::Derived(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::each::tests::shipped;

    fn lists(src: &str) -> Vec<List> {
        let mut hb = Handlebars::new();
        hb.register_template_string("t", src).unwrap();
        analyse(hb.get_template("t").unwrap()).lists
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
