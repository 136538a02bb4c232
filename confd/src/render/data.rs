//! The document templates render from, built once per snapshot and shared by every template.
//!
//! Layout: `services` (sorted by name, each `{name, tags, proto, instances}`), `service.<name>`
//! (that service's instances), `vhosts` (`[{host, name, instances, routes}]`, sorted by host),
//! `paths` and `listeners` (the routes of the default host and the ports opened for services,
//! see [`crate::routes`]), `kv`, `vars`; an instance is
//! `{id, name, address, port, tags, meta, node, health, vhost, weight}`; a route is
//! `{host, path, strip, proto, name, length, instances}`, a listener `{listen, proto, name, service,
//! instances}`.
//!
//! Why it is kept rather than rebuilt: Handlebars renders from a `serde_json::Value` tree, and
//! at 10,000 instances building that tree from scratch is tens of milliseconds of allocation
//! (every instance appears in `services`, in `service` and possibly in `vhosts`). A change
//! usually touches one service, so [`TemplateData::update`] moves the subtrees of the services
//! whose instances are unchanged into the new document and builds only the rest. The result
//! is the same document a full build gives (a unit test compares them over random sequences
//! of snapshots). The document lives in a Handlebars [`Context`], so rendering does not
//! serialise it again per template.

use crate::certs::{CertSet, Pair};
use crate::model::{Instance, Snapshot};
use crate::names::push_safe_token;
use crate::routes::{self, Claims, ListenPolicy, Listener, PathRoute, Proto, Route, Warning};
use handlebars::Context;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Variables as configured (`vars:` and `--var`).
pub type Vars = BTreeMap<String, Value>;

/// Distinct across every [`TemplateData`] of the process, so a render cached under one
/// generation can never be mistaken for another document's.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Which of the large parts of the document are built. Each costs memory and time in
/// proportion to the instances (every instance appears in `services`, again in `service` and
/// again in `vhosts` when it has a virtual host), so the daemon builds only those its
/// templates read (see `Renderer`); `kv` and `vars` are always there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parts {
    /// `services`.
    pub services: bool,
    /// `service.<name>`.
    pub service: bool,
    /// `vhosts`.
    pub vhosts: bool,
}

impl Parts {
    /// The whole document.
    pub const ALL: Parts = Parts {
        services: true,
        service: true,
        vhosts: true,
    };

    /// These, less the parts that are `lists`.
    pub fn without(self, lists: &[List]) -> Parts {
        Parts {
            services: self.services && !lists.contains(&List::Services),
            vhosts: self.vhosts && !lists.contains(&List::Vhosts),
            ..self
        }
    }

    /// Both sets together.
    pub fn union(self, o: Parts) -> Parts {
        Parts {
            services: self.services || o.services,
            service: self.service || o.service,
            vhosts: self.vhosts || o.vhosts,
        }
    }
}

/// The template document for one snapshot and one set of vars.
pub struct TemplateData {
    snap: Arc<Snapshot>,
    vars: Vars,
    parts: Parts,
    ctx: Context,
    /// Virtual host -> the services with an instance serving it: which `vhosts` entries a
    /// changed service can affect, without computing every instance's virtual host again.
    /// Kept whether or not `vhosts` is in the document: a render that reads the list one
    /// entry at a time ([`Lists`]) walks it. Shared with those renders, never copied while
    /// none runs.
    vhosts: Arc<VhostIndex>,
    /// Per service, what its instances ask of the default host and of listeners, and the
    /// warnings their routing values earn (only services with any of these).
    routing: BTreeMap<String, ServiceRouting>,
    /// Who holds each listener port (see [`Claims`]).
    claims: Claims,
    /// Warnings of `paths` and `listeners`, which span services.
    shared_warnings: Vec<Warning>,
    generation: u64,
    births: Births,
    /// The certificates being served (see [`TemplateData::set_certs`]).
    certs: Arc<CertSet>,
}

/// What one service's instances ask beyond their virtual hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ServiceRouting {
    /// Instances with a path on the default host (no virtual host), and their routes.
    paths: Vec<(Arc<Instance>, Route)>,
    /// Instances asking for a port of their own.
    listens: Vec<(Proto, u16, Arc<Instance>)>,
    /// What their values earned (bad values, ignored keys).
    warnings: Vec<Warning>,
}

impl ServiceRouting {
    fn of(insts: &[Arc<Instance>]) -> ServiceRouting {
        let mut s = ServiceRouting::default();
        for i in insts {
            let (r, w) = routes::route(i);
            s.warnings.extend(w);
            match r {
                Err(w) => s.warnings.push(w),
                Ok(r) if !r.proto.is_http() => {
                    let port = r.listen.expect("tcp and udp routes have a port");
                    s.listens.push((r.proto, port, i.clone()));
                }
                Ok(r) if r.path.is_some() && i.vhost().is_none() => s.paths.push((i.clone(), r)),
                Ok(_) => {}
            }
        }
        s
    }

    fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.listens.is_empty() && self.warnings.is_empty()
    }
}

/// Virtual host -> its `vhosts` entry's members and birth.
type VhostIndex = BTreeMap<String, VhostEntry>;

#[derive(Debug, Clone, Default)]
struct VhostEntry {
    /// The services with an instance serving the host.
    services: BTreeSet<String>,
    /// Those instances, in service then ID order (the entry's `instances`).
    instances: Vec<Arc<Instance>>,
    /// Their path routes (the entry's `routes`).
    routes: Vec<PathRoute>,
    /// Conflicts between them (see [`routes::group_paths`]).
    warnings: Vec<Warning>,
    /// When the entry was last built (see [`Births`]).
    birth: u64,
    /// The certificate pair that serves the host over HTTPS, if any.
    cert: Option<Arc<Pair>>,
    /// Whether plain HTTP redirects to HTTPS when it has one: no instance says
    /// `https_redirect=false`.
    redirect: bool,
}

