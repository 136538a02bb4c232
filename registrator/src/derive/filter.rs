//! `-label-filter` (and `--scope-label`'s resolved term): which containers are registrator's
//! to look at at all. A container outside the filter yields no services and no warnings.

use std::collections::BTreeMap;

/// One `-label-filter` term, as `docker ps --filter label=…` spells it: `KEY` (the label is
/// present, any value) or `KEY=VALUE` (exactly that value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMatch {
    /// The label's key.
    pub key: String,
    /// The value it must have; `None`: any.
    pub value: Option<String>,
}

impl LabelMatch {
    /// Parses `KEY` or `KEY=VALUE`; the error says what was expected.
    pub fn parse(s: &str) -> Result<LabelMatch, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (s, None),
        };
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(format!(
                "invalid value {s:?} for -label-filter: expected KEY or KEY=VALUE (a label key without spaces)"
            ));
        }
        Ok(LabelMatch {
            key: key.to_string(),
            value,
        })
    }

    /// Whether a container with `labels` satisfies this term.
    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(_), None) => true,
            (Some(have), Some(want)) => have == want,
            (None, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::derive::fixtures::*;
    use crate::derive::{derive, ContainerInfo, DeriveOptions, LabelMatch};

    #[test]
    fn label_filter_keeps_only_matching_containers() {
        let shop = with_labels(web(), &[("com.docker.compose.project", "shop")]);
        let filter = |terms: &[&str]| DeriveOptions {
            label_filter: terms
                .iter()
                .map(|t| LabelMatch::parse(t).unwrap())
                .collect(),
            ..opts()
        };
        let count = |c: &ContainerInfo, o: &DeriveOptions| derive(c, o).services.len();
        assert!(count(&shop, &filter(&[])) > 0);
        assert!(count(&shop, &filter(&["com.docker.compose.project=shop"])) > 0);
        assert!(count(&shop, &filter(&["com.docker.compose.project"])) > 0);
        assert_eq!(
            count(&shop, &filter(&["com.docker.compose.project=other"])),
            0
        );
        assert_eq!(count(&web(), &filter(&["com.docker.compose.project"])), 0);
        // Every term must match.
        assert_eq!(
            count(&shop, &filter(&["com.docker.compose.project=shop", "tier"])),
            0
        );
        // A filtered-out container is not ours: its bad metadata is not reported either.
        let noisy = with_env(web(), &["SERVICE_NAME=bad name!"]);
        assert!(derive(&noisy, &filter(&["tier"])).warnings.is_empty());
    }
}
