//! The filter engine of the Describe calls of VPC resources (EC2's
//! `Filter.N.Name` / `Filter.N.Value.M`): a filter name the resource does
//! not know is refused; a resource passes when every filter matches one of
//! its values, values may hold `*` and `?`, and `tag:KEY` and `tag-key`
//! are always known.

use crate::error::{Result, ServiceError};
use nimbus_proto::api::ResourceTag;

/// Describe filters (EC2's `Filter.N.Name` / `Filter.N.Value.M`): every
/// filter must match one of its values; values may hold `*` and `?`.
pub type Filters = Vec<(String, Vec<String>)>;

fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A filter value as a PostgreSQL `LIKE` pattern (`*` any run, `?` one
/// character, everything else literal, `%`, `_` and `\` escaped): the
/// same wildcards [`glob`] matches, for the filters PostgreSQL applies
/// (DescribeInstances), so every Describe reads a value one way.
pub(crate) fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Refuses a filter this resource does not know (tags are always known).
pub(crate) fn check_filter_names(filters: &Filters, known: &[&str]) -> Result<()> {
    for (name, _) in filters {
        if !(known.contains(&name.as_str()) || name == "tag-key" || name.starts_with("tag:")) {
            return Err(ServiceError::InvalidParameterValue(format!("The filter '{name}' is invalid")));
        }
    }
    Ok(())
}

/// Whether a resource with these facts and tags passes every filter.
pub(crate) fn passes(filters: &Filters, facts: &[(&str, String)], tags: &[ResourceTag]) -> bool {
    filters.iter().all(|(name, values)| {
        let candidates: Vec<&str> = if name == "tag-key" {
            tags.iter().map(|t| t.key.as_str()).collect()
        } else if let Some(key) = name.strip_prefix("tag:") {
            tags.iter().filter(|t| t.key == key).map(|t| t.value.as_str()).collect()
        } else {
            facts.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
        };
        candidates.iter().any(|c| values.iter().any(|v| glob(v, c)))
    })
}

pub(crate) fn yes_no(b: bool) -> String {
    b.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_need_every_name_to_match_one_value() {
        let facts = [("vpc-id", "vpc-1".to_string()), ("is-default", "true".to_string())];
        let tags = [ResourceTag { key: "Name".into(), value: "main".into() }];
        let f = |v: Vec<(&str, Vec<&str>)>| -> Filters {
            v.into_iter().map(|(n, vs)| (n.to_string(), vs.into_iter().map(String::from).collect())).collect()
        };
        assert!(passes(&f(vec![("vpc-id", vec!["vpc-2", "vpc-1"]), ("tag:Name", vec!["m*"])]), &facts, &tags));
        assert!(!passes(&f(vec![("vpc-id", vec!["vpc-1"]), ("is-default", vec!["false"])]), &facts, &tags));
        assert!(passes(&f(vec![("tag-key", vec!["Name"])]), &facts, &tags));
        assert!(check_filter_names(&f(vec![("bogus", vec![])]), &["vpc-id"]).is_err());
    }

    #[test]
    fn like_patterns_keep_the_wildcards_and_escape_the_rest() {
        assert_eq!(like_pattern("web-*"), "web-%");
        assert_eq!(like_pattern("a?c"), "a_c");
        assert_eq!(like_pattern("50%_off\\"), "50\\%\\_off\\\\");
        assert_eq!(like_pattern("plain"), "plain");
    }

    #[test]
    fn globs_match_like_ec2_filters() {
        assert!(glob("web-*", "web-1") && glob("*", "") && glob("a?c", "abc") && glob("172.31.*", "172.31.0.0/20"));
        assert!(!glob("web-*", "db-1") && !glob("a?c", "ac") && !glob("abc", "abcd"));
    }
}