/// When each entry of `services` and `vhosts` was built, and when `vars` last changed: numbers
/// unique across the process (from the generation counter), kept while an entry is moved
/// unchanged into the next document and new whenever it is built. Two entries with the same
/// birth are the same value, which lets a render reuse what it wrote for an entry last time
/// (see `super::each`) without comparing the entries. Kept for both lists whether or not they
/// are in the document: a birth names the value the entry has, built or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Births {
    /// One per entry of `services`, in order.
    pub services: Vec<u64>,
    /// One per entry of `vhosts`, in order.
    pub vhosts: Vec<u64>,
    /// `vars`.
    pub vars: u64,
}

/// A number no other birth or generation of the process has.
fn birth() -> u64 {
    GENERATIONS.fetch_add(1, Ordering::Relaxed)
}

impl TemplateData {
    /// The document for `snap` and `vars`, built in full.
    pub fn build(snap: Arc<Snapshot>, vars: &Vars) -> TemplateData {
        TemplateData::with_parts(snap, vars, Parts::ALL)
    }

    /// The document for `snap` and `vars` with only `parts` of the large parts (and `kv`,
    /// `vars`); [`TemplateData::ensure`] adds others later.
    pub fn with_parts(snap: Arc<Snapshot>, vars: &Vars, parts: Parts) -> TemplateData {
        let mut root = Map::new();
        root.insert("kv".into(), Value::Object(Map::new()));
        root.insert("tls".into(), tls_value(&CertSet::default()));
        let mut d = TemplateData {
            snap: Arc::new(Snapshot::default()),
            vars: Vars::new(),
            parts: Parts::default(),
            ctx: Context::from(Value::Object(root)),
            vhosts: Arc::default(),
            routing: BTreeMap::new(),
            claims: Claims::default(),
            shared_warnings: Vec::new(),
            generation: 0,
            births: Births::default(),
            certs: Arc::default(),
        };
        d.update(snap, vars);
        d.ensure(parts);
        d
    }

    /// The large parts built.
    pub fn parts(&self) -> Parts {
        self.parts
    }

    /// Adds the parts of `want` that are missing, built in full from the current snapshot.
    /// The generation and the births stay: what was there is unchanged, so every output
    /// rendered from it (which cannot have read a part that was not there) still holds.
    pub fn ensure(&mut self, want: Parts) {
        let add = Parts {
            services: want.services && !self.parts.services,
            service: want.service && !self.parts.service,
            vhosts: want.vhosts && !self.parts.vhosts,
        };
        if add == Parts::default() {
            return;
        }
        let lists = self.lists();
        let Value::Object(root) = self.ctx.data_mut() else {
            unreachable!("the document is an object")
        };
        for (list, wanted) in [(List::Services, add.services), (List::Vhosts, add.vhosts)] {
            if wanted {
                let entries = lists.entries(list).iter().map(Entry::value).collect();
                root.insert(list.key().into(), Value::Array(entries));
            }
        }
        if add.service {
            let map = lists
                .snap
                .services
                .iter()
                .map(|(name, insts)| (name.clone(), instances_value(insts)))
                .collect();
            root.insert("service".into(), Value::Object(map));
        }
        self.parts = self.parts.union(add);
    }

