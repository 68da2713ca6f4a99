//! How far a room's messages went out to one connection, so that none goes
//! out twice and none from before its subscription. Shared by the session
//! (which sets the mark at each `ok`) and the hub (whose fan-out writes a
//! message straight to the socket when it can, and so decides then).

use std::sync::Arc;

use crate::broker::Position;

/// The offset (in an epoch) of the last message of a room the client was
/// sent, or was told of in an `ok`, or was replayed.
#[derive(Debug)]
pub struct SentUpTo {
    epoch: Arc<str>,
    offset: u64,
    /// Just subscribed (or replayed): live messages at or below the mark
    /// precede the subscription or were replayed, and are dropped, until the
    /// first one above it. Past that window every message goes out, so a
    /// room whose offsets went back (a broker that lost writes) is seen by
    /// the client, never dropped as duplicates.
    fresh: bool,
}

impl Default for SentUpTo {
    fn default() -> Self {
        Self::new()
    }
}

impl SentUpTo {
    /// Nothing sent yet: the first `ok` sets the mark (see [`Self::raise`]).
    pub fn new() -> Self {
        Self {
            epoch: Arc::from(""),
            offset: 0,
            fresh: true,
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    /// The client has the room's messages through `offset` (an `ok` or a
    /// replay): opens the window in which older live ones are dropped.
    pub fn raise(&mut self, epoch: &Arc<str>, offset: u64) {
        if same(&self.epoch, epoch) {
            self.offset = self.offset.max(offset);
        } else {
            self.epoch = epoch.clone();
            self.offset = offset;
        }
        self.fresh = true;
    }

    /// Whether a live message goes out; if so, it is the new mark.
    pub fn advance(&mut self, epoch: &Arc<str>, offset: u64) -> bool {
        if self.fresh {
            if same(&self.epoch, epoch) && offset <= self.offset {
                return false;
            }
            self.fresh = false;
        }
        // The hub hands every subscriber of a room the same `Arc` for an
        // epoch: once the mark holds it, the next comparisons are of
        // pointers, not of strings in memory the fan-out would not touch
        // otherwise.
        if !Arc::ptr_eq(&self.epoch, epoch) {
            self.epoch = epoch.clone();
        }
        self.offset = offset;
        true
    }
}

/// Whether two epochs are the same (the same `Arc` usually).
fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of `live` (epoch, offset) go out after an `ok` at (`e1`, 5).
    fn sent<'a>(live: &[(&'a str, u64)]) -> Vec<(&'a str, u64)> {
        let e1: Arc<str> = "e1".into();
        let mut s = SentUpTo::new();
        s.raise(&e1, 5);
        live.iter()
            .copied()
            .filter(|(e, o)| s.advance(&Arc::from(*e), *o))
            .collect()
    }

    #[test]
    fn what_goes_out_after_an_ok() {
        // What precedes the ok is dropped, what follows goes out.
        assert_eq!(sent(&[("e1", 4), ("e1", 5), ("e1", 6)]), [("e1", 6)]);
        // Past the window, offsets that go back are shown, not dropped.
        let back = [("e1", 6), ("e1", 3), ("e1", 4)];
        assert_eq!(sent(&back), back);
        // A new epoch goes out whatever its offsets.
        assert_eq!(sent(&[("e2", 1), ("e2", 2)]), [("e2", 1), ("e2", 2)]);
    }

    #[test]
    fn a_repeated_ok_reopens_the_window_at_the_highest_mark() {
        let e1: Arc<str> = "e1".into();
        let mut s = SentUpTo::new();
        s.raise(&e1, 5);
        assert!(s.advance(&e1, 6));
        s.raise(&e1, 3);
        assert_eq!(s.position().offset, 6);
        assert!(!s.advance(&e1, 6));
        assert!(s.advance(&e1, 7));
    }

    #[test]
    fn the_mark_takes_the_rooms_arc_and_an_equal_epoch_stays_the_same_epoch() {
        let from_ok: Arc<str> = "e1".into();
        let from_room: Arc<str> = "e1".into();
        let mut s = SentUpTo::new();
        s.raise(&from_ok, 5);
        // Another Arc with the same text is the same epoch: 5 precedes.
        assert!(!s.advance(&from_room, 5));
        assert!(s.advance(&from_room, 6));
        assert!(Arc::ptr_eq(&s.position().epoch, &from_room));
        assert!(s.advance(&from_room, 7));
        assert_eq!(s.position().offset, 7);
    }
}
