//! Rendering one template source against template data.
//!
//! Handlebars runs in strict mode so a missing key or a misspelt field is an error naming it
//! (instead of an empty string that produces a config with a hole), and with HTML escaping off:
//! `&amp;` in a proxy config is a bug, and the config-safe helpers do the real escaping.
//!
//! ## Bounds
//!
//! A template is a program run against data from anyone who can write to the store, and
//! Handlebars bounds nothing: a partial that includes itself
//! (`{{#*inline "a"}}x{{> a}}{{/inline}}{{> a}}`) recurses until the stack or memory runs out,
//! copying its context at every level. So every render runs within [`Limits`], and past one it
//! fails with one line naming the template and the bound: the caller keeps the previous file
//! and goes on with the other templates.
//! - **Depth** (`max_render_depth`): each block, subexpression or partial open at once is a
//!   frame of the render's stack. A template's own nesting is measured as soon as it is parsed
//!   ([`nesting`], without recursion) and a template deeper than the bound is refused before
//!   anything walks it by recursion. Nesting through partials is known only while
//!   rendering: at parse, every partial is put inside a block of the [`NEST`] helper, which adds
//!   the partial's place (the blocks around it, plus one) to the render's depth while the
//!   partial renders and refuses to go past the bound. A render thus nests at most the bound at
//!   its innermost partial, plus that partial's own blocks (themselves within the bound): never
//!   more than twice the bound, which fits [`RENDER_STACK`], the stack of the thread the daemon
//!   renders on, up to [`Limits::DEPTH_CEILING`]. Templates without partials are left as they
//!   are (their loops stream and reuse: `stream`, `each`).
//! - **Output** (`max_render_output`): every byte the render holds counts against one budget:
//!   what is written to the output; loop iterations rendered aside to be kept
//!   (`each`; credited back when copied into the output, so they count once); the
//!   bodies of partial blocks, which Handlebars renders into a buffer of its own (they count
//!   there and again where `{{> @partial-block}}` writes them); the text helpers return
//!   (`concat` of `concat` doubles at each level); and, while a partial renders, the copy of
//!   its context Handlebars makes for it (a recursion at the top level copies the whole
//!   document at each level).
//! - **Time** (`max_render_time`) and the stop signal: looked at every [`POLL`] writes, at
//!   every loop iteration and at every partial, so a loop that writes nothing (an `each` over
//!   every service inside another) ends too, and a stop signal ends a render within
//!   milliseconds.
//!
//! The accounting of the render under way is a thread-local: a render runs on one thread from
//! start to end and every helper is called on it, so a write costs a thread-local access, not
//! a lock.

pub mod data;
mod each;
mod helpers;
mod stream;

use crate::model::Snapshot;
use data::{Parts, TemplateData, Vars};
use each::Memo;
use handlebars::template::{HelperTemplateBuilder, Parameter, Template, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, Path, PathSeg, RenderContext,
    RenderErrorReason, Renderable,
};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// How far one render may go (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Blocks, subexpressions and partials open at once, within a template and across the
    /// partials it includes.
    pub max_depth: usize,
    /// Bytes a render may hold: its output and what it builds on the way.
    pub max_output: usize,
    /// How long a render may take.
    pub max_time: Duration,
}

impl Limits {
    /// Deep enough for any template written by hand (the shipped ones nest 4 deep), shallow
    /// enough that the deepest render it allows fits a 2 MiB thread stack (a test thread's)
    /// in a debug build.
    pub const DEFAULT_MAX_DEPTH: usize = 64;
    /// The largest `max_depth` confd takes: the deepest render it allows fits
    /// [`RENDER_STACK`] in a debug build, with room to spare (a unit test renders it).
    pub const DEPTH_CEILING: usize = 512;
    /// The shipped templates write about 110 (nginx) and 160 (HAProxy) bytes per instance
    /// (the bench at 100,000 instances in 10,000 services: 10.2 and 15.2 MiB, and a render
    /// holds 1.003 times its output at most): 256 MiB is 17 times HAProxy's at 100,000.
    pub const DEFAULT_MAX_OUTPUT: usize = 256 << 20;
    /// A render of the shipped templates at 100,000 instances that reuses nothing takes
    /// 0.5 s (nginx) and 0.7 s (HAProxy) of CPU in a release build.
    pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(60);
}