    /// Brings the document to `snap` and `vars`, rebuilding only what changed: the services
    /// whose instances differ, the virtual hosts those instances serve (before or after), and
    /// `kv` or `vars` when they differ. Returns whether anything changed; when it did, the
    /// [`generation`](Self::generation) is new.
    pub fn update(&mut self, snap: Arc<Snapshot>, vars: &Vars) -> bool {
        let old = std::mem::replace(&mut self.snap, snap);
        let new = self.snap.clone();
        let mut doc = std::mem::take(self.ctx.data_mut());
        let Value::Object(root) = &mut doc else {
            unreachable!("the document is an object")
        };
        let mut changed = false;
        let mut routing_changed = self.generation == 0;
        if !Arc::ptr_eq(&old, &new) && old.services != new.services {
            routing_changed |= self.update_services(root, &old, &new);
            changed = true;
        }
        if old.kv != new.kv {
            root.insert("kv".into(), kv_value(&new.kv));
            changed = true;
        }
        if self.vars != *vars || self.generation == 0 {
            root.insert("vars".into(), Value::Object(vars_map(vars)));
            self.vars = vars.clone();
            self.births.vars = birth();
            changed = true;
            routing_changed = true;
        }
        if routing_changed {
            self.update_shared_routes(root);
        }
        *self.ctx.data_mut() = doc;
        if changed || self.generation == 0 {
            self.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// Serves `certs` from now on: the `vhosts` entries whose certificate changes are built
    /// again (new births, so no render reuses their old text) and top-level `tls` is
    /// replaced. Returns whether anything changed; when it did, the generation is new.
    pub fn set_certs(&mut self, certs: Arc<CertSet>) -> bool {
        if *self.certs == *certs {
            return false;
        }
        self.certs = certs;
        let index = Arc::make_mut(&mut self.vhosts);
        let Value::Object(root) = self.ctx.data_mut() else {
            unreachable!("the document is an object")
        };
        root.insert("tls".into(), tls_value(&self.certs));
        let mut list = match root.get_mut("vhosts") {
            Some(Value::Array(a)) if self.parts.vhosts => Some(a),
            _ => None,
        };
        for (k, (host, e)) in index.iter_mut().enumerate() {
            let cert = self.certs.cover(host).cloned();
            if cert != e.cert {
                e.cert = cert;
                e.birth = birth();
                if let Some(slot) = list.as_mut().and_then(|a| a.get_mut(k)) {
                    fill_vhost(slot, host, e);
                }
            }
        }
        self.births.vhosts = index.values().map(|e| e.birth).collect();
        self.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Rebuilds `paths` and `listeners` from [`Self::routing`].
    fn update_shared_routes(&mut self, root: &mut Map<String, Value>) {
        let mut warnings = Vec::new();
        let paths = routes::group_paths(
            self.routing
                .values()
                .flat_map(|s| s.paths.iter().map(|(i, r)| (i, r))),
            "the default host's",
            &mut warnings,
        );
        let asks = self
            .routing
            .iter()
            .filter(|(_, s)| !s.listens.is_empty())
            .map(|(name, s)| (name.clone(), s.listens.clone()))
            .collect();
        let policy = ListenPolicy::from_vars(&self.vars);
        let listeners = self.claims.assign(&asks, &policy, &mut warnings);
        self.shared_warnings = warnings;
        let paths = paths
            .iter()
            .map(|r| route_value(r, |t| t.push_str(&r.name()), None))
            .collect();
        root.insert("paths".into(), Value::Array(paths));
        let listeners = listeners.iter().map(listener_value).collect();
        root.insert("listeners".into(), Value::Array(listeners));
    }

    /// Every routing warning of the document: bad routing values, conflicts over a path and
    /// taken or refused ports. Sorted, without repeats.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut all: Vec<Warning> = self
            .routing
            .values()
            .flat_map(|s| s.warnings.iter())
            .chain(self.vhosts.values().flat_map(|e| e.warnings.iter()))
            .chain(&self.shared_warnings)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Returns whether the routing index changed.
    fn update_services(
        &mut self,
        root: &mut Map<String, Value>,
        old: &Snapshot,
        new: &Snapshot,
    ) -> bool {
        let mut routing_changed = false;
        let parts = self.parts;
        let index = Arc::make_mut(&mut self.vhosts);
        let mut old_list = take_array(root, "services");
        let mut old_map = match root.remove("service") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut list = Vec::with_capacity(if parts.services {
            new.services.len()
        } else {
            0
        });
        let old_births = std::mem::take(&mut self.births.services);
        let mut births = Vec::with_capacity(new.services.len());
        let mut map = Map::new();
        // Virtual hosts whose entry must be built again.
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        // Both snapshots are sorted by service name, and so is `old_list`: one merge walk.
        let mut olds = old.services.iter().enumerate().peekable();
        for (name, insts) in &new.services {
            while olds
                .next_if(|(_, (o, _))| o.as_str() < name.as_str())
                .is_some()
            {}
            let same = match olds.next_if(|(_, (o, _))| *o == name) {
                Some((k, (_, was))) if was == insts => Some(k),
                Some((_, (_, was))) => {
                    forget_vhosts(index, name, was, &mut dirty);
                    None
                }
                None => None,
            };
            if same.is_none() {
                let r = ServiceRouting::of(insts);
                let was = if r.is_empty() {
                    self.routing.remove(name)
                } else {
                    self.routing.insert(name.clone(), r.clone())
                };
                routing_changed |= was.unwrap_or_default() != r;
                for i in insts {
                    if let Some(v) = i.vhost() {
                        index
                            .entry(v.clone())
                            .or_default()
                            .services
                            .insert(name.clone());
                        dirty.insert(v);
                    }
                }
            }
            births.push(
                same.and_then(|k| old_births.get(k).copied())
                    .unwrap_or_else(birth),
            );
            if parts.services {
                let kept = same.and_then(|k| old_list.get_mut(k)).map(std::mem::take);
                list.push(kept.unwrap_or_else(|| service_value(name, insts)));
            }
            if parts.service {
                let kept = same.and_then(|_| old_map.remove(name.as_str()));
                map.insert(name.clone(), kept.unwrap_or_else(|| instances_value(insts)));
            }
        }
        self.births.services = births;
        if parts.services {
            root.insert("services".into(), Value::Array(list));
        }
        if parts.service {
            root.insert("service".into(), Value::Object(map));
        }
        // Services that are gone.
        for (name, was) in &old.services {
            if !new.services.contains_key(name) {
                forget_vhosts(index, name, was, &mut dirty);
                routing_changed |= self.routing.remove(name).is_some();
            }
        }
        for host in &dirty {
            if let Some(e) = index.get_mut(host) {
                e.birth = birth();
                e.instances = e
                    .services
                    .iter()
                    .filter_map(|s| new.services.get(s))
                    .flatten()
                    .filter(|i| i.vhost().as_deref() == Some(host.as_str()))
                    .cloned()
                    .collect();
                // Bad values were warned about with the service (`ServiceRouting`).
                let routed: Vec<(Arc<Instance>, Route)> = e
                    .instances
                    .iter()
                    .filter_map(|i| Some((i.clone(), routes::route(i).0.ok()?)))
                    .collect();
                e.cert = self.certs.cover(host).cloned();
                e.redirect = e.instances.iter().all(|i| routes::https_redirect(i));
                e.warnings.clear();
                e.routes = routes::group_paths(
                    routed.iter().map(|(i, r)| (i, r)),
                    &format!("virtual host {host}'s"),
                    &mut e.warnings,
                );
            }
        }
        self.births.vhosts = index.values().map(|e| e.birth).collect();
        if !parts.vhosts {
            return routing_changed;
        }
        let mut old_vhosts = take_array(root, "vhosts").into_iter().peekable();
        let mut vhosts = Vec::with_capacity(index.len());
        for (host, e) in index.iter() {
            // `old_vhosts` is sorted by host too.
            while old_vhosts
                .next_if(|v| v["host"].as_str().is_some_and(|h| h < host.as_str()))
                .is_some()
            {}
            let kept = old_vhosts.next_if(|v| v["host"].as_str() == Some(host.as_str()));
            match kept {
                Some(v) if !dirty.contains(host) => vhosts.push(v),
                _ => vhosts.push(vhost_value(host, e)),
            }
        }
        root.insert("vhosts".into(), Value::Array(vhosts));
        routing_changed
    }

    /// The document, as Handlebars renders it.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The document.
    pub fn value(&self) -> &Value {
        self.ctx.data()
    }

    /// The snapshot the document describes.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Changes whenever the document does; unique across documents.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When each entry of `services` and `vhosts`, and `vars`, were built.
    pub fn births(&self) -> &Births {
        &self.births
    }

    /// `services` and `vhosts` to read one entry at a time, built in the document or not.
    pub fn lists(&self) -> Lists {
        Lists {
            snap: self.snap.clone(),
            vhosts: self.vhosts.clone(),
            births: self.births.clone(),
            vars: self.value()["vars"].clone(),
        }
    }
}

/// Drops `service`'s old instances `was` from the virtual-host index, marking their virtual
/// hosts for a rebuild.
fn forget_vhosts(
    index: &mut VhostIndex,
    service: &str,
    was: &[Arc<Instance>],
    dirty: &mut BTreeSet<String>,
) {
    for i in was {
        let Some(v) = i.vhost() else { continue };
        if let Some(e) = index.get_mut(&v) {
            e.services.remove(service);
            if e.services.is_empty() {
                index.remove(&v);
            }
        }
        dirty.insert(v);
    }
}

/// One of the large lists of the document that a render may read one entry at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum List {
    /// `services`.
    Services,
    /// `vhosts`.
    Vhosts,
}

impl List {
    /// Both.
    pub const ALL: [List; 2] = [List::Services, List::Vhosts];

    /// Its key in the document.
    pub fn key(self) -> &'static str {
        match self {
            List::Services => "services",
            List::Vhosts => "vhosts",
        }
    }

    /// The list under `key`.
    pub fn from_key(key: &str) -> Option<List> {
        List::ALL.into_iter().find(|l| l.key() == key)
    }
}

/// `services` and `vhosts` of one document, entry by entry, for a render that reads them
/// without the document holding them (see `super::stream`): at 10,000 instances the lists
/// are most of the document's memory, and a template that only loops over them needs one
/// entry at a time. Holds what the entries are built from (shared, not copied) and their
/// births, so an entry is built only when a render cannot reuse its text.
#[derive(Clone)]
pub struct Lists {
    snap: Arc<Snapshot>,
    vhosts: Arc<VhostIndex>,
    births: Births,
    vars: Value,
}

/// An entry of a [`List`], not built yet.
pub struct Entry<'a> {
    /// Its birth (see [`Births`]).
    pub birth: u64,
    source: Source<'a>,
}

