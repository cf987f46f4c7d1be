//! Fragments of translated datagrams (issue 18): what the first fragment's translation was, for
//! the fragments after it.
//!
//! netfilter reassembles a fragmented datagram before NAT (`nf_defrag_ipv4`) and fragments it
//! again on the way out; vxnat translates each fragment in place instead, which needs no
//! buffer. The first fragment carries the ports: it goes through conntrack as any packet does,
//! and its rewrite (the new source and destination addresses, the direction, where a reply to
//! a client outside goes) is remembered here under the key every fragment of the datagram
//! shares as it arrives: source, destination, protocol and IP identification (RFC 791). The
//! later fragments carry no ports; they take the same address rewrite from here. The UDP
//! checksum, in the first fragment, covers the whole datagram: the incremental update made
//! there for the new addresses and ports holds for the reassembled datagram, and the later
//! fragments carry no checksum to update.
//!
//! Contract:
//! - O(1), fixed memory: direct-mapped, [`ENTRIES`] entries of 40 bytes, the slot chosen by a
//!   per-table random seed (so spoofed fragments cannot be aimed at one datagram's entry);
//!   a collision replaces the older entry.
//! - An entry lives [`TIMEOUT_NS`] (Linux's `ipfrag_time`) or until replaced.
//! - A later fragment with no entry (it arrived before its first fragment, or its entry was
//!   replaced or expired; or it is not Service traffic at all, as most are not) is not
//!   translated: the caller lets it go untouched (for a Service datagram, the receiver cannot
//!   reassemble it and discards it after its own timeout, as it would a datagram missing a
//!   fragment). Out-of-order arrival of the first fragment is the case this
//!   does not cover, where netfilter, which buffers, would.

use crate::conntrack::Dir;
use crate::wire::MacAddr;
use core::net::Ipv4Addr;

/// Datagrams remembered at once, per worker.
pub const ENTRIES: usize = 1024;
/// How long a first fragment's translation is kept (Linux's `ipfrag_time`, 30 s).
pub const TIMEOUT_NS: u64 = 30 * 1_000_000_000;

/// What every fragment of one datagram carries as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ident: u16,
}

/// The first fragment's rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragNat {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dir: Dir,
    /// For a reply to a client outside the cluster: the MAC it goes back to by the uplink.
    pub uplink_return: Option<MacAddr>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: FragKey,
    nat: FragNat,
    expires_at: u64,
}

/// The table (module docs).
#[derive(Debug)]
pub struct Fragments {
    entries: Box<[Option<Entry>]>,
    hasher: ahash::RandomState,
}

impl Default for Fragments {
    fn default() -> Fragments {
        Fragments { entries: vec![None; ENTRIES].into_boxed_slice(), hasher: ahash::RandomState::new() }
    }
}

impl Fragments {
    #[inline]
    fn slot(&self, key: &FragKey) -> usize {
        self.hasher.hash_one(key) as usize % ENTRIES
    }

    /// The first fragment of the datagram `key` was translated as `nat` at `now`.
    pub fn remember(&mut self, key: FragKey, nat: FragNat, now: u64) {
        let i = self.slot(&key);
        self.entries[i] = Some(Entry { key, nat, expires_at: now.saturating_add(TIMEOUT_NS) });
    }

    /// The rewrite for a later fragment of the datagram `key`, if its first was translated
    /// within [`TIMEOUT_NS`] and is still remembered.
    #[inline]
    pub fn lookup(&self, key: &FragKey, now: u64) -> Option<FragNat> {
        match self.entries[self.slot(key)] {
            Some(e) if e.key == *key && e.expires_at > now => Some(e.nat),
            _ => None,
        }
    }

    /// Bytes this table holds.
    pub fn memory(&self) -> usize {
        ENTRIES * core::mem::size_of::<Option<Entry>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(ident: u16) -> FragKey {
        FragKey { src: Ipv4Addr::new(10, 244, 0, 2), dst: Ipv4Addr::new(10, 96, 0, 53), proto: 17, ident }
    }

    fn nat(last: u8) -> FragNat {
        FragNat {
            src: Ipv4Addr::new(10, 244, 0, 2),
            dst: Ipv4Addr::new(10, 244, 1, last),
            dir: Dir::Orig,
            uplink_return: None,
        }
    }

    #[test]
    fn a_remembered_first_fragment_translates_its_later_ones_until_the_timeout() {
        let mut f = Fragments::default();
        f.remember(key(7), nat(2), S);
        assert_eq!(f.lookup(&key(7), 2 * S), Some(nat(2)));
        assert_eq!(f.lookup(&key(8), 2 * S), None, "another datagram");
        assert_eq!(f.lookup(&FragKey { proto: 6, ..key(7) }, 2 * S), None, "another protocol");
        assert_eq!(f.lookup(&key(7), S + TIMEOUT_NS), None, "expired");
        // A new datagram with the same identification (after wrapping) replaces it.
        f.remember(key(7), nat(3), 40 * S);
        assert_eq!(f.lookup(&key(7), 41 * S), Some(nat(3)));
    }

    #[test]
    fn memory_is_fixed_and_a_flood_only_replaces_entries() {
        let mut f = Fragments::default();
        for i in 0..100_000u32 {
            f.remember(key(i as u16), nat(2), S);
        }
        assert!(f.memory() <= 40 * ENTRIES, "{}", f.memory());
        let live = (0..=u16::MAX).filter(|&i| f.lookup(&key(i), 2 * S).is_some()).count();
        assert!(live <= ENTRIES);
    }
}
