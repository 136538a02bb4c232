//! Template helpers: data shaping (`sort_by`, `filter_tag`, `group_by`, `join`, `default`,
//! `json`, `eq`, `find_service`, `vhost`, `addr`) and the config-safe output helpers.
//!
//! Registry values come from container labels, i.e. from whoever can start a container, so
//! the output helpers make injection impossible rather than "escaped well enough":
//! `nginx_name`/`haproxy_name` map any value onto `[A-Za-z0-9_.-]` (with a hash suffix when
//! something had to change, so two different hostile names never collide), and
//! `nginx_string`/`haproxy_string` emit one double-quoted word with quotes and backslashes
//! escaped and `$` (variable expansion) and control characters removed.

use crate::names;
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason, ScopedJson,
};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A helper argument: `None` when the template referred to a key that does not exist.
type Arg<'a> = Option<&'a Value>;

/// A value helper's body: its arguments in, a value or a reason out.
type HelperFn = fn(&[Arg]) -> Result<Value, String>;

/// A text helper's body: its arguments in, config text appended to the buffer (or a reason).
type TextFn = fn(&[Arg], &mut String) -> Result<(), String>;

/// What a helper computes.
#[derive(Clone, Copy)]
enum Body {
    /// A value (data shaping: `default`, `find_service`, `eq`, ...).
    Value(HelperFn),
    /// Config text (`addr`, the `*_name` and `*_string` helpers, `safe_path`). Printed by an
    /// expression (`{{addr this}}`) it is written straight into the output: Handlebars' own
    /// path makes a JSON string, renders it to a second string and escapes it into a third,
    /// three allocations per server line at 10,000 instances. As a subexpression it is a
    /// string value like any other.
    Text(TextFn),
}

/// A helper written as a plain function of its arguments.
struct FnHelper {
    body: Body,
    /// Whether a missing argument is legitimate input (`default`) rather than an error.
    allow_missing: bool,
    /// Called with no argument, the helper gets the current context (`this`): `vhost` and
    /// `addr` are also instance field names, and a helper shadows a field of the same name,
    /// so inside `{{#each instances}}` a bare `{{vhost}}` or `{{addr}}` must mean the
    /// instance's, not an error.
    implicit_this: bool,
}

thread_local! {
    /// The buffer text helpers write into before it is copied to the output, reused so a
    /// server line allocates nothing here.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl FnHelper {
    /// Runs `f` on the helper's arguments (on `this` when called bare and `implicit_this`).
    fn with_args<'rc, T>(
        &self,
        h: &Helper<'rc>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'_, 'rc>,
        f: impl FnOnce(&[Arg]) -> Result<T, String>,
    ) -> Result<T, RenderError> {
        let failed =
            |e: String| RenderErrorReason::Other(format!("helper {}: {e}", h.name())).into();
        if self.implicit_this && h.params().is_empty() {
            let this = rc.evaluate(ctx, "this")?;
            return f(&[Some(this.as_json())]).map_err(failed);
        }
        // Most calls have one to three arguments: no allocation for them.
        let params = h.params();
        let mut small: [Arg; 4] = [None; 4];
        let mut big: Vec<Arg> = Vec::new();
        let args: &mut [Arg] = if params.len() <= small.len() {
            &mut small[..params.len()]
        } else {
            big.resize(params.len(), None);
            &mut big
        };
        for (slot, p) in args.iter_mut().zip(params) {
            if p.is_value_missing() {
                if !self.allow_missing {
                    let what = p.relative_path().cloned().unwrap_or_else(|| "?".into());
                    return Err(RenderErrorReason::MissingVariable(Some(what)).into());
                }
            } else {
                *slot = Some(p.value());
            }
        }
        f(args).map_err(failed)
    }
}