enum Source<'a> {
    Service(&'a str, &'a [Arc<Instance>]),
    Vhost(&'a str, &'a VhostEntry),
}

impl Entry<'_> {
    /// The entry, as the document would hold it.
    pub fn value(&self) -> Value {
        let mut v = Value::Null;
        self.fill(&mut v);
        v
    }

    /// Makes `v` the entry, reusing the strings, lists and objects it holds where they have
    /// the same place (as the previous entry of the same list has).
    pub fn fill(&self, v: &mut Value) {
        match self.source {
            Source::Service(name, insts) => fill_service(v, name, insts),
            Source::Vhost(host, e) => fill_vhost(v, host, e),
        }
    }
}

impl Lists {
    /// The births of the document's entries and `vars`.
    pub fn births(&self) -> &Births {
        &self.births
    }

    /// `vars`, as the document holds it.
    pub fn vars(&self) -> &Value {
        &self.vars
    }

    /// The entries of `list`, in the document's order.
    pub fn entries(&self, list: List) -> Vec<Entry<'_>> {
        match list {
            List::Services => self
                .snap
                .services
                .iter()
                .zip(&self.births.services)
                .map(|((name, insts), &birth)| Entry {
                    birth,
                    source: Source::Service(name, insts),
                })
                .collect(),
            List::Vhosts => self
                .vhosts
                .iter()
                .map(|(host, e)| Entry {
                    birth: e.birth,
                    source: Source::Vhost(host, e),
                })
                .collect(),
        }
    }

    /// What `find_service` gives for `services`, `name` and `tag`: the service called `name`,
    /// else the first (by name) tagged `tag`, among those with instances; `null` if none.
    pub fn find_service(&self, name: &str, tag: &str) -> Value {
        let services = &self.snap.services;
        let by_name = services
            .get_key_value(name)
            .filter(|(_, insts)| !name.is_empty() && !insts.is_empty());
        let by_tag = || {
            services.iter().find(|(_, insts)| {
                !tag.is_empty() && insts.iter().any(|i| i.tags.iter().any(|t| t == tag))
            })
        };
        by_name
            .or_else(by_tag)
            .map_or(Value::Null, |(name, insts)| service_value(name, insts))
    }
}

/// The document for `snap` and `vars`, built in full (for one-off renders and tests).
pub fn template_data(snap: &Snapshot, vars: &Vars) -> Value {
    TemplateData::build(Arc::new(snap.clone()), vars)
        .ctx
        .data()
        .clone()
}