/// The stack of the thread the daemon renders on (see `runner`): the deepest render
/// [`Limits::DEPTH_CEILING`] allows takes about half of it in a debug build, a quarter in a
/// release build. Only the pages a render touches are ever allocated.
pub const RENDER_STACK: usize = 32 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: Limits::DEFAULT_MAX_DEPTH,
            max_output: Limits::DEFAULT_MAX_OUTPUT,
            max_time: Limits::DEFAULT_MAX_TIME,
        }
    }
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
        hb.register_helper(NEST, Box::new(Nest));
        hb.register_helper(COUNTED, Box::new(Counted));
        Renderer {
            hb,
            parsed: HashMap::new(),
            renders: 0,
            data: None,
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
        match &mut self.data {
            Some(d) => {
                d.update(snap, vars);
            }
            // Parts are added as templates that read them are rendered.
            None => self.data = Some(TemplateData::with_parts(snap, vars, Parts::default())),
        }
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
        let nesting = nesting(
            &self
                .hb
                .get_template(name)
                .expect("registered above")
                .elements,
        );
        if nesting > max_depth {
            self.hb.unregister_template(name);
            return Err(RenderError::Limit {
                template: name.to_string(),
                bound: Breach::Depth(max_depth).to_string(),
            });
        }
        // Lists the template reads one entry at a time stay out of the document.
        let mut t = self
            .hb
            .get_template(name)
            .expect("registered above")
            .clone();
        let streams = stream::analyse(&t);
        let reads = reads(&t).without(&streams.lists);
        let mut rewritten = !streams.lists.is_empty();
        if rewritten {
            stream::rewrite(&mut t, &streams);
        }
        rewritten |= nest_partials(&mut t);
        if rewritten {
            self.hb.register_template(name, t);
        }
        let t = self.hb.get_template(name).expect("registered above");
        self.memo.parsed(name, t);
        self.parsed.insert(
            name.to_string(),
            Parsed {
                source: source.to_string(),
                reads,
                nesting,
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

/// Which bound a render went past; displayed as the reason its error gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breach {
    /// Nesting past `max_depth`.
    Depth(usize),
    /// Bytes held past `max_output`, by what took the last of them.
    Output(usize, Held),
    /// Time past `max_time`.
    Time(Duration),
    /// Stopped from outside.
    Stopped,
}

/// What holds the bytes of a render (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Output,
    HelperText,
    PartialContext,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breach::Depth(max) => write!(
                f,
                "blocks and partials nest deeper than max_render_depth ({max}): a partial that includes itself?"
            ),
            Breach::Output(max, by) => {
                let by = match by {
                    Held::Output => "output",
                    Held::HelperText => "output with the text its helpers made",
                    Held::PartialContext => "output with the contexts its partials copy",
                };
                write!(f, "{by} passed max_render_output ({max} bytes)")
            }
            Breach::Time(max) => write!(f, "render took longer than max_render_time ({max:?})"),
            Breach::Stopped => f.write_str("render stopped"),
        }
    }
}

/// Writes, loop iterations and partials between two looks at the clock and the stop signal:
/// a few microseconds of rendering.
pub const POLL: u32 = 256;

/// The accounting of the render under way (see the module doc).
struct Budget {
    limits: Limits,
    deadline: Instant,
    stop: Option<Shutdown>,
    /// Bytes held ([`Held`]).
    held: usize,
    /// Levels open through [`NEST`].
    depth: usize,
    /// Steps since the render started, for [`POLL`].
    steps: u32,
    /// The first bound passed: every later step fails with it too.
    breach: Option<Breach>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Budget>> = const { RefCell::new(None) };
}

impl Budget {
    /// One step of the render: fails once a bound was passed, and every [`POLL`] steps looks
    /// at the stop signal and the clock.
    fn step(&mut self) -> Result<(), Breach> {
        if let Some(b) = self.breach {
            return Err(b);
        }
        self.steps = self.steps.wrapping_add(1);
        if self.steps % POLL == 0 {
            if self.stop.as_ref().is_some_and(Shutdown::is_cancelled) {
                return self.fail(Breach::Stopped);
            }
            if Instant::now() >= self.deadline {
                return self.fail(Breach::Time(self.limits.max_time));
            }
        }
        Ok(())
    }

    fn fail(&mut self, b: Breach) -> Result<(), Breach> {
        self.breach = Some(b);
        Err(b)
    }

    /// `n` more bytes held by `by`.
    fn hold(&mut self, n: usize, by: Held) -> Result<(), Breach> {
        self.step()?;
        match self.held.checked_add(n) {
            Some(h) if h <= self.limits.max_output => {
                self.held = h;
                Ok(())
            }
            _ => self.fail(Breach::Output(self.limits.max_output, by)),
        }
    }
}

