//! confd's `{{#each}}`: Handlebars' own, plus reuse of what a loop over `services` or `vhosts`
//! wrote for an entry that has not changed since the last render.
//!
//! Why: at 10,000 instances a render is 15,000 server lines, and Handlebars spends about
//! 1.6 µs of CPU on each (every `id` or `this` inside the loop is looked up again from the
//! document's root through string keys, with a string allocated per path segment). No helper
//! can make a lookup cheaper, but a change usually touches one service, and the document
//! knows which entries it rebuilt ([`Births`](super::data::Births)): an entry with the same
//! birth is the same value, so the text its iteration wrote last time is the text it would
//! write again.
//!
//! That holds only when the loop body can see nothing but the entry and `vars`, which the
//! template's analysis (`super::analysis`) decides, erring towards "render it": a body that
//! uses `..`, `@root` other than `@root.vars`, an outer block's variables (`@../index`), partials,
//! decorators, block parameters or `log` is rendered every time, as is every loop of a
//! template with partials, decorators or block parameters anywhere (they can change what a
//! name means inside the body). `@index`, `@first`, `@last` and `@key` are part of what is
//! reused by. Everything else behaves as Handlebars' builtin `each` (a unit test renders a set of
//! templates both ways).

use super::analysis::{Loop, SiteId};
use super::bounds::{self, Bounded};
use super::data::{List, Lists};
use handlebars::{
    to_json, BlockContext, BlockParams, Context, Handlebars, Helper, HelperDef, HelperResult,
    Output, RenderContext, RenderError, RenderErrorReason, Renderable, Template,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// What an iteration's text is reused by: the entry's birth, `vars`' birth, and when the body
/// reads a loop variable (`@index`, `@first`, `@last`, `@key`), the index and whether it is
/// the last.
type Key = (u64, u64, Option<(usize, bool)>);

/// One reusable loop: the texts of the last render and those of the current one.
#[derive(Default)]
struct Site {
    /// What the template's analysis found of it.
    shape: Loop,
    last: HashMap<Key, String>,
    current: HashMap<Key, String>,
}

#[derive(Default)]
struct State {
    /// Per template name, its reusable loops.
    templates: HashMap<String, HashMap<SiteId, Site>>,
    /// The template being rendered from a [`TemplateData`](super::data::TemplateData), if
    /// any, and that document's lists.
    active: Option<(String, Arc<Lists>)>,
}

/// The texts kept between renders, shared by the [`Renderer`](crate::render::Renderer) that
/// says what is rendered and the `each` helper it registers.
#[derive(Clone, Default)]
pub struct Memo(Arc<Mutex<State>>);

impl Memo {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves only texts behind: still valid to read.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `name` was parsed again: forget its loops and take `loops`, those its analysis found
    /// ([`Analysis::loops`](super::analysis::Analysis::loops)).
    pub(super) fn parsed(&self, name: &str, loops: &HashMap<SiteId, Loop>) {
        let found: HashMap<SiteId, Site> = loops
            .iter()
            .map(|(id, shape)| {
                let site = Site {
                    shape: *shape,
                    ..Site::default()
                };
                (*id, site)
            })
            .collect();
        let mut s = self.lock();
        if found.is_empty() {
            s.templates.remove(name);
        } else {
            s.templates.insert(name.to_string(), found);
        }
    }

    /// `name` is no longer registered: its loops' addresses mean nothing now.
    pub fn forget(&self, name: &str) {
        self.lock().templates.remove(name);
    }

    /// Registers the `each` helper that reuses through this memo, over the builtin.
    pub fn register(&self, hb: &mut Handlebars) {
        hb.register_helper("each", Box::new(EachHelper { memo: self.clone() }));
    }

    /// `name` is about to be rendered from a document whose lists are `lists`.
    pub fn begin(&self, name: &str, lists: Lists) {
        self.lock().active = Some((name.to_string(), Arc::new(lists)));
    }

    /// The lists of the document being rendered, if any.
    pub fn lists(&self) -> Option<Arc<Lists>> {
        self.lock().active.as_ref().map(|(_, l)| l.clone())
    }

    /// The list the loop whose body is `body` streams, with the lists of the render under
    /// way: `None` when the loop is not one that streams or no such render is under way.
    fn stream(&self, body: &Template) -> Option<(List, Arc<Lists>)> {
        let s = self.lock();
        let (name, lists) = s.active.as_ref()?;
        let site = s
            .templates
            .get(name)?
            .get(&(body as *const Template as SiteId))?;
        Some((site.shape.stream?, lists.clone()))
    }

    /// The render begun last is over: keep the texts it wrote, drop those it did not use (or,
    /// when it failed, everything of that template, since it may have stopped half way).
    pub fn finish(&self, ok: bool) {
        let mut s = self.lock();
        let Some((name, _)) = s.active.take() else {
            return;
        };
        if let Some(sites) = s.templates.get_mut(&name) {
            for site in sites.values_mut() {
                site.last = if ok {
                    std::mem::take(&mut site.current)
                } else {
                    HashMap::new()
                };
                site.current = HashMap::new();
            }
        }
    }

    /// How a loop over `list` with `len` entries, whose body is `body`, is reused: `None`
    /// when it is not. The loop holds its site's texts while it runs (no lock per entry) and
    /// gives them back with [`Memo::done`].
    fn plan(&self, body: &Template, list: List, len: usize) -> Option<Plan> {
        let mut s = self.lock();
        let State { templates, active } = &mut *s;
        let (name, lists) = active.as_ref()?;
        let births = lists.births();
        let site_id = body as *const Template as SiteId;
        let list = match list {
            List::Services => &births.services,
            List::Vhosts => &births.vhosts,
        };
        if list.len() != len {
            return None;
        }
        let site = templates.get_mut(name)?.get_mut(&site_id)?;
        Some(Plan {
            site: site_id,
            locals: site.shape.locals,
            births: list.clone(),
            vars: births.vars,
            last: std::mem::take(&mut site.last),
            current: HashMap::new(),
        })
    }

    /// A loop planned with [`Memo::plan`] is over: its site keeps the texts it wrote (and
    /// those it did not use, should the same loop run again in this render).
    fn done(&self, plan: Plan) {
        let mut s = self.lock();
        let State { templates, active } = &mut *s;
        let Some((name, _)) = active.as_ref() else {
            return;
        };
        if let Some(site) = templates.get_mut(name).and_then(|t| t.get_mut(&plan.site)) {
            site.last = plan.last;
            site.current.extend(plan.current);
        }
    }
}

/// How one loop is reused (see [`Memo::plan`]), with its site's texts while it runs.
struct Plan {
    site: SiteId,
    locals: bool,
    births: Vec<u64>,
    vars: u64,
    last: HashMap<Key, String>,
    current: HashMap<Key, String>,
}

impl Plan {
    /// What iteration `i` of `len` is reused by.
    fn key(&self, i: usize, len: usize) -> Key {
        let locals = self.locals.then_some((i, i + 1 == len));
        (self.births[i], self.vars, locals)
    }

    /// Writes the text the last render kept under `key`, if any, keeping it for the next:
    /// whether there was one.
    fn reuse(&mut self, key: &Key, out: &mut dyn Output) -> std::io::Result<bool> {
        let Some(text) = self.last.remove(key) else {
            return Ok(false);
        };
        out.write(&text)?;
        self.current.insert(*key, text);
        Ok(true)
    }
}

/// The `each` helper, registered over Handlebars' builtin (see [`Memo::register`]).
struct EachHelper {
    memo: Memo,
}

impl HelperDef for EachHelper {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let value = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("each", 0))?;
        let Some(t) = h.template() else {
            return Ok(());
        };
        if value.is_value_missing() {
            if let Some((list, lists)) = self.memo.stream(t) {
                return self.streamed(list, &lists, t, h, r, ctx, rc, out);
            }
        }
        // What follows is Handlebars 6's `each` (helpers/helper_each.rs), step for step, with
        // the reuse of iterations added for arrays.
        match value.value() {
            Value::Array(list) if !list.is_empty() || h.inverse().is_none() => {
                rc.push_block(block_for(value.context_path(), value.value()));
                let path = value.context_path();
                let len = list.len();
                let mut plan = match path.map(Vec::as_slice) {
                    Some([key]) => List::from_key(key).and_then(|l| self.memo.plan(t, l, len)),
                    _ => None,
                };
                // Where an iteration to keep is rendered: one buffer for the loop, so each
                // kept text is one allocation of its exact size. What it holds counts against
                // the render's output bound until it is copied out (see `crate::render`).
                let mut scratch = Bounded::default();
                for (i, v) in list.iter().enumerate() {
                    bounds::step()?;
                    let key = plan.as_ref().map(|p| p.key(i, len));
                    if let (Some(p), Some(k)) = (&mut plan, &key) {
                        if p.reuse(k, out)? {
                            continue;
                        }
                    }
                    if let Some(block) = rc.block_mut() {
                        let index = to_json(i);
                        block.set_local_var("first", to_json(i == 0));
                        block.set_local_var("last", to_json(i + 1 == len));
                        block.set_local_var("index", index.clone());
                        set_base(block, path, i.to_string(), v);
                        set_block_params(block, h, path, &index, v)?;
                    }
                    match (&mut plan, key) {
                        (Some(p), Some(k)) => {
                            scratch.0.clear();
                            t.render(r, ctx, rc, &mut scratch)?;
                            scratch.copy_into(out)?;
                            p.current.insert(k, scratch.0.clone());
                        }
                        _ => t.render(r, ctx, rc, out)?,
                    }
                }
                if let Some(p) = plan {
                    self.memo.done(p);
                }
                rc.pop_block();
                Ok(())
            }
            Value::Object(obj) if !obj.is_empty() || h.inverse().is_none() => {
                rc.push_block(block_for(value.context_path(), value.value()));
                let path = value.context_path();
                let len = obj.len();
                for (i, (k, v)) in obj.iter().enumerate() {
                    bounds::step()?;
                    if let Some(block) = rc.block_mut() {
                        let key = to_json(k);
                        block.set_local_var("first", to_json(i == 0));
                        block.set_local_var("last", to_json(i + 1 == len));
                        block.set_local_var("key", key.clone());
                        block.set_local_var("index", to_json(i));
                        set_base(block, path, k.to_string(), v);
                        set_block_params(block, h, path, &key, v)?;
                    }
                    t.render(r, ctx, rc, out)?;
                }
                rc.pop_block();
                Ok(())
            }
            _ => {
                if let Some(else_template) = h.inverse() {
                    else_template.render(r, ctx, rc, out)
                } else if r.strict_mode() {
                    Err(RenderError::strict_error(value.relative_path()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl EachHelper {
    /// A loop over `list` that streams (see [`super::stream`]): each entry is built from
    /// `lists` only when its text cannot be reused, and its body rendered in a context of its
    /// own holding the entry, at the path it has in the document (`<list>.<index>`), and
    /// `vars`: all a sealed body can read. The rest is the builtin's loop over an array.
    #[allow(clippy::too_many_arguments)]
    fn streamed<'reg: 'rc, 'rc>(
        &self,
        list: List,
        lists: &Lists,
        t: &'rc Template,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let entries = lists.entries(list);
        if entries.is_empty() {
            return match h.inverse() {
                Some(e) => e.render(r, ctx, rc, out),
                None => Ok(()),
            };
        }
        let len = entries.len();
        let mut plan = self.memo.plan(t, list, len);
        let mut root = Map::new();
        root.insert("vars".into(), lists.vars().clone());
        let mut scratch = Bounded::default();
        // The entry being rendered, built into the previous one's allocations.
        let mut value = Value::Null;
        for (i, e) in entries.iter().enumerate() {
            bounds::step()?;
            let key = plan.as_ref().map(|p| p.key(i, len));
            if let (Some(p), Some(k)) = (&mut plan, &key) {
                if p.reuse(k, out)? {
                    continue;
                }
            }
            let index = i.to_string();
            e.fill(&mut value);
            let holder = Map::from_iter([(index.clone(), std::mem::take(&mut value))]);
            root.insert(list.key().into(), Value::Object(holder));
            let mut entry = Context::from(Value::Object(root));
            {
                let mut erc: RenderContext<'reg, '_> = rc.clone();
                let mut block = BlockContext::new();
                block.set_local_var("first", to_json(i == 0));
                block.set_local_var("last", to_json(i + 1 == len));
                block.set_local_var("index", to_json(i));
                *block.base_path_mut() = vec![list.key().to_string(), index];
                erc.push_block(block);
                scratch.0.clear();
                t.render(r, &entry, &mut erc, &mut scratch)?;
            }
            scratch.copy_into(out)?;
            if let (Some(p), Some(k)) = (&mut plan, key) {
                p.current.insert(k, scratch.0.clone());
            }
            let Value::Object(mut m) = std::mem::take(entry.data_mut()) else {
                unreachable!("built as an object above")
            };
            if let Some(Value::Object(holder)) = m.remove(list.key()) {
                value = holder.into_iter().next().map_or(Value::Null, |(_, v)| v);
            }
            root = m;
        }
        if let Some(p) = plan {
            self.memo.done(p);
        }
        Ok(())
    }
}

/// The block a loop runs in: at the collection's path, or holding the collection when it has
/// no path (a helper's result).
fn block_for<'rc>(path: Option<&Vec<String>>, value: &Value) -> BlockContext<'rc> {
    let mut block = BlockContext::new();
    match path {
        Some(p) => block.base_path_mut().clone_from(p),
        None => block.set_base_value(value.clone()),
    }
    block
}

/// Points the block at entry `key` of the collection at `path` (or at the entry's value).
fn set_base(block: &mut BlockContext<'_>, path: Option<&Vec<String>>, key: String, v: &Value) {
    match path {
        Some(p) => {
            let base = block.base_path_mut();
            base.clone_from(p);
            base.push(key);
        }
        None => block.set_base_value(v.clone()),
    }
}

/// `as |value|` and `as |value key|`.
fn set_block_params<'rc>(
    block: &mut BlockContext<'rc>,
    h: &Helper<'rc>,
    path: Option<&Vec<String>>,
    key: &Value,
    v: &Value,
) -> Result<(), RenderError> {
    let (name, key_name) = match (h.block_param(), h.block_param_pair()) {
        (Some(n), _) => (n, None),
        (None, Some((n, k))) => (n, Some(k)),
        (None, None) => return Ok(()),
    };
    let mut params = BlockParams::new();
    if path.is_some() {
        params.add_path(name, Vec::new())?;
    } else {
        params.add_value(name, v.clone())?;
    }
    if let Some(k) = key_name {
        params.add_value(k, key.clone())?;
    }
    block.set_block_params(params);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Instance, Snapshot};
    use crate::render::analysis::Analysis;
    use crate::render::data::tests::{change_instances, Lcg};
    use crate::render::data::{Parts, TemplateData, Vars};
    use crate::render::Renderer;
    use serde_json::json;
    use std::collections::BTreeMap;

    /// Loops of every kind `each` has: arrays and objects, at a path and derived from a
    /// helper, nested, with `else`, block parameters, `..`, `@root`, and every local variable.
    const TEMPLATES: [&str; 26] = [
        "{{#each services}}{{#with this}}{{@index}}{{name}}{{/with}}{{#each tags}}{{@../first}}\
         {{/each}}{{/each}}",
        "{{#each services}}{{@index}}/{{@first}}/{{@last}}:{{name}}\
         {{#each instances}}[{{@index}} {{id}} {{@../index}} {{../name}} {{addr this}}]{{/each}}\n\
         {{else}}none{{/each}}",
        "{{#each vhosts}}{{host}}={{#each instances as |i idx|}}{{idx}}:{{i.id}},{{/each}}\
         {{@root.vars.listen}}\n{{/each}}",
        "{{#each services}}{{#each tags}}{{this}}{{#unless @last}},{{/unless}}{{/each}};{{/each}}",
        "{{#each vars}}{{@key}}={{this}}@{{@index}}{{@first}}{{@last}} {{/each}}",
        "{{#each (default services services)}}{{@index}}{{name}}{{#each instances}}{{id}}{{/each}}\
         {{/each}}",
        "{{#each services}}{{#with instances}}{{#each this}}{{id}}{{/each}}{{/with}}{{/each}}",
        "{{#each services}}{{lookup @root.vars \"listen\"}}{{name}}{{/each}}",
        "{{#each services}}{{#each @root.vhosts}}{{host}}{{/each}}|{{/each}}",
        "{{#each services}}{{#if @first}}first {{/if}}{{name}}{{#if @last}} last{{/if}}\n{{/each}}",
        "{{#each services as |s|}}{{s.name}}{{#each s.instances as |i|}}{{i.port}}{{/each}}{{/each}}",
        "{{#each services as |s n|}}{{n}}{{s.name}}{{/each}}",
        "{{#each vhosts}}{{#each instances}}{{vhost}} {{meta.env}}{{else}}empty{{/each}}{{/each}}",
        "{{#each services}}{{#each instances}}{{#each meta}}{{@key}}{{@index}}{{/each}}{{/each}}\
         {{/each}}",
        "{{#each service}}{{@key}}:{{#each this}}{{id}}{{/each}}{{/each}}",
        "{{#each services}}{{@root.vars.listen}}{{#each ../vhosts}}{{host}}{{/each}}{{/each}}",
        "{{#each kv}}{{@key}}={{this}}{{else}}no kv{{/each}}{{#each nothing}}x{{/each}}",
        // Lists read in ways that keep them in the document.
        "{{#each services}}{{name}}{{/each}}{{#if services}}some{{/if}}{{json vars}}",
        "{{#each vhosts}}{{host}}{{/each}}{{#with vars}}{{#each ../services}}{{name}}{{/each}}\
         {{/with}}",
        "{{#each vars}}{{#each ../vhosts}}{{host}}{{/each}}{{/each}}{{#each services}}{{name}}\
         {{/each}}",
        "{{#each services}}{{name}}{{/each}}{{#each vars}}{{#each (lookup ../this \"vhosts\")}}\
         {{host}}{{/each}}{{/each}}",
        "{{#each services}}{{name}}{{/each}}{{find_service @root.services \"s1\"}}",
        "{{#each (find_service services \"s2\" \"t1\")}}{{@key}}{{/each}}{{#each vhosts}}{{/each}}",
        // Both lists stream in the last three (see the test).
        "{{#with (find_service services \"s1\" \"t1\")}}{{name}}:{{#each instances}}{{id}},{{/each}}\
         {{else}}none{{/with}}{{#each services}}{{@index}}{{@first}}{{@last}}{{name}}\
         {{#each instances}}{{addr this}}{{/each}};{{/each}}{{#each vhosts}}{{host}}{{/each}}",
        "{{#unless (find_service services (default vars.service \"s3\") \"t2\")}}none{{/unless}}\
         {{#each services}}{{name}}{{else}}{{#each vhosts}}{{host}}{{/each}}empty{{/each}}",
        "{{#each vhosts}}{{host}} {{name}}{{#each instances}}{{id}}{{meta.env}}{{/each}}\
         {{@root.vars.listen}}{{/each}}{{#if (find_service services \"s0\")}}s0{{/if}}\
         {{#each services}}{{#each instances}}{{#each tags}}{{this}}{{/each}}{{/each}}{{/each}}",
    ];

    pub(crate) fn shipped(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../templates")
            .join(name);
        std::fs::read_to_string(&path).unwrap()
    }

    /// The output, or `Err` with the error, of Handlebars' builtin `each` with confd's
    /// helpers, rendering `data` afresh.
    fn builtin(src: &str, data: &Value) -> Result<String, String> {
        let mut hb = Handlebars::new();
        hb.set_strict_mode(true);
        crate::render::helpers::register(&mut hb);
        hb.render_template(src, data).map_err(|e| e.to_string())
    }

    #[test]
    fn renders_as_the_builtin_each_while_reusing() {
        let mut templates: Vec<(String, String)> = TEMPLATES
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("t{i}"), t.to_string()))
            .collect();
        for name in ["haproxy.cfg.hbs", "nginx.conf.hbs"] {
            templates.push((name.to_string(), shipped(name)));
        }
        let vars_a: Vars = [("listen".into(), json!(80))].into();
        let vars_b: Vars = [
            ("listen".into(), json!(81)),
            ("sticky_cookie".into(), json!("sb")),
            ("check_expect".into(), json!("ok")),
            ("lua_peers".into(), json!(true)),
        ]
        .into();
        let mut r = Lcg(11);
        // One renderer with every list in its document, one with only those its templates
        // need there (the others stream, see `super::stream`).
        let mut renderer = Renderer::default();
        let mut data = TemplateData::build(Arc::new(Snapshot::default()), &vars_a);
        // A document per template: a list one template needs in its document would
        // otherwise be there for all.
        let mut lean = Renderer::default();
        let mut lean_data: Vec<TemplateData> = templates
            .iter()
            .map(|_| {
                TemplateData::with_parts(Arc::new(Snapshot::default()), &vars_a, Parts::default())
            })
            .collect();
        let mut current: BTreeMap<(String, String), Instance> = BTreeMap::new();
        for step in 0..150 {
            change_instances(&mut r, &mut current);
            let kv: BTreeMap<String, String> = if r.below(3) == 0 {
                [("k".into(), format!("{}", r.below(2)))].into()
            } else {
                BTreeMap::new()
            };
            let vars = if r.below(6) == 0 { &vars_b } else { &vars_a };
            let snap = Arc::new(Snapshot::build(current.values().cloned(), kv, &[]));
            data.update(snap.clone(), vars);
            for ((name, src), lean_data) in templates.iter().zip(&mut lean_data) {
                lean_data.update(snap.clone(), vars);
                let want = builtin(src, data.value());
                for (how, got) in [
                    (
                        "in the document",
                        renderer.render_data(name, src, &mut data),
                    ),
                    ("streamed", lean.render_data(name, src, lean_data)),
                ] {
                    let got = got.map_err(|e| e.to_string());
                    assert_eq!(
                        got.is_ok(),
                        want.is_ok(),
                        "step {step}, {name} {how}: {got:?} {want:?}"
                    );
                    if let (Ok(got), Ok(want)) = (got, &want) {
                        assert_eq!(&got, want, "step {step}, {name} {how}");
                    }
                }
            }
            // The shipped templates and those after them stream both lists.
            for ((name, _), d) in templates.iter().zip(&lean_data).skip(TEMPLATES.len() - 3) {
                let p = d.parts();
                assert!(!p.services && !p.vhosts, "step {step}, {name}: {p:?}");
            }
            // The shipped templates' loops kept their texts for the next step to reuse.
            if !current.is_empty() {
                let s = renderer.memo().lock();
                let kept = s.templates["haproxy.cfg.hbs"]
                    .values()
                    .map(|x| x.last.len());
                assert!(kept.sum::<usize>() > 0, "step {step}");
            }
        }
    }

    #[test]
    fn reuses_only_loops_that_see_nothing_but_their_entry_and_vars() {
        let count = |src: &str| {
            let mut hb = Handlebars::new();
            hb.register_template_string("t", src).unwrap();
            Analysis::of(hb.get_template("t").unwrap()).loops.len()
        };
        // The shipped templates: every loop (those inside a loop over `services` or `vhosts`
        // are never over the document's own, so only the outer ones are reused).
        assert_eq!(count(&shipped("haproxy.cfg.hbs")), 18);
        assert_eq!(count(&shipped("nginx.conf.hbs")), 12);
        assert_eq!(
            count("{{#each services}}{{name}}{{@index}}{{@root.vars.x}}{{/each}}"),
            1
        );
        for src in [
            "{{#each services}}{{../vars}}{{/each}}",
            "{{#each services}}{{@root.kv}}{{/each}}",
            "{{#each services}}{{@root}}{{/each}}",
            "{{#each services}}{{#each instances}}{{@../index}}{{/each}}{{/each}}",
            "{{#each services}}{{log name}}{{/each}}",
            "{{#each services}}{{> p}}{{/each}}",
            "{{#each services as |s|}}{{s.name}}{{/each}}",
            "{{#each services}}{{name}}{{/each}}{{#each vhosts as |v|}}{{v}}{{/each}}",
        ] {
            assert_eq!(count(src), 0, "{src}");
        }
    }
}