fn take_array(root: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match root.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

// Entries are written by `fill_*` functions that make a value the entry while reusing the
// allocations it already holds where the shape is the same: a streamed loop (see
// `super::stream`) builds every entry it cannot reuse into the previous one, so a render
// with nothing to reuse does not allocate and free a whole document's worth of small
// strings and B-tree nodes. A fresh entry is a fill of `null`.

/// The keys of an instance object, in the order a `Map` keeps them.
const INSTANCE_KEYS: [&str; 10] = [
    "address", "health", "id", "meta", "name", "node", "port", "tags", "vhost", "weight",
];

/// `v` made an object with exactly the keys `keys`, which must be sorted and distinct (the
/// order a `Map` keeps them in). The entries whose key stays are kept, values and all (two
/// instances' meta share most keys), and the missing keys added with `null`. Returns the
/// values in key order, so a fill writes each by position instead of looking its key up.
fn object<'a, 'k>(
    v: &'a mut Value,
    keys: impl Iterator<Item = &'k str> + Clone,
) -> serde_json::map::ValuesMut<'a> {
    debug_assert!(
        keys.clone().zip(keys.clone().skip(1)).all(|(a, b)| a < b),
        "keys sorted and distinct"
    );
    let same = matches!(&*v, Value::Object(m) if m.keys().map(String::as_str).eq(keys.clone()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    let Value::Object(m) = v else {
        unreachable!("made an object above")
    };
    if !same {
        m.retain(|k, _| keys.clone().any(|key| key == k));
        for key in keys.clone() {
            if !m.contains_key(key) {
                m.insert(key.to_owned(), Value::Null);
            }
        }
        // A `Map` that keeps insertion order (serde_json's `preserve_order`, which any
        // dependency may turn on) has the added keys last: the values must be in key order.
        if !m.keys().map(String::as_str).eq(keys.clone()) {
            let mut old = std::mem::take(m);
            *m = keys
                .map(|k| (k.to_owned(), old.remove(k).unwrap_or(Value::Null)))
                .collect();
        }
    }
    m.values_mut()
}

/// [`object`] with a fixed set of keys, its values as an array to destructure.
fn fields<'a, const N: usize>(v: &'a mut Value, keys: &[&str; N]) -> [&'a mut Value; N] {
    let mut values = object(v, keys.iter().copied());
    std::array::from_fn(|_| values.next().expect("one value per key"))
}

/// `v`, an array, made the list of `items`, each an entry written by `fill`.
fn fill_array<T>(
    v: &mut Value,
    items: impl ExactSizeIterator<Item = T>,
    fill: impl Fn(&mut Value, T),
) {
    if !v.is_array() {
        *v = Value::Array(Vec::with_capacity(items.len()));
    }
    let Value::Array(a) = v else {
        unreachable!("made an array above")
    };
    a.truncate(items.len());
    for (k, item) in items.enumerate() {
        match a.get_mut(k) {
            Some(slot) => fill(slot, item),
            None => {
                let mut slot = Value::Null;
                fill(&mut slot, item);
                a.push(slot);
            }
        }
    }
}

/// Makes `v` the string `write` writes, into the string already there if any.
fn fill_with(v: &mut Value, write: impl FnOnce(&mut String)) {
    match v {
        Value::String(t) => t.clear(),
        _ => *v = Value::String(String::new()),
    }
    let Value::String(t) = v else {
        unreachable!("made a string above")
    };
    write(t);
}

/// Makes `v` the string `s`, in the string already there if any.
fn fill_string(v: &mut Value, s: &str) {
    fill_with(v, |t| t.push_str(s));
}

/// An instance object. `vhost` is the instance's virtual host when the caller knows it (a
/// `vhosts` entry's instances all serve its host); otherwise it is worked out from the meta.
fn fill_instance(v: &mut Value, i: &Instance, vhost: Option<&str>) {
    let [address, health, id, meta, name, node, port, tags, vh, weight] = fields(v, &INSTANCE_KEYS);
    fill_string(address, &i.address);
    fill_string(health, &i.health);
    fill_string(id, &i.id);
    let keys = i.meta.iter().map(|(k, _)| k.as_str());
    for (slot, (_, val)) in object(meta, keys).zip(i.meta.iter()) {
        fill_string(slot, val);
    }
    fill_string(name, &i.name);
    fill_string(node, &i.node);
    *port = Value::from(i.port);
    fill_array(tags, i.tags.iter(), |v, t| fill_string(v, t));
    match vhost {
        Some(h) => fill_string(vh, h),
        None => fill_string(vh, i.vhost().as_deref().unwrap_or_default()),
    }
    *weight = Value::from(routes::weight(&i.meta));
}

fn instance_value(i: &Instance) -> Value {
    let mut v = Value::Null;
    fill_instance(&mut v, i, None);
    v
}

fn instances_value(insts: &[Arc<Instance>]) -> Value {
    Value::Array(insts.iter().map(|i| instance_value(i)).collect())
}

/// A `services` entry: `{name, tags, proto, instances}`, `tags` the union of the instances'
/// tags, `proto` that of its first instance with valid routing values (`http` if none).
fn fill_service(v: &mut Value, name: &str, insts: &[Arc<Instance>]) {
    let tags: BTreeSet<&str> = insts
        .iter()
        .flat_map(|i| i.tags.iter().map(String::as_str))
        .collect();
    let proto = insts
        .iter()
        .find_map(|i| routes::route(i).0.ok())
        .map_or(Proto::Http, |r| r.proto);
    let [instances, name_v, proto_v, tags_v] = fields(v, &["instances", "name", "proto", "tags"]);
    fill_string(name_v, name);
    fill_string(proto_v, proto.as_str());
    fill_array(tags_v, tags.into_iter(), fill_string);
    fill_array(instances, insts.iter(), |v, i| fill_instance(v, i, None));
}

fn service_value(name: &str, insts: &[Arc<Instance>]) -> Value {
    let mut v = Value::Null;
    fill_service(&mut v, name, insts);
    v
}

/// A `vhosts` entry: `{host, name, instances, routes}`, the instances serving `host` and the
/// path routes they form. A route's name is the host's name for `/`, else the host's name,
/// `__` and the path's (a host name never holds `__`, so names stay distinct).
fn fill_vhost(v: &mut Value, host: &str, e: &VhostEntry) {
    let [host_v, redirect, instances, name, routes_v, tls, tls_name, tls_pem, tls_serial] = fields(
        v,
        &[
            "host",
            "https_redirect",
            "instances",
            "name",
            "routes",
            "tls",
            "tls_name",
            "tls_pem",
            "tls_serial",
        ],
    );
    fill_string(host_v, host);
    *tls = Value::Bool(e.cert.is_some());
    *redirect = Value::Bool(e.cert.is_some() && e.redirect);
    match &e.cert {
        Some(p) => {
            fill_string(tls_name, &p.name);
            fill_string(tls_pem, &p.pem.to_string_lossy());
            fill_string(tls_serial, &p.serial);
        }
        None => {
            *tls_name = Value::Null;
            *tls_pem = Value::Null;
            *tls_serial = Value::Null;
        }
    }
    fill_with(name, |t| push_safe_token(host, t));
    fill_array(instances, e.instances.iter(), |v, i| {
        fill_instance(v, i, Some(host))
    });
    fill_array(routes_v, e.routes.iter(), |v, r| {
        fill_route(
            v,
            r,
            |t| {
                push_safe_token(host, t);
                if r.path != "/" {
                    t.push_str("__");
                    t.push_str(&r.name());
                }
            },
            Some(host),
        )
    });
}

fn vhost_value(host: &str, e: &VhostEntry) -> Value {
    let mut v = Value::Null;
    fill_vhost(&mut v, host, e);
    v
}

/// A route: `{host, path, strip, proto, name, length, instances}`; `host` is the virtual host
/// (empty on the default host), `length` the path's length in bytes (a proxy strips the
/// prefix by offset), `name` what `name` writes.
fn fill_route(v: &mut Value, r: &PathRoute, name: impl FnOnce(&mut String), host: Option<&str>) {
    let [host_v, instances, length, name_v, path, proto, strip] = fields(
        v,
        &[
            "host",
            "instances",
            "length",
            "name",
            "path",
            "proto",
            "strip",
        ],
    );
    fill_string(host_v, host.unwrap_or_default());
    fill_array(instances, r.instances.iter(), |v, i| {
        fill_instance(v, i, host)
    });
    *length = Value::from(r.path.len());
    fill_with(name_v, name);
    fill_string(path, &r.path);
    fill_string(proto, r.proto.as_str());
    *strip = Value::Bool(r.strip);
}

fn route_value(r: &PathRoute, name: impl FnOnce(&mut String), host: Option<&str>) -> Value {
    let mut v = Value::Null;
    fill_route(&mut v, r, name, host);
    v
}

/// A listener: `{listen, proto, name, service, instances}`, `name` `<proto>_<port>`.
fn listener_value(l: &Listener) -> Value {
    let mut m = Map::new();
    m.insert("instances".into(), instances_value(&l.instances));
    m.insert("listen".into(), Value::from(l.port));
    m.insert(
        "name".into(),
        Value::String(format!("{}_{}", l.proto, l.port)),
    );
    m.insert("proto".into(), string(l.proto.as_str()));
    m.insert("service".into(), string(&l.service));
    Value::Object(m)
}

/// Top-level `tls`: `{crt_list, certs: [{name, pem, serial}]}` (`crt_list` null and `certs` empty
/// when no host has a certificate).
fn tls_value(certs: &CertSet) -> Value {
    let list = certs
        .pairs
        .values()
        .map(|p| {
            let mut m = Map::new();
            m.insert("name".into(), string(&p.name));
            m.insert("pem".into(), string(&p.pem.to_string_lossy()));
            m.insert("serial".into(), string(&p.serial));
            Value::Object(m)
        })
        .collect();
    let mut m = Map::new();
    m.insert("certs".into(), Value::Array(list));
    m.insert(
        "crt_list".into(),
        certs
            .crt_list
            .as_ref()
            .map_or(Value::Null, |p| string(&p.to_string_lossy())),
    );
    Value::Object(m)
}

fn kv_value(kv: &BTreeMap<String, String>) -> Value {
    Value::Object(kv.iter().map(|(k, v)| (k.clone(), string(v))).collect())
}

fn vars_map(vars: &Vars) -> Map<String, Value> {
    vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::tests::inst;
    use serde_json::json;

    #[test]
    fn data_layout() {
        let mut a = inst("web", "a", "10.0.0.1", 80);
        a.tags = vec!["x".into(), "backend".into()];
        a.meta.insert("vhost".into(), "w.local".into());
        let mut b = inst("web", "b", "10.0.0.2", 81);
        b.tags = vec!["backend".into()];
        let s = Snapshot::build(vec![a.clone(), b], [("k".into(), "v".into())].into(), &[]);
        let d = template_data(&s, &[("listen".into(), json!(80))].into());
        assert_eq!(d["services"][0]["name"], "web");
        assert_eq!(d["services"][0]["tags"], json!(["backend", "x"]));
        assert_eq!(d["services"][0]["instances"][1]["port"], 81);
        assert_eq!(d["service"]["web"][0]["vhost"], "w.local");
        assert_eq!(d["service"]["web"][1]["vhost"], "");
        assert_eq!(d["vhosts"][0]["host"], "w.local");
        assert_eq!(d["vhosts"][0]["name"], "w.local");
        assert_eq!(d["vhosts"][0]["instances"][0]["id"], "a");
        assert_eq!(d["kv"]["k"], "v");
        assert_eq!(d["vars"]["listen"], 80);
        assert_eq!(d["services"][0]["proto"], "http");
        assert_eq!(d["vhosts"][0]["routes"][0]["path"], "/");
        assert_eq!(d["vhosts"][0]["routes"][0]["name"], "w.local");
        assert_eq!(d["paths"], json!([]));
        assert_eq!(d["listeners"], json!([]));
        // An instance is its model's fields plus `vhost` and `weight`, nothing else.
        let mut want = serde_json::to_value(&a).unwrap();
        want["vhost"] = json!("w.local");
        want["weight"] = json!(1);
        assert_eq!(d["service"]["web"][0], want);
    }

    #[test]
    fn routes_paths_and_listeners() {
        let with = |name: &str, id: &str, meta: &[(&str, &str)]| {
            let mut i = inst(name, id, "10.0.0.1", 80);
            for (k, v) in meta {
                i.meta.insert(k.to_string(), v.to_string());
            }
            i
        };
        let s = Snapshot::build(
            vec![
                with("site", "s1", &[("vhost", "a.test")]),
                with(
                    "api",
                    "a1",
                    &[
                        ("vhost", "a.test"),
                        ("path", "/api/"),
                        ("path_strip", "true"),
                    ],
                ),
                with(
                    "api",
                    "a2",
                    &[("vhost", "a.test"), ("path", "/api"), ("weight", "0")],
                ),
                with("rpc", "r1", &[("proto", "grpc"), ("path", "/pkg.Echo")]),
                with("pg", "p1", &[("proto", "tcp"), ("listen", "5432")]),
                with("pg2", "q1", &[("proto", "tcp"), ("listen", "5432")]),
                with("bad", "b1", &[("path", "/a;b")]),
            ],
            BTreeMap::new(),
            &[],
        );
        let mut data = TemplateData::build(Arc::new(s), &Vars::new());
        let d = data.value().clone();
        let routes = &d["vhosts"][0]["routes"];
        assert_eq!(routes[0]["path"], "/api");
        assert_eq!(routes[0]["strip"], true);
        assert_eq!(routes[0]["length"], 4);
        assert_eq!(
            routes[0]["instances"].as_array().unwrap().len(),
            1,
            "a2 conflicts"
        );
        assert_eq!(routes[1]["path"], "/");
        assert_eq!(routes[1]["instances"][0]["id"], "s1");
        assert!(routes[0]["name"]
            .as_str()
            .unwrap()
            .starts_with("a.test__api"));
        assert_eq!(d["paths"][0]["path"], "/pkg.Echo");
        assert_eq!(d["paths"][0]["proto"], "grpc");
        assert_eq!(d["services"][4]["proto"], "grpc");
        assert_eq!(d["services"][2]["proto"], "tcp");
        assert_eq!(d["listeners"][0]["name"], "tcp_5432");
        assert_eq!(d["listeners"][0]["service"], "pg");
        assert_eq!(d["service"]["api"][1]["weight"], 0);
        let reasons: Vec<(String, &str)> = data
            .warnings()
            .iter()
            .map(|w| (w.service.clone(), w.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("api".to_string(), "conflict"),
                ("bad".to_string(), "bad_path"),
                ("pg2".to_string(), "listen_taken"),
            ]
        );
        // The floor comes from vars: 5432 below it is refused.
        data.update(
            data.snapshot().clone(),
            &[("listen_floor".into(), json!(6000))].into(),
        );
        assert_eq!(data.value()["listeners"], json!([]));
        assert!(data.warnings().iter().any(|w| w.reason == "listen_refused"));
    }

    /// A small deterministic generator (no dependency for the tests).
    pub(crate) struct Lcg(pub(crate) u64);
    impl Lcg {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// A random instance among a few services, IDs and virtual hosts, so that successive
    /// snapshots share, change, add and remove services and move instances between hosts.
    /// Adds, replaces or removes one to four random instances of `current` (by name and ID).
    pub(crate) fn change_instances(
        r: &mut Lcg,
        current: &mut BTreeMap<(String, String), Instance>,
    ) {
        for _ in 0..=r.below(3) {
            let i = random_instance(r);
            let key = (i.name.clone(), i.id.clone());
            if r.below(4) == 0 {
                current.remove(&key);
            } else {
                current.insert(key, i);
            }
        }
    }

    pub(crate) fn random_instance(r: &mut Lcg) -> Instance {
        let svc = format!("s{}", r.below(6));
        let mut i = inst(
            &svc,
            &format!("i{}", r.below(12)),
            "10.0.0.1",
            80 + r.below(3) as u16,
        );
        match r.below(4) {
            0 => {
                i.meta
                    .insert("vhost".into(), format!("h{}.test", r.below(3)));
            }
            1 => {
                i.meta.insert("hostname".into(), format!("h{}", r.below(3)));
                i.meta.insert("domain".into(), "test".into());
            }
            _ => {}
        }
        if r.below(2) == 0 {
            i.tags.push(format!("t{}", r.below(3)));
        }
        // A key shared by some instances, sorting between `domain` and `hostname`: an entry
        // filled into another keeps it while keys are added on both sides of it.
        if r.below(2) == 0 {
            i.meta.insert("env".into(), format!("e{}", r.below(2)));
        }
        // Routing values, some bad. Each service asks for a port of its own: which service
        // holds a shared port depends on history, which a full build does not have.
        match r.below(8) {
            0 => {
                let p = ["/api", "/api/v1", "/x;y"][r.below(3) as usize];
                i.meta.insert("path".into(), p.into());
            }
            1 => {
                i.meta.insert("proto".into(), "tcp".into());
                i.meta.insert(
                    "listen".into(),
                    format!("{}", 5000 + i.name[1..].parse::<u16>().unwrap()),
                );
            }
            2 => {
                i.meta.insert("weight".into(), format!("{}", r.below(300)));
            }
            3 => {
                i.meta.insert("proto".into(), "h2c".into());
                i.meta.insert("path".into(), "/api".into());
            }
            _ => {}
        }
        i
    }

    #[test]
    fn updates_give_the_document_a_full_build_gives() {
        let mut r = Lcg(7);
        let vars_a: Vars = [("listen".into(), json!(80))].into();
        let vars_b: Vars = [("listen".into(), json!(81))].into();
        let mut d = TemplateData::build(Arc::new(Snapshot::default()), &vars_a);
        // Another document with only some parts, completed half way through.
        let some = Parts {
            service: false,
            ..Parts::ALL
        };
        let mut partial = TemplateData::with_parts(Arc::new(Snapshot::default()), &vars_a, some);
        // And one with no list at all, read entry by entry.
        let mut bare =
            TemplateData::with_parts(Arc::new(Snapshot::default()), &vars_a, Parts::default());
        let mut current: BTreeMap<(String, String), Instance> = BTreeMap::new();
        let mut generations = BTreeSet::from([d.generation()]);
        let mut born: BTreeMap<u64, Value> = BTreeMap::new();
        for step in 0..400 {
            // Change a few instances, sometimes kv or vars.
            change_instances(&mut r, &mut current);
            let kv: BTreeMap<String, String> = if r.below(5) == 0 {
                [("k".into(), format!("{}", r.below(2)))].into()
            } else {
                BTreeMap::new()
            };
            let vars = if r.below(7) == 0 { &vars_b } else { &vars_a };
            let snap = Arc::new(Snapshot::build(current.values().cloned(), kv, &[]));
            let before = d.value().clone();
            let changed = d.update(snap.clone(), vars);
            let full = TemplateData::build(snap, vars);
            assert_eq!(d.value(), full.value(), "step {step}");
            assert_eq!(changed, before != *d.value(), "step {step}");
            if changed {
                assert!(
                    generations.insert(d.generation()),
                    "step {step}: generation reused"
                );
            }
            // A birth names one value for ever: what a render may reuse by birth.
            for (part, births) in [
                ("services", &d.births().services),
                ("vhosts", &d.births().vhosts),
            ] {
                let list = d.value()[part].as_array().unwrap();
                assert_eq!(births.len(), list.len(), "step {step}: {part}");
                for (b, v) in births.iter().zip(list) {
                    let first = born.entry(*b).or_insert_with(|| v.clone());
                    assert_eq!(first, v, "step {step}: {part} birth {b} reused");
                }
            }
            let v = &d.value()["vars"];
            assert_eq!(born.entry(d.births().vars).or_insert_with(|| v.clone()), v);
            bare.update(d.snapshot().clone(), vars);
            let lists = bare.lists();
            for list in List::ALL {
                let entries = lists.entries(list);
                let values: Vec<Value> = entries.iter().map(Entry::value).collect();
                assert_eq!(
                    Some(&values),
                    full.value()[list.key()].as_array(),
                    "step {step}: {list:?}"
                );
                // Filled into another entry's value (as a streamed loop does), of this list
                // or the other: the same value.
                let other = lists.entries(if list == List::Services {
                    List::Vhosts
                } else {
                    List::Services
                });
                let first_other = other.first().map(Entry::value);
                let fillers = values.iter().rev().chain(first_other.iter());
                for (e, mut v) in entries.iter().zip(fillers.cloned()) {
                    e.fill(&mut v);
                    assert_eq!(v, e.value(), "step {step}: {list:?} filled");
                }
                for (e, v) in entries.iter().zip(&values) {
                    let first = born.entry(e.birth).or_insert_with(|| v.clone());
                    assert_eq!(first, v, "step {step}: {list:?} birth {} reused", e.birth);
                }
            }
            // A `vhosts` entry's instances are written with its host as their `vhost`
            // rather than working it out again: the same objects as in `services`.
            let by_id: BTreeMap<(&str, &str), &Value> = full.value()["services"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["instances"].as_array().unwrap())
                .map(|i| ((i["name"].as_str().unwrap(), i["id"].as_str().unwrap()), i))
                .collect();
            for v in full.value()["vhosts"].as_array().unwrap() {
                for i in v["instances"].as_array().unwrap() {
                    let key = (i["name"].as_str().unwrap(), i["id"].as_str().unwrap());
                    assert_eq!(Some(&i), by_id.get(&key), "step {step}");
                    assert_eq!(i["vhost"], v["host"], "step {step}");
                }
            }
            assert_eq!(lists.vars(), &full.value()["vars"]);
            assert!(bare.value().get("services").is_none() && bare.value().get("vhosts").is_none());
            for name in ["s0", "s3", "nothing", ""] {
                for tag in ["t0", "t2", "backend", ""] {
                    let services = full.value()["services"].as_array().unwrap();
                    assert_eq!(
                        lists.find_service(name, tag),
                        crate::render::helpers::pick_service(services, name, tag),
                        "step {step}: {name} {tag}"
                    );
                }
            }
            partial.update(d.snapshot().clone(), vars);
            let mut want = full.value().clone();
            if !partial.parts().service {
                want.as_object_mut().unwrap().remove("service");
            }
            assert_eq!(partial.value(), &want, "step {step}");
            if step == 200 {
                let g = partial.generation();
                partial.ensure(Parts::ALL);
                assert_eq!(
                    partial.generation(),
                    g,
                    "adding a part is no new generation"
                );
                assert_eq!(partial.value(), full.value());
            }
        }
    }

    #[test]
    fn unchanged_snapshots_keep_the_generation() {
        let s = Snapshot::build(vec![inst("web", "a", "10.0.0.1", 80)], BTreeMap::new(), &[]);
        let vars = Vars::new();
        let mut d = TemplateData::build(Arc::new(s.clone()), &vars);
        let g = d.generation();
        // An equal snapshot (another allocation) is no change.
        assert!(!d.update(Arc::new(s), &vars));
        assert_eq!(d.generation(), g);
        let other = Snapshot::build(vec![inst("web", "a", "10.0.0.2", 80)], BTreeMap::new(), &[]);
        assert!(d.update(Arc::new(other), &vars));
        assert_ne!(d.generation(), g);
    }
}
