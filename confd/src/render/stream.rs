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
//!
//! Which lists stream, through which loops and calls, is the template's analysis
//! ([`Analysis`]); this module applies it: it points the calls at the streamed `find_service`,
//! which it owns, and `each` renders the loops.

use super::analysis::Analysis;
use super::data::List;
use super::each::Memo;
use super::helpers;
use handlebars::template::{HelperTemplate, Parameter, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, RenderContext, RenderError, RenderErrorReason,
    ScopedJson, Template,
};
use serde_json::Value;

/// The name `find_service services ...` is given in a template that streams `services`.
/// Not a name a template can write (it has a space), so only those calls reach it.
pub const FIND_SERVICE: &str = "find_service (streamed)";

/// Registers the streamed `find_service` ([`FIND_SERVICE`]), which reads the lists of the
/// render under way through `memo`.
pub fn register(memo: &Memo, hb: &mut Handlebars) {
    hb.register_helper(FIND_SERVICE, Box::new(FindService { memo: memo.clone() }));
}

/// Points the top-level `find_service services ...` calls of `t` at the streamed helper
/// ([`FIND_SERVICE`]), which answers from the snapshot when the document lacks `services`.
/// `analysis` must be that of this very `t` (calls are found by address).
pub fn rewrite(t: &mut Template, analysis: &Analysis) {
    if !analysis.finds.is_empty() {
        rewrite_elements(&mut t.elements, &analysis.finds);
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

/// `find_service services name tag` where `services` streams: from the document when it holds
/// `services` (another template needs it there, or a one-off render of a full document), else
/// from the snapshot of the render under way.
struct FindService {
    memo: Memo,
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
        // The call is at the top level (see `Analysis::finds`): `services` there is the document's.
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