impl HelperDef for FnHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let v = self.with_args(h, ctx, rc, |args| {
            let v = match self.body {
                Body::Value(f) => f(args)?,
                Body::Text(f) => {
                    let mut s = String::new();
                    f(args, &mut s)?;
                    Value::String(s)
                }
            };
            // Text a helper makes counts against the render's output bound: fed back into
            // the helper (`concat` of `concat` through `with ... as`), it would double per
            // level. Other values are parts of the data, copied or rearranged.
            if let Value::String(s) = &v {
                super::bounds::made_text(s.len())?;
            }
            Ok(v)
        })?;
        Ok(ScopedJson::Derived(v))
    }

    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let Body::Text(f) = self.body else {
            return AsValue(self).call(h, r, ctx, rc, out);
        };
        // At the start of a line Handlebars may owe the output an indentation (a partial
        // included indented), which only its own path knows how to write.
        if rc.get_indent_before_write() {
            return AsValue(self).call(h, r, ctx, rc, out);
        }
        SCRATCH.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            self.with_args(h, ctx, rc, |args| f(args, &mut buf))?;
            if buf.is_empty() {
                return Ok(());
            }
            // What Handlebars' own write does for text without a line break in the middle of
            // a line (text helpers never write a line break: see each one). No escaping:
            // [`register`] sets none, the helpers escape for the config themselves.
            debug_assert!(!buf.contains('\n'), "a text helper wrote a line break");
            let written = out.write(&buf);
            if buf.capacity() > 4096 {
                // A huge argument once must not keep its buffer for the process's life.
                *buf = String::new();
            }
            written?;
            rc.set_content_produced(true);
            rc.set_trailing_newline(false);
            rc.set_indent_before_write(false);
            Ok(())
        })
    }
}

/// A helper through Handlebars' default `call`: its value rendered, escaped and written.
struct AsValue<'a>(&'a FnHelper);

impl HelperDef for AsValue<'_> {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        self.0.call_inner(h, r, ctx, rc)
    }
}

/// Whether the helper `name`, called with no argument, reads the current context (`this`):
/// `vhost` and `addr` are also instance field names (see `FnHelper::implicit_this`).
pub(crate) fn reads_this(name: &str) -> bool {
    matches!(name, "vhost" | "addr")
}

/// Registers every helper on `hb`, and turns its escaping off: proxy configs are not HTML
/// (`&amp;` in one is a bug), and the output helpers escape for the config themselves.
pub fn register(hb: &mut Handlebars) {
    hb.register_escape_fn(handlebars::no_escape);
    let table: [(&str, Body, bool); 21] = [
        ("concat", Body::Value(concat), false),
        ("required", Body::Value(required), true),
        ("first_meta", Body::Value(first_meta), false),
        ("safe_path", Body::Text(safe_path), false),
        ("sort_by", Body::Value(sort_by), false),
        ("filter_tag", Body::Value(filter_tag), false),
        ("group_by", Body::Value(group_by), false),
        ("join", Body::Value(join), false),
        ("default", Body::Value(default), true),
        ("json", Body::Value(to_json), false),
        ("eq", Body::Value(eq), false),
        ("find_service", Body::Value(find_service), true),
        ("vhost", Body::Value(vhost), false),
        ("addr", Body::Text(addr), false),
        ("nginx_name", Body::Text(name), false),
        ("haproxy_name", Body::Text(name), false),
        ("nginx_string", Body::Text(quoted_arg), false),
        ("nginx_escape", Body::Text(quoted_arg), false),
        ("haproxy_string", Body::Text(quoted_arg), false),
        ("haproxy_escape", Body::Text(quoted_arg), false),
        ("safe_name", Body::Text(name), false),
    ];
    for (n, body, allow_missing) in table {
        let implicit_this = reads_this(n);
        hb.register_helper(
            n,
            Box::new(FnHelper {
                body,
                allow_missing,
                implicit_this,
            }),
        );
    }
}

fn arg<'a>(args: &[Arg<'a>], i: usize, what: &str) -> Result<&'a Value, String> {
    args.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("argument {} ({what}) is required", i + 1))
}

fn array<'a>(args: &[Arg<'a>], i: usize) -> Result<&'a Vec<Value>, String> {
    let v = arg(args, i, "a list")?;
    v.as_array()
        .ok_or_else(|| format!("argument {} must be a list, got {}", i + 1, kind(v)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A value as text: strings as they are, other scalars in JSON form, null as empty.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Like [`text`], borrowing when the value is a string (the common case: no copy).
fn text_ref(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(text(other)),
    }
}

/// Follows a dotted path (`meta.zone`) into an object.
fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(v, |cur, p| cur.get(p))
}