/// Runs `f` on the budget of the render under way; without one (a template rendered by plain
/// Handlebars, as some tests do), nothing is counted.
fn with_budget(f: impl FnOnce(&mut Budget) -> Result<(), Breach>) -> Result<(), Breach> {
    ACTIVE.with_borrow_mut(|b| b.as_mut().map_or(Ok(()), f))
}

/// The render under way on this thread: its budget is dropped with it, even on a panic.
struct Active;

impl Active {
    fn start(limits: Limits, stop: Option<Shutdown>) -> Active {
        let budget = Budget {
            limits,
            deadline: Instant::now() + limits.max_time,
            stop,
            held: 0,
            depth: 0,
            steps: 0,
            breach: None,
        };
        ACTIVE.with_borrow_mut(|b| *b = Some(budget));
        Active
    }

    /// The bound the render passed, if any.
    fn finish(self) -> Option<Breach> {
        ACTIVE.with_borrow_mut(|b| b.take()).and_then(|b| b.breach)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with_borrow_mut(|b| *b = None);
    }
}

fn io_error(b: Breach) -> std::io::Error {
    std::io::Error::other(b.to_string())
}

fn hb_error(b: Breach) -> handlebars::RenderError {
    RenderErrorReason::Other(b.to_string()).into()
}

/// One step of a loop (an iteration): fails once the render is past a bound or stopped.
pub(crate) fn step() -> Result<(), handlebars::RenderError> {
    with_budget(Budget::step).map_err(hb_error)
}

/// A helper made `n` bytes of text: they count as long as the render lasts.
pub(crate) fn made_text(n: usize) -> Result<(), String> {
    with_budget(|b| b.hold(n, Held::HelperText)).map_err(|b| b.to_string())
}

/// Where a render writes: a string, every byte of which counts against the render's budget.
/// The render's output, and the buffers loops render iterations into.
#[derive(Default)]
pub(crate) struct Bounded(pub String);

impl Output for Bounded {
    fn write(&mut self, seg: &str) -> std::io::Result<()> {
        with_budget(|b| b.hold(seg.len(), Held::Output)).map_err(io_error)?;
        self.0.push_str(seg);
        Ok(())
    }
}

impl Bounded {
    /// Writes the text held here into `out`, where it counts again: so it stops counting here.
    pub(crate) fn copy_into(&self, out: &mut dyn Output) -> std::io::Result<()> {
        ACTIVE.with_borrow_mut(|b| {
            if let Some(b) = b {
                b.held = b.held.saturating_sub(self.0.len());
            }
        });
        out.write(&self.0)
    }
}

/// Another output whose writes count (a partial block's body, see [`Counted`]).
struct Counting<'a>(&'a mut dyn Output);

impl Output for Counting<'_> {
    fn write(&mut self, seg: &str) -> std::io::Result<()> {
        with_budget(|b| b.hold(seg.len(), Held::Output)).map_err(io_error)?;
        self.0.write(seg)
    }
}

/// The helper every partial is put inside at parse ([`nest_partials`]): `{{#NEST levels
/// [context] [hash]}}{{> partial ...}}{{/NEST}}`, where `levels` is the partial's place in its
/// template (the blocks around it, plus one) and the partial's own context and hash follow.
/// Not a name a template can write (it has spaces), so only those blocks reach it.
pub const NEST: &str = "partial (nested)";

/// The helper a partial block's body is put inside ([`nest_partials`]), so that what the body
/// writes into Handlebars' own buffer counts.
pub const COUNTED: &str = "partial block (counted)";

/// See [`NEST`].
struct Nest;

impl HelperDef for Nest {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let levels = h
            .param(0)
            .and_then(|p| p.value().as_u64())
            .ok_or_else(|| RenderErrorReason::Other(format!("{NEST}: no levels")))?
            as usize;
        // What Handlebars copies for the partial: its context (given, or `this`), merged with
        // its hash. Measured only with a render under way.
        let copied = if ACTIVE.with_borrow(Option::is_some) {
            let context = match h.param(1) {
                Some(p) => weight(p.value()),
                None => rc.evaluate(ctx, "this").map_or(0, |v| weight(v.as_json())),
            };
            context + h.hash().values().map(|v| weight(v.value())).sum::<usize>()
        } else {
            0
        };
        with_budget(|b| {
            b.step()?;
            if b.depth + levels > b.limits.max_depth {
                return b.fail(Breach::Depth(b.limits.max_depth));
            }
            b.hold(copied, Held::PartialContext)?;
            b.depth += levels;
            Ok(())
        })
        .map_err(hb_error)?;
        let result = match h.template() {
            Some(t) => t.render(r, ctx, rc, out),
            None => Ok(()),
        };
        ACTIVE.with_borrow_mut(|b| {
            if let Some(b) = b {
                b.depth -= levels;
                b.held = b.held.saturating_sub(copied);
            }
        });
        result
    }
}

