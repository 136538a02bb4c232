//! Rendering one template source against template data.
//!
//! Handlebars runs in strict mode so a missing key or a misspelt field is an error naming it
//! (instead of an empty string that produces a config with a hole), and with HTML escaping off:
//! `&amp;` in a proxy config is a bug, and the config-safe helpers do the real escaping.

use crate::helpers;
use handlebars::{Handlebars, RenderErrorReason};
use serde_json::Value;
use std::collections::HashMap;

/// A registry with confd's settings and helpers. Callers pass the template source read fresh
/// from disk on every render (so an edit is always seen); it is parsed again only when it
/// differs from the source last parsed under that name, since parsing dominated small renders.
pub struct Renderer {
    hb: Handlebars<'static>,
    parsed: HashMap<String, String>,
}

impl Default for Renderer {
    fn default() -> Self {
        let mut hb = Handlebars::new();
        hb.set_strict_mode(true);
        hb.register_escape_fn(handlebars::no_escape);
        helpers::register(&mut hb);
        Renderer {
            hb,
            parsed: HashMap::new(),
        }
    }
}

impl Renderer {
    /// Renders `source` (named `name` in errors) with `data`. The error is one line: where
    /// (template, line, column) and why (e.g. ``missing key or misspelt field `servces` ``).
    pub fn render(&mut self, name: &str, source: &str, data: &Value) -> Result<String, String> {
        if self.parsed.get(name).map(String::as_str) != Some(source) {
            // Forget the old parse first: a syntax error must never leave it in use.
            self.parsed.remove(name);
            self.hb.unregister_template(name);
            self.hb
                .register_template_string(name, source)
                .map_err(|e| one_line(&format!("{name}: template syntax error: {e}")))?;
            self.parsed.insert(name.to_string(), source.to_string());
        }
        let out = self.hb.render(name, data).map_err(|e| {
            let reason = match e.reason() {
                RenderErrorReason::MissingVariable(Some(p)) => {
                    format!("missing key or misspelt field `{p}`")
                }
                RenderErrorReason::MissingVariable(None) => "missing key or misspelt field".into(),
                other => other.to_string(),
            };
            match (e.line_no, e.column_no) {
                (Some(l), Some(c)) => format!("{name}:{l}:{c}: {reason}"),
                _ => format!("{name}: {reason}"),
            }
        });
        out.map_err(|e| one_line(&e))
    }
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
                .unwrap_err();
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
        assert!(e.contains("nmae"), "{e}");
    }
}