/// Orders numbers numerically, then everything else by its text.
fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.map(text).cmp(&b.map(text)),
    }
}

/// `sort_by LIST [FIELD]`: the list sorted (stably) by a dotted field path, or by the values.
fn sort_by(args: &[Arg]) -> Result<Value, String> {
    let mut items = array(args, 0)?.clone();
    let path = args.get(1).copied().flatten().map(text).unwrap_or_default();
    items.sort_by(|a, b| cmp_values(field(a, &path), field(b, &path)));
    Ok(Value::Array(items))
}

/// `filter_tag INSTANCES TAG`: the instances (or services) whose `tags` contain TAG.
fn filter_tag(args: &[Arg]) -> Result<Value, String> {
    let tag = text(arg(args, 1, "tag")?);
    Ok(Value::Array(
        array(args, 0)?
            .iter()
            .filter(|i| {
                i.get("tags")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(|x| x.as_str() == Some(&tag)))
            })
            .cloned()
            .collect(),
    ))
}

/// `group_by LIST FIELD`: an object from each distinct field value (text; missing: "") to the
/// items having it, e.g. `group_by instances "meta.zone"`.
fn group_by(args: &[Arg]) -> Result<Value, String> {
    let path = text(arg(args, 1, "field")?);
    let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for i in array(args, 0)? {
        let key = field(i, &path).map(text).unwrap_or_default();
        groups.entry(key).or_default().push(i.clone());
    }
    Ok(json!(groups))
}

/// `join LIST SEP`: the items as text joined with SEP (default `,`).
fn join(args: &[Arg]) -> Result<Value, String> {
    let sep = args.get(1).copied().flatten().map(text);
    let parts: Vec<String> = array(args, 0)?.iter().map(text).collect();
    Ok(Value::String(parts.join(sep.as_deref().unwrap_or(","))))
}

/// `default VALUE FALLBACK`: VALUE unless it is missing, null or empty text.
fn default(args: &[Arg]) -> Result<Value, String> {
    match args.first().copied().flatten() {
        Some(Value::Null) | None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(v) => return Ok(v.clone()),
    }
    Ok(args
        .get(1)
        .copied()
        .flatten()
        .cloned()
        .unwrap_or(Value::Null))
}

/// `concat A B ...`: the arguments as text, joined without separator.
fn concat(args: &[Arg]) -> Result<Value, String> {
    Ok(Value::String(
        args.iter().flatten().map(|v| text(v)).collect(),
    ))
}

/// `required VALUE MESSAGE`: VALUE, or a render error saying MESSAGE when it is missing, null
/// or empty. How a template refuses to render a section whose settings are absent.
fn required(args: &[Arg]) -> Result<Value, String> {
    match args.first().copied().flatten() {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(v) => return Ok(v.clone()),
    }
    let msg = args.get(1).copied().flatten().map(text);
    Err(msg.unwrap_or_else(|| "a required value is missing".into()))
}

/// `first_meta INSTANCES KEY`: the first non-empty meta KEY among the instances, or null.
fn first_meta(args: &[Arg]) -> Result<Value, String> {
    let key = text(arg(args, 1, "meta key")?);
    Ok(array(args, 0)?
        .iter()
        .filter_map(|i| i.get("meta")?.get(&key)?.as_str())
        .find(|v| !v.is_empty())
        .map(|v| Value::String(v.to_string()))
        .unwrap_or(Value::Null))
}

