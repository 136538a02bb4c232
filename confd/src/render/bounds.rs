//! The bounds every render runs within ([`Limits`]), and the accounting that holds a render to
//! them.
//!
//! A template is a program run against data from anyone who can write to the store, and
//! Handlebars bounds nothing: a partial that includes itself
//! (`{{#*inline "a"}}x{{> a}}{{/inline}}{{> a}}`) recurses until the stack or memory runs out,
//! copying its context at every level. So every render runs within [`Limits`], and past one it
//! fails with one line naming the template and the bound: the caller keeps the previous file
//! and goes on with the other templates.
//! - **Depth** (`max_render_depth`): each block, subexpression or partial open at once is a
//!   frame of the render's stack. A template's own nesting is measured as soon as it is parsed
//!   ([`nesting`](super::analysis::nesting), without recursion) and a template deeper than the bound is refused before
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
use handlebars::template::{HelperTemplateBuilder, Parameter, Template, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
    Renderable,
};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use switchboard::Shutdown;

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

/// Which bound a render went past; displayed as the reason its error gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Breach {
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
pub(super) enum Held {
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
pub(super) struct Active;

impl Active {
    pub(super) fn start(limits: Limits, stop: Option<Shutdown>) -> Active {
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
    pub(super) fn finish(self) -> Option<Breach> {
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
pub(super) fn step() -> Result<(), handlebars::RenderError> {
    with_budget(Budget::step).map_err(hb_error)
}

/// A helper made `n` bytes of text: they count as long as the render lasts.
pub(super) fn made_text(n: usize) -> Result<(), String> {
    with_budget(|b| b.hold(n, Held::HelperText)).map_err(|b| b.to_string())
}

/// Where a render writes: a string, every byte of which counts against the render's budget.
/// The render's output, and the buffers loops render iterations into.
#[derive(Default)]
pub(super) struct Bounded(pub String);

impl Output for Bounded {
    fn write(&mut self, seg: &str) -> std::io::Result<()> {
        with_budget(|b| b.hold(seg.len(), Held::Output)).map_err(io_error)?;
        self.0.push_str(seg);
        Ok(())
    }
}

impl Bounded {
    /// Writes the text held here into `out`, where it counts again: so it stops counting here.
    pub(super) fn copy_into(&self, out: &mut dyn Output) -> std::io::Result<()> {
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
pub(super) struct Nest;

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
pub(super) struct Counted;

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

/// Puts every partial of `t` inside a [`NEST`] block and every partial block's body inside a
/// [`COUNTED`] block; whether there was any. Either block only renders what it holds, in the
/// same context, so the output is Handlebars' own (a unit test renders a set of templates both
/// ways).
pub(super) fn nest_partials(t: &mut Template) -> bool {
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
