//! Handshake counters per Service endpoint ([`BackendCounters`]), kept while the endpoint is in
//! the tables: endpoints come and go (rollouts, autoscaling), and a map that only grows would
//! hold every endpoint ever seen, and the metrics a series for each.
//!
//! Contract:
//! - An endpoint's counters are created when a flow to it first counts something (a SYN, a
//!   handshake event, a flow expiring) and stay visible while the frontend it was last counted
//!   through still leads to it in the current tables ([`ServicePort::has_endpoint`]: any
//!   endpoint of the Service port, ready or not).
//! - [`BackendTable::prune`] removes the counters of endpoints that are gone, a few entries per
//!   call (a hand moving over the entries, one frontend lookup and one binary search each), so
//!   the table stays the size of the current endpoint set without ever being scanned at once.
//!   Counters of an endpoint that is gone but still has flows come back (from zero) while those
//!   flows count something, and go again.
//! - Counting touches one hash map lookup, on SYNs, SYN|ACKs and expiries only (not per
//!   packet); an entry is allocated once per endpoint.
//!
//! [`ServicePort::has_endpoint`]: crate::nat::service::ServicePort::has_endpoint

use super::BackendCounters;
use crate::tables::Tables;
use core::net::Ipv4Addr;

/// An endpoint: address and port.
pub type EndpointKey = (Ipv4Addr, u16);
/// A frontend: protocol, address, port (for a NodePort: a node address and the node port).
pub type FrontendKey = (u8, Ipv4Addr, u16);

#[derive(Debug, Clone, Copy)]
struct Entry {
    endpoint: EndpointKey,
    frontend: FrontendKey,
    counters: BackendCounters,
}

/// Counters per Service endpoint (module docs).
#[derive(Debug, Default)]
pub struct BackendTable {
    index: ahash::AHashMap<EndpointKey, u32>,
    entries: Vec<Entry>,
    /// The next entry `prune` looks at.
    hand: usize,
}

impl BackendTable {
    /// The counters of `endpoint`, reached through `frontend` (created if need be).
    #[inline]
    pub fn entry(&mut self, endpoint: EndpointKey, frontend: FrontendKey) -> &mut BackendCounters {
        let i = match self.index.get(&endpoint) {
            Some(&i) => i as usize,
            None => {
                self.index.insert(endpoint, self.entries.len() as u32);
                self.entries.push(Entry { endpoint, frontend, counters: BackendCounters::default() });
                self.entries.len() - 1
            }
        };
        let e = &mut self.entries[i];
        e.frontend = frontend;
        &mut e.counters
    }

    pub fn get(&self, endpoint: &EndpointKey) -> Option<&BackendCounters> {
        self.index.get(endpoint).map(|&i| &self.entries[i as usize].counters)
    }

    pub fn contains(&self, endpoint: &EndpointKey) -> bool {
        self.index.contains_key(endpoint)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every endpoint with its counters.
    pub fn iter(&self) -> impl Iterator<Item = (&EndpointKey, &BackendCounters)> {
        self.entries.iter().map(|e| (&e.endpoint, &e.counters))
    }

    /// Looks at up to `budget` entries and removes those whose endpoint the frontend they were
    /// counted through no longer leads to in `tables`; returns how many were removed.
    pub fn prune(&mut self, tables: &Tables, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.entries.len()) {
            if self.entries.is_empty() {
                break;
            }
            if self.hand >= self.entries.len() {
                self.hand = 0;
            }
            let e = self.entries[self.hand];
            let (proto, ip, port) = e.frontend;
            let current = tables
                .services()
                .lookup(proto, ip, port, tables.is_node_port_addr(ip))
                .is_some_and(|(sp, _)| sp.has_endpoint(e.endpoint.0, e.endpoint.1));
            if current {
                self.hand += 1;
            } else {
                // Swap-remove: the last entry takes this place (and is looked at next).
                self.index.remove(&e.endpoint);
                self.entries.swap_remove(self.hand);
                if let Some(moved) = self.entries.get(self.hand) {
                    self.index.insert(moved.endpoint, self.hand as u32);
                }
                removed += 1;
            }
        }
        removed
    }
}
