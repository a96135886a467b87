//! The EC2 Query protocol's parameters: `Action=…&Version=…&…`, in a form
//! body or a query string, with lists and structures flattened the way the
//! SDKs write them (`InstanceId.1`, `Filter.1.Name`, `Filter.1.Value.2`).

use crate::error::ServiceError;
use std::collections::BTreeMap;

/// Limits that keep a hostile request from costing much.
const MAX_PARAMS: usize = 1000;
const MAX_LIST: usize = 1000;

#[derive(Debug, Default, Clone)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Decodes `application/x-www-form-urlencoded` bytes (body or query).
    pub fn parse(raw: &[u8]) -> Result<Params, ServiceError> {
        let mut map = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(raw) {
            if map.len() >= MAX_PARAMS {
                return Err(ServiceError::InvalidParameterValue(format!("more than {MAX_PARAMS} parameters")));
            }
            // AWS rejects duplicates; keep the first and say so.
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ServiceError::InvalidParameterValue(format!("parameter {k} is given twice")));
            }
        }
        Ok(Params(map))
    }

    /// Adds the parameters of `other` (query string and body together).
    pub fn merge(&mut self, other: Params) -> Result<(), ServiceError> {
        for (k, v) in other.0 {
            if self.0.insert(k.clone(), v).is_some() {
                return Err(ServiceError::InvalidParameterValue(format!("parameter {k} is given twice")));
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, ServiceError> {
        self.get(name).ok_or_else(|| ServiceError::MissingParameter(name.to_string()))
    }

    /// An integer parameter.
    pub fn int(&self, name: &str) -> Result<Option<i64>, ServiceError> {
        self.get(name)
            .map(|v| v.parse::<i64>().map_err(|_| ServiceError::InvalidParameterValue(format!("{name} must be an integer, not {v:?}"))))
            .transpose()
    }

    /// A boolean parameter (`true`/`false`).
    pub fn bool(&self, name: &str) -> Result<bool, ServiceError> {
        match self.get(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(ServiceError::InvalidParameterValue(format!("{name} must be true or false, not {v:?}"))),
        }
    }

    /// The values of `Prefix.1`, `Prefix.2`, … in index order. Indexes must
    /// be 1, 2, 3, … without gaps (as the SDKs send them).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ServiceError> {
        let mut items: BTreeMap<usize, String> = BTreeMap::new();
        let dotted = format!("{prefix}.");
        for (k, v) in self.0.range(dotted.clone()..) {
            let Some(rest) = k.strip_prefix(&dotted) else { break };
            if let Ok(i) = rest.parse::<usize>() {
                items.insert(i, v.clone());
            }
        }
        check_indexes(prefix, items.keys().copied())?;
        Ok(items.into_values().collect())
    }

    /// The structures `Prefix.N.*`, each as its own [`Params`] with the
    /// `Prefix.N.` part removed, in index order.
    pub fn structs(&self, prefix: &str) -> Result<Vec<Params>, ServiceError> {
        let mut items: BTreeMap<usize, Params> = BTreeMap::new();
        let dotted = format!("{prefix}.");
        for (k, v) in self.0.range(dotted.clone()..) {
            let Some(rest) = k.strip_prefix(&dotted) else { break };
            let Some((idx, field)) = rest.split_once('.') else { continue };
            let Ok(i) = idx.parse::<usize>() else { continue };
            items.entry(i).or_default().0.insert(field.to_string(), v.clone());
        }
        check_indexes(prefix, items.keys().copied())?;
        Ok(items.into_values().collect())
    }
}

/// Indexes must run 1, 2, 3, … or 0, 1, 2, … (libcloud starts at 0), without gaps.
fn check_indexes(prefix: &str, idx: impl Iterator<Item = usize>) -> Result<(), ServiceError> {
    let mut idx = idx.peekable();
    let first = match idx.peek() {
        Some(0) => 0,
        _ => 1,
    };
    for (expected, i) in (first..).zip(idx) {
        if i != expected || i > MAX_LIST {
            return Err(ServiceError::InvalidParameterValue(format!(
                "{prefix}.{i}: list indexes must run 1, 2, 3, … (or from 0), at most {MAX_LIST}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_lists_and_structures() {
        let p = Params::parse(
            b"Action=DescribeInstances&InstanceId.2=i-b&InstanceId.1=i-a&Filter.1.Name=instance-state-name\
              &Filter.1.Value.1=running&Filter.1.Value.2=pending&Filter.2.Name=tag%3AName&Filter.2.Value.1=web+1",
        )
        .unwrap();
        assert_eq!(p.get("Action"), Some("DescribeInstances"));
        assert_eq!(p.list("InstanceId").unwrap(), vec!["i-a", "i-b"]);
        let filters = p.structs("Filter").unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].get("Name"), Some("instance-state-name"));
        assert_eq!(filters[0].list("Value").unwrap(), vec!["running", "pending"]);
        assert_eq!(filters[1].get("Name"), Some("tag:Name"));
        assert_eq!(filters[1].list("Value").unwrap(), vec!["web 1"]);
        assert!(p.list("Nothing").unwrap().is_empty());
    }

    #[test]
    fn lists_may_start_at_zero() {
        let p = Params::parse(b"ResourceId.0=i-a&ResourceId.1=i-b&Tag.0.Key=k&Tag.0.Value=v").unwrap();
        assert_eq!(p.list("ResourceId").unwrap(), vec!["i-a", "i-b"]);
        assert_eq!(p.structs("Tag").unwrap()[0].get("Key"), Some("k"));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        assert!(Params::parse(b"InstanceId.1=a&InstanceId.3=b").unwrap().list("InstanceId").is_err());
        assert!(Params::parse(b"InstanceId.0=a&InstanceId.2=b").unwrap().list("InstanceId").is_err());
        assert!(Params::parse(b"A=1&A=2").is_err());
        assert!(Params::parse(b"MaxCount=x").unwrap().int("MaxCount").is_err());
        assert!(Params::parse(b"DryRun=yes").unwrap().bool("DryRun").is_err());
        assert!(Params::parse(b"MinCount=1").unwrap().required("MaxCount").is_err());
    }
}