/// `safe_path VALUE`: an URL path safe as one config word: starts with `/`, and every byte
/// outside `[A-Za-z0-9/_.~%?=&-]` is percent-encoded.
fn safe_path(args: &[Arg], out: &mut String) -> Result<(), String> {
    let v = text_ref(arg(args, 0, "path")?);
    if !v.starts_with('/') {
        out.push('/');
    }
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"/_.~%?=&-".contains(&b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    Ok(())
}

/// `json VALUE`: VALUE as compact JSON.
fn to_json(args: &[Arg]) -> Result<Value, String> {
    Ok(Value::String(arg(args, 0, "value")?.to_string()))
}

/// `eq A B`: equality of two values (numbers and their text compare equal).
fn eq(args: &[Arg]) -> Result<Value, String> {
    let a = arg(args, 0, "left")?;
    let b = arg(args, 1, "right")?;
    Ok(Value::Bool(a == b || text(a) == text(b)))
}

/// `find_service SERVICES NAME TAG`: the service called NAME if it has instances, else the
/// first (by name) with tag TAG, else null. How the default upstream/backend is chosen.
fn find_service(args: &[Arg]) -> Result<Value, String> {
    let Some(Value::Array(services)) = args.first().copied().flatten() else {
        return Err(
            "argument 1 must be the `services` list, as in (find_service services \"web\" \"backend\")"
                .into(),
        );
    };
    let (name, tag) = service_query(&args[1..]);
    Ok(pick_service(services, &name, &tag))
}

/// The name and tag `find_service` looks for, from its arguments after `services` (missing
/// ones are empty: they match nothing).
pub(crate) fn service_query(args: &[Arg]) -> (String, String) {
    let at = |k: usize| args.get(k).copied().flatten().map(text).unwrap_or_default();
    (at(0), at(1))
}

/// The entry of `services` called `name`, else the first tagged `tag`, among those with
/// instances; `null` if none (see `data::Lists::find_service`, its twin for a render that
/// has no `services` in its document).
pub(crate) fn pick_service(services: &[Value], name: &str, tag: &str) -> Value {
    let has_instances = |s: &&Value| {
        s.get("instances")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    let by_name = services
        .iter()
        .filter(has_instances)
        .find(|s| !name.is_empty() && s.get("name").map(text_ref).as_deref() == Some(name));
    let by_tag = || {
        services.iter().filter(has_instances).find(|s| {
            !tag.is_empty()
                && s.get("tags")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(|x| x.as_str() == Some(tag)))
        })
    };
    by_name.or_else(by_tag).cloned().unwrap_or(Value::Null)
}

/// Argument 1 of an instance helper: an instance object (`this` inside `{{#each instances}}`).
fn instance<'a>(args: &[Arg<'a>], helper: &str) -> Result<&'a Value, String> {
    let i = arg(args, 0, "instance")?;
    if !i.is_object() || args.len() > 1 {
        return Err(format!(
            "expected one instance, as in {{{{{helper} this}}}} inside {{{{#each instances}}}} \
             (or a bare {{{{{helper}}}}}), got {} argument(s), the first {}",
            args.len(),
            kind(i)
        ));
    }
    Ok(i)
}

/// `vhost INSTANCE`: the instance's validated virtual host (meta `vhost`, or `hostname` +
/// `.` + `domain`), or empty. The same rule as the data's `vhost` field ([`names::vhost`]).
fn vhost(args: &[Arg]) -> Result<Value, String> {
    let meta = instance(args, "vhost")?.get("meta");
    let v = names::vhost(|k| meta?.get(k)?.as_str());
    Ok(Value::String(v.unwrap_or_default()))
}

/// `addr INSTANCE`: `address:port` (`[v6]:port`), refusing anything that is not an IP
/// address or DNS name with a numeric port.
fn addr(args: &[Arg], out: &mut String) -> Result<(), String> {
    let i = instance(args, "addr")?;
    let address = i.get("address").map(text_ref).unwrap_or_default();
    let port = i
        .get("port")
        .and_then(Value::as_u64)
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("instance has no valid port: {i}"))?;
    if !names::is_address(&address) {
        return Err(format!("{address:?} is not an IP address or DNS name"));
    }
    let v6 = address.contains(':');
    if v6 {
        out.push('[');
    }
    out.push_str(&address);
    if v6 {
        out.push(']');
    }
    out.push(':');
    out.push_str(itoa(port as u16).as_str());
    Ok(())
}

/// `nginx_name` / `haproxy_name`: see [`names::safe_token`].
fn name(args: &[Arg], out: &mut String) -> Result<(), String> {
    names::push_safe_token(&text_ref(arg(args, 0, "value")?), out);
    Ok(())
}

/// A port as decimal digits, without going through `fmt`.
fn itoa(n: u16) -> ArrayString {
    let mut buf = [0u8; 5];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    ArrayString { buf, start: i }
}

/// Up to five ASCII digits on the stack.
struct ArrayString {
    buf: [u8; 5],
    start: usize,
}

