//! Objects of the cluster state that are left out of the tables, or held at their last good
//! version, and why: one bad object never blocks the rest, so it has to be visible instead.
//!
//! Contract: each compile step (Services, Nodes) hands over the complete list of its current
//! problems ([`Skips::update`]). A problem is logged (`skipped: ...`, its message naming the
//! object and the field) and counted once, when it appears or its message changes; one that
//! clears is logged too. `vxnat ctl stats` shows the current list and the counts, the metrics
//! the counts and how many are skipped now, by kind only (the label set stays bounded however
//! many objects go bad).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The kinds problems are reported under (the metrics' `kind` label takes only these).
pub const NODE: &str = "Node";
pub const SERVICE: &str = "Service";
pub const KINDS: [&str; 2] = [NODE, SERVICE];

/// One object's current problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `Node` or `Service`.
    pub kind: String,
    /// The Node's name, the Service's `namespace/name`.
    pub name: String,
    /// What is wrong and what vxnat does about it, naming the object and the field.
    pub message: String,
}

impl Problem {
    pub fn new(kind: &str, name: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem { kind: kind.to_string(), name: name.into(), message: message.into() }
    }
}

/// What `vxnat ctl stats` shows about skipped objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipReport {
    /// The problems now, by kind and name.
    pub current: Vec<Problem>,
    /// (kind, problems that appeared since start).
    pub total: Vec<(String, u64)>,
}

/// The current problems of every kind, and how many appeared so far per kind.
#[derive(Debug, Default)]
pub struct Skips {
    /// kind -> name -> message.
    current: BTreeMap<String, BTreeMap<String, String>>,
    total: BTreeMap<String, u64>,
}

impl Skips {
    /// Replaces the problems of `kind` with `now` (every one of that kind); logs and counts
    /// those not reported before. Returns how many were new.
    pub fn update(&mut self, kind: &str, now: Vec<Problem>) -> usize {
        let old = self.current.remove(kind).unwrap_or_default();
        let mut new = BTreeMap::new();
        let mut appeared = 0;
        for p in now {
            debug_assert_eq!(p.kind, kind);
            if old.get(&p.name) != Some(&p.message) && new.get(&p.name) != Some(&p.message) {
                tracing::warn!("skipped: {}", p.message);
                appeared += 1;
            }
            new.insert(p.name, p.message);
        }
        for name in old.keys().filter(|n| !new.contains_key(*n)) {
            tracing::info!("{kind} {name}: no longer skipped");
        }
        *self.total.entry(kind.to_string()).or_default() += appeared as u64;
        if !new.is_empty() {
            self.current.insert(kind.to_string(), new);
        }
        appeared
    }

    /// Objects of `kind` with a problem now.
    pub fn count(&self, kind: &str) -> usize {
        self.current.get(kind).map_or(0, BTreeMap::len)
    }

    /// Every current problem, in kind then name order.
    pub fn problems(&self) -> Vec<Problem> {
        self.current
            .iter()
            .flat_map(|(k, m)| m.iter().map(move |(n, msg)| Problem::new(k, n.clone(), msg.clone())))
            .collect()
    }

    pub fn report(&self) -> SkipReport {
        SkipReport { current: self.problems(), total: self.total.iter().map(|(k, n)| (k.clone(), *n)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_counted_once_until_it_changes_or_comes_back() {
        let mut s = Skips::default();
        let bad = |m: &str| vec![Problem::new("Node", "node-x", m)];
        assert_eq!(s.update("Node", bad("Node node-x: spec.podCIDR: overlaps")), 1);
        assert_eq!(s.update("Node", bad("Node node-x: spec.podCIDR: overlaps")), 0, "still the same problem");
        assert_eq!(s.update("Service", vec![Problem::new("Service", "a/b", "Service a/b: spec.clusterIP")]), 1);
        assert_eq!(s.update("Node", bad("Node node-x: spec.podCIDR: missing")), 1, "a new message");
        assert_eq!(s.count("Node"), 1);
        assert_eq!(s.update("Node", Vec::new()), 0);
        assert_eq!(s.count("Node"), 0);
        assert_eq!(s.update("Node", bad("Node node-x: spec.podCIDR: missing")), 1, "back again");
        let r = s.report();
        assert_eq!(r.total, vec![("Node".to_string(), 3), ("Service".to_string(), 1)]);
        assert_eq!(r.current.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["node-x", "a/b"]);
    }
}