/// See [`COUNTED`].
struct Counted;

impl HelperDef for Counted {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        match h.template() {
            Some(t) => t.render(r, ctx, rc, &mut Counting(out)),
            None => Ok(()),
        }
    }
}

/// About the bytes a copy of `v` takes: its text, and a slot per value and key.
fn weight(v: &Value) -> usize {
    const SLOT: usize = std::mem::size_of::<Value>();
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|v| SLOT + weight(v)).sum(),
        Value::Object(m) => m.iter().map(|(k, v)| k.len() + 2 * SLOT + weight(v)).sum(),
        _ => 0,
    }
}

/// How deep blocks, subexpressions and partials nest in `elements` (a partial counts one: what
/// it includes is counted as it renders, see [`NEST`]; an inline partial's body counts from
/// where it is written). Measured with a stack of its own, not by recursion: it is what keeps
/// a template nested deeper than a thread's stack away from the code that recurses.
pub fn nesting(elements: &[TemplateElement]) -> usize {
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

/// Puts every partial of `t` inside a [`NEST`] block and every partial block's body inside a
/// [`COUNTED`] block; whether there was any. Either block only renders what it holds, in the
/// same context, so the output is Handlebars' own (a unit test renders a set of templates both
/// ways).
pub fn nest_partials(t: &mut Template) -> bool {
    nest_in(t, 0)
}

fn nest_in(t: &mut Template, depth: usize) -> bool {
    let mut found = false;
    for i in 0..t.elements.len() {
        match &mut t.elements[i] {
            TemplateElement::Expression(h)
            | TemplateElement::HtmlExpression(h)
            | TemplateElement::HelperBlock(h) => {
                for b in [&mut h.template, &mut h.inverse].into_iter().flatten() {
                    found |= nest_in(b, depth + 1);
                }
            }
            // An inline partial's body renders where it is included, inside that [`NEST`].
            TemplateElement::DecoratorExpression(d) | TemplateElement::DecoratorBlock(d) => {
                if let Some(b) = &mut d.template {
                    found |= nest_in(b, 0);
                }
            }
            TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) => {
                found = true;
                if let Some(b) = &mut d.template {
                    nest_in(b, depth + 1);
                    let inner = std::mem::take(&mut b.elements);
                    let mapping = b.mapping.clone();
                    let place = mapping.first().cloned();
                    let name = b.name.clone();
                    let body = template(name, inner, mapping);
                    b.elements = vec![block(COUNTED, Vec::new(), HashMap::new(), body)];
                    b.mapping = place.into_iter().collect();
                }
                let mut params = vec![Parameter::Literal(Value::from(depth + 1))];
                params.extend(d.params.first().cloned());
                let hash = d.hash.clone();
                let partial =
                    std::mem::replace(&mut t.elements[i], TemplateElement::Comment(String::new()));
                t.elements[i] = block(
                    NEST,
                    params,
                    hash,
                    template(
                        t.name.clone(),
                        vec![partial],
                        t.mapping.get(i).cloned().into_iter().collect(),
                    ),
                );
            }
            _ => {}
        }
    }
    found
}

fn template(
    name: Option<String>,
    elements: Vec<TemplateElement>,
    mapping: Vec<handlebars::template::TemplateMapping>,
) -> Template {
    let mut t = Template::default();
    t.name = name;
    t.elements = elements;
    t.mapping = mapping;
    t
}

/// `{{#helper params hash}}body{{/helper}}`.
fn block(
    helper: &str,
    params: Vec<Parameter>,
    hash: HashMap<String, Parameter>,
    body: Template,
) -> TemplateElement {
    let h = HelperTemplateBuilder::default()
        .name(Parameter::Name(helper.to_string()))
        .params(params)
        .hash(hash)
        .template(body)
        .block(true)
        .chain(false)
        .indent_before_write(false)
        .build()
        .expect("every field set");
    TemplateElement::HelperBlock(Box::new(h))
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
            let t = Template::compile(src).unwrap();
            assert_eq!(nesting(&t.elements), want, "{src}");
        }
        // The shipped templates are far within the default.
        for name in ["nginx.conf.hbs", "haproxy.cfg.hbs"] {
            let t = Template::compile(&crate::render::each::tests::shipped(name)).unwrap();
            assert_eq!(nesting(&t.elements), 4, "{name}");
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
            max_time: Duration::from_millis(100),
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