impl ArrayString {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).expect("ASCII digits")
    }
}

/// One double-quoted word: `\` and `"` escaped, `$` and control characters dropped.
fn quoted(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            '$' => {}
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `nginx_string VALUE` / `haproxy_string VALUE`: a safe string argument. nginx and HAProxy
/// both unescape `\"` and `\\` inside double quotes; `$` would start a variable in nginx and
/// expand `$VAR` in HAProxy, so it is dropped.
fn quoted_arg(args: &[Arg], out: &mut String) -> Result<(), String> {
    quoted(&text_ref(arg(args, 0, "value")?), out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Handlebars<'static> {
        let mut h = Handlebars::new();
        h.set_strict_mode(true);
        h.register_escape_fn(handlebars::no_escape);
        register(&mut h);
        h
    }

    fn render(t: &str, data: Value) -> Result<String, String> {
        hb().render_template(t, &data).map_err(|e| e.to_string())
    }

    #[test]
    fn helpers_table() {
        let insts = json!([
            {"id": "b", "port": 10, "tags": ["x"], "meta": {"zone": "z1"}},
            {"id": "a", "port": 9, "tags": ["y", "x"], "meta": {"zone": "z2"}},
            {"id": "c", "port": 100, "tags": [], "meta": {}},
        ]);
        let data = json!({"i": insts, "s": "", "n": null, "v": "val", "num": 80,
        "services": [
            {"name": "api", "tags": ["backend"], "instances": [{"id": "1"}]},
            {"name": "http", "tags": ["backend"], "instances": [{"id": "2"}]},
            {"name": "empty", "tags": ["x"], "instances": []},
        ]});
        let cases = [
            ("{{#each (sort_by i \"port\")}}{{id}}{{/each}}", "abc"),
            ("{{#each (sort_by i \"id\")}}{{id}}{{/each}}", "abc"),
            ("{{#each (filter_tag i \"x\")}}{{id}}{{/each}}", "ba"),
            (
                "{{#each (group_by i \"meta.zone\")}}[{{@key}}:{{#each this}}{{id}}{{/each}}]{{/each}}",
                "[:c][z1:b][z2:a]",
            ),
            ("{{join (sort_by (filter_tag i \"x\") \"id\") \"-\"}}", "{\"id\":\"a\",\"meta\":{\"zone\":\"z2\"},\"port\":9,\"tags\":[\"y\",\"x\"]}-{\"id\":\"b\",\"meta\":{\"zone\":\"z1\"},\"port\":10,\"tags\":[\"x\"]}"),
            ("{{join i.1.tags \", \"}}", "y, x"),
            ("{{default s \"d\"}}|{{default n \"d\"}}|{{default missing \"d\"}}|{{default v \"d\"}}", "d|d|d|val"),
            ("{{json i.2.meta}}", "{}"),
            ("{{#if (eq num \"80\")}}y{{else}}n{{/if}}{{#if (eq v \"x\")}}y{{else}}n{{/if}}", "yn"),
            ("{{lookup (find_service services \"http\" \"backend\") \"name\"}}", "http"),
            ("{{lookup (find_service services \"nope\" \"backend\") \"name\"}}", "api"),
            ("{{#if (find_service services \"empty\" \"x\")}}y{{else}}n{{/if}}", "n"),
            ("{{nginx_name v}}", "val"),
            ("{{concat v \":\" num}}", "val:80"),
            ("{{required v \"m\"}}", "val"),
            ("{{default (first_meta i \"zone\") \"/\"}}", "z1"),
            ("{{default (first_meta i \"nope\") \"/\"}}", "/"),
            ("{{safe_path \"health check#x\"}}", "/health%20check%23x"),
            ("{{safe_path \"/ok?a=1\"}}", "/ok?a=1"),
            ("{{nginx_string \"a\\\"b\"}}", "\"a\\\"b\""),
        ];
        for (t, want) in cases {
            assert_eq!(render(t, data.clone()).unwrap(), want, "{t}");
        }
    }

    #[test]
    fn text_helpers_print_what_their_values_hold() {
        // Printed directly, as a subexpression's value, and at the start of the lines of an
        // indented partial (where Handlebars owes the indentation): the same text.
        let data = json!({"a": {"address": "fd00::1", "port": 80}, "v": "a:b", "p": "x y"});
        let direct = render(
            "{{addr a}} {{nginx_name v}} {{haproxy_string v}} {{safe_path p}}",
            data.clone(),
        )
        .unwrap();
        let values = render(
            "{{concat (addr a)}} {{concat (nginx_name v)}} {{concat (haproxy_string v)}} {{concat (safe_path p)}}",
            data.clone(),
        )
        .unwrap();
        assert_eq!(direct, values);
        assert_eq!(
            direct,
            format!("[fd00::1]:80 {} \"a:b\" /x%20y", names::safe_token("a:b"))
        );
        let mut h = hb();
        h.register_partial("p", "{{nginx_name v}}\n{{addr a}} {{nginx_name v}}\n")
            .unwrap();
        let out = h.render_template("  {{> p}}", &data).unwrap();
        let t = names::safe_token("a:b");
        assert_eq!(out, format!("  {t}\n  [fd00::1]:80 {t}\n"));
    }

    #[test]
    fn quoted_strings_cannot_escape() {
        let cases = [
            ("plain", "\"plain\""),
            (
                "a\"; } server { listen 81; } \"",
                "\"a\\\"; } server { listen 81; } \\\"\"",
            ),
            ("back\\slash", "\"back\\\\slash\""),
            ("$host\nnext", "\"hostnext\""),
        ];
        for (input, want) in cases {
            let out = render(
                "{{nginx_string v}}|{{haproxy_string v}}",
                json!({"v": input}),
            )
            .unwrap();
            assert_eq!(out, format!("{want}|{want}"), "{input:?}");
        }
    }

    #[test]
    fn addr_and_vhost() {
        let data = json!({
            "a": {"address": "10.0.0.1", "port": 80, "meta": {"hostname": "2048", "domain": "local.com"}},
            "b": {"address": "fd00::1", "port": 8080, "meta": {"vhost": "x y"}},
            "c": {"address": "1.2.3.4; }", "port": 80, "meta": {}},
        });
        assert_eq!(
            render("{{addr a}} {{vhost a}}", data.clone()).unwrap(),
            "10.0.0.1:80 2048.local.com"
        );
        assert_eq!(
            render("{{addr b}}[{{vhost b}}]", data.clone()).unwrap(),
            "[fd00::1]:8080[]"
        );
        let e = render("{{addr c}}", data).unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
    }

    #[test]
    fn instance_helpers_without_arguments_use_this() {
        // `vhost` and `addr` are instance fields too: bare, inside an instance, they are
        // the instance's, not an error.
        let data = json!({"instances": [
            {"address": "10.0.0.1", "port": 80, "vhost": "2048.local.com",
             "meta": {"hostname": "2048", "domain": "local.com"}},
            {"address": "10.0.0.2", "port": 81, "vhost": "", "meta": {}},
        ]});
        assert_eq!(
            render(
                "{{#each instances}}{{addr}} {{vhost}} {{this.vhost}};{{/each}}",
                data.clone()
            )
            .unwrap(),
            "10.0.0.1:80 2048.local.com 2048.local.com;10.0.0.2:81  ;"
        );
        // The old mistake gets a message that shows the right call.
        let e = render(
            "{{#each instances}}{{addr address port}}{{/each}}",
            data.clone(),
        )
        .unwrap_err();
        assert!(e.contains("{{addr this}}"), "{e}");
        let e = render("{{find_service \"web\"}}", data).unwrap_err();
        assert!(e.contains("(find_service services"), "{e}");
    }

    #[test]
    fn required_refuses_with_its_message() {
        for data in [json!({}), json!({"u": ""}), json!({"u": null})] {
            let e = render("{{required u \"stats_user must be set\"}}", data).unwrap_err();
            assert!(e.contains("stats_user must be set"), "{e}");
        }
    }

    #[test]
    fn missing_keys_are_named() {
        let e = render("{{nginx_name inst.nmae}}", json!({"inst": {"name": "x"}})).unwrap_err();
        assert!(e.contains("inst.nmae"), "{e}");
        let e = render("{{servces}}", json!({"services": []})).unwrap_err();
        assert!(e.contains("servces"), "{e}");
    }
}
