//! Which conntrack slots changed since they were last written out (for a process that keeps
//! its flows in a file to survive restarts).
//!
//! Contract: `mark` is O(1) and allocation-free (the list is reserved for every slot up
//! front); a slot marked any number of times between two drains is handed out once; `drain`
//! hands out slots in the order they were first marked and leaves the journal empty.

#[derive(Debug)]
pub(super) struct Journal {
    /// One bit per slot: already listed in `dirty`.
    listed: Vec<u64>,
    dirty: Vec<u32>,
    /// Flows that left the table with their SNAT tuple still held (`ConnTrack::retire`).
    pub(super) retired: Vec<super::Flow>,
}

impl Journal {
    pub(super) fn new(slots: usize) -> Journal {
        Journal {
            listed: vec![0; slots.div_ceil(64)],
            dirty: Vec::with_capacity(slots),
            retired: Vec::with_capacity(256),
        }
    }

    #[inline]
    pub(super) fn mark(&mut self, slot: u32) {
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if let Some(w) = self.listed.get_mut(word) {
            if *w & bit == 0 {
                *w |= bit;
                self.dirty.push(slot);
            }
        }
    }

    pub(super) fn drain(&mut self, mut f: impl FnMut(u32)) {
        for &slot in &self.dirty {
            if let Some(w) = self.listed.get_mut(slot as usize / 64) {
                *w &= !(1u64 << (slot % 64));
            }
            f(slot);
        }
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_marked_slot_is_drained_once_in_first_marked_order() {
        let mut j = Journal::new(130);
        for s in [5, 129, 5, 0, 129, 64, 200] {
            j.mark(s);
        }
        let mut seen = Vec::new();
        j.drain(|s| seen.push(s));
        assert_eq!(seen, [5, 129, 0, 64]);
        j.drain(|s| seen.push(s));
        assert_eq!(seen.len(), 4, "drained twice");
        j.mark(5);
        j.drain(|s| seen.push(s));
        assert_eq!(seen, [5, 129, 0, 64, 5]);
    }
}
