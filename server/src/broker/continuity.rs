//! Offset continuity: which messages of a room a node hands to its
//! subscribers, which it drops, which it must first read from history, and
//! which it tells them are lost. Pure functions of *what was seen* and *what
//! arrived*, with no I/O, shared by every broker that keeps a history.
//!
//! A room's messages carry an epoch and an offset that grows by exactly one
//! per message within the epoch. A node with history (durable delivery)
//! remembers, per room it serves, the last position it handed over (a
//! [`Cursor`]) and keeps its subscribers' feed gap-free and duplicate-free:
//! - a live message at the next offset is delivered; one at or before the
//!   cursor was already delivered (by a fill) and is dropped; one past the
//!   next offset is held back while the offsets it skipped are read from
//!   history ([`live`]);
//! - a fill reads history page by page; what history no longer keeps (trimmed,
//!   or dropped with an epoch change) is reported lost in its place ([`Fill`]);
//! - after the node's link to the bus came back, the bus is asked whether it
//!   still has every offset this node saw acknowledged or delivered; the
//!   answer says whether the room's epoch was reset and from where the node
//!   catches up ([`resume`]).
//!
//! Two rules must be atomic with the bus's own counter, so the bus runs
//! them (for Redis, the Lua scripts of `broker::redis::scripts`, whose tests
//! check them against the functions here): the **epoch check**
//! ([`lacks_acknowledged`]: a master that lacks acknowledged offsets of an
//! epoch gives the room a new epoch, once, however many nodes ask) and,
//! without history, the **fence** ([`starts_new_epoch`]: a room whose epoch
//! began under another master process starts a new epoch, since its counter
//! may have gone back). [`resume`] decides what a node does with the
//! check's answer.

use std::sync::Arc;

/// A position in a room's sequence: the last offset handed over (delivered,
/// or told lost) in an epoch. Offset 0 means nothing yet; an empty epoch
/// means the room had none yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: Arc<str>,
    pub offset: u64,
}

impl Cursor {
    pub fn new(epoch: impl Into<Arc<str>>, offset: u64) -> Self {
        Self {
            epoch: epoch.into(),
            offset,
        }
    }

    /// Moves to `offset` of `epoch`: forward within the same epoch (never
    /// back), or to the other epoch's position outright.
    pub fn advance(&mut self, epoch: &Arc<str>, offset: u64) {
        if self.epoch == *epoch {
            self.offset = self.offset.max(offset);
        } else {
            *self = Cursor::new(epoch.clone(), offset);
        }
    }
}

/// What to do with a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// The next one (or the first of another epoch, or of a room this node
    /// does not track): hand it over.
    Deliver,
    /// At or before the cursor: it was handed over already; drop it.
    Duplicate,
    /// Offsets `from..=to` were skipped: read them from history first, then
    /// hand this one over.
    Gap { from: u64, to: u64 },
}

/// The rule for a live message at `offset` of `epoch`, given the room's
/// cursor (`None`: the room is not tracked).
pub fn live(cursor: Option<&Cursor>, epoch: &str, offset: u64) -> Live {
    match cursor {
        Some(c) if &*c.epoch == epoch => {
            if offset <= c.offset {
                Live::Duplicate
            } else if offset > c.offset + 1 {
                Live::Gap {
                    from: c.offset + 1,
                    to: offset - 1,
                }
            } else {
                Live::Deliver
            }
        }
        _ => Live::Deliver,
    }
}

/// Filling offsets `from..=upto` of one epoch from history, a page at a time:
/// [`want`](Fill::want) says what to read next, [`page`](Fill::page) what to
/// do with what was read, [`finish`](Fill::finish) what is left lost when
/// reading stops (history exhausted, the epoch changed, or a read failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    epoch: Arc<str>,
    /// The next offset to hand over.
    next: u64,
    upto: u64,
    /// History has nothing more of the range (or changed epoch).
    exhausted: bool,
}

/// One step of a fill, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Hand over the page's message at this index.
    Deliver(usize),
    /// Offsets `from..=to` are not kept: tell the subscribers in their place.
    Lost { from: u64, to: u64 },
}

impl Fill {
    /// Fills what follows `cursor` up to `upto`.
    pub fn new(cursor: &Cursor, upto: u64) -> Self {
        Self {
            epoch: cursor.epoch.clone(),
            next: cursor.offset + 1,
            upto,
            exhausted: false,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The last offset this fill hands over.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// What to read next: the offset to read after and how many messages at
    /// most; `None` once the fill has nothing more to read.
    pub fn want(&self) -> Option<(u64, usize)> {
        (!self.exhausted && self.next <= self.upto).then(|| {
            (
                self.next - 1,
                usize::try_from(self.upto + 1 - self.next).unwrap_or(usize::MAX),
            )
        })
    }

    /// A page read after [`want`](Fill::want): its epoch and its messages'
    /// offsets, ascending. A page of another epoch, or one that brings
    /// nothing of the range, ends the reading.
    pub fn page(&mut self, epoch: &str, offsets: &[u64]) -> Vec<Step> {
        let mut steps = Vec::new();
        if epoch != &*self.epoch {
            self.exhausted = true;
            return steps;
        }
        let before = self.next;
        for (i, &offset) in offsets.iter().enumerate() {
            if offset > self.upto {
                break;
            }
            if offset < self.next {
                continue;
            }
            if offset > self.next {
                steps.push(Step::Lost {
                    from: self.next,
                    to: offset - 1,
                });
            }
            steps.push(Step::Deliver(i));
            self.next = offset + 1;
        }
        if self.next == before {
            self.exhausted = true;
        }
        steps
    }

    /// Reading stopped: the offsets of the range not handed over, if any,
    /// are lost.
    pub fn finish(self) -> Option<(u64, u64)> {
        (self.next <= self.upto).then_some((self.next, self.upto))
    }
}

/// What the bus answered, after the node's link came back, about a room this
/// node knows (the epoch check): whether it reset the room's epoch because it
/// lacks offsets this node saw, the room's last offset, and its epoch (empty:
/// the bus does not know the room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub reset: bool,
    pub last: u64,
    pub epoch: Arc<str>,
}

/// How a room this node delivered resumes after the epoch check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The node does not deliver the room (it only published there).
    Untracked,
    /// The bus lost acknowledged messages and gave the room a new epoch:
    /// continue from here, nothing to catch up (the new epoch starts after
    /// the bus's last offset).
    Reset(Cursor),
    /// Continue from `from`, catching up to `upto` from history when it is
    /// further on.
    From { from: Cursor, upto: u64 },
}

/// The rule for a room after the epoch check, given its cursor (`None`: not
/// delivered by this node).
pub fn resume(cursor: Option<&Cursor>, check: &Check) -> Resume {
    let Some(mine) = cursor else {
        return Resume::Untracked;
    };
    if check.reset {
        return Resume::Reset(Cursor::new(check.epoch.clone(), check.last));
    }
    if check.epoch.is_empty() {
        // The room is gone: its next message starts a new epoch, all of
        // which is new to this node's subscribers.
        return Resume::From {
            from: Cursor::new(check.epoch.clone(), 0),
            upto: 0,
        };
    }
    if check.epoch != mine.epoch {
        // A new epoch began while this node was away: its subscribers have
        // seen none of it yet.
        return Resume::From {
            from: Cursor::new(check.epoch.clone(), 0),
            upto: check.last,
        };
    }
    Resume::From {
        from: mine.clone(),
        upto: check.last,
    }
}

/// The fence rule, run by the bus with every publish and position read: a
/// room starts a new epoch when it has none, or (`master_fence` not empty:
/// no history) when its epoch began under another fence than the master's.
pub fn starts_new_epoch(has_epoch: bool, room_fence: Option<&str>, master_fence: &str) -> bool {
    !has_epoch || (!master_fence.is_empty() && room_fence != Some(master_fence))
}

/// The epoch check's rule, run by the bus for each room a reconnecting node
/// saw: the bus's position (`None`: it does not know the room) lacks offsets
/// the node saw acknowledged or delivered in the same epoch.
pub fn lacks_acknowledged(bus: Option<&Cursor>, seen: &Cursor) -> bool {
    bus.is_some_and(|bus| bus.epoch == seen.epoch && bus.offset < seen.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: u64) -> Cursor {
        Cursor::new(epoch, offset)
    }

    #[test]
    fn live_messages_are_delivered_dropped_or_wait_for_a_fill() {
        let c = at("e1", 5);
        let table = [
            (Some(&c), "e1", 6, Live::Deliver),
            (Some(&c), "e1", 5, Live::Duplicate),
            (Some(&c), "e1", 2, Live::Duplicate),
            (Some(&c), "e1", 9, Live::Gap { from: 6, to: 8 }),
            (Some(&c), "e1", 7, Live::Gap { from: 6, to: 6 }),
            // Another epoch: whatever its offset, it is news.
            (Some(&c), "e2", 1, Live::Deliver),
            (Some(&c), "e2", 40, Live::Deliver),
            // Untracked rooms are delivered as they come.
            (None, "e1", 40, Live::Deliver),
        ];
        for (cursor, epoch, offset, want) in table {
            assert_eq!(
                live(cursor, epoch, offset),
                want,
                "{cursor:?} {epoch} {offset}"
            );
        }
        // A room subscribed before its first message: no epoch yet.
        assert_eq!(live(Some(&at("", 0)), "e1", 3), Live::Deliver);
    }

    #[test]
    fn cursors_only_move_forward_within_an_epoch() {
        let mut c = at("e1", 5);
        c.advance(&"e1".into(), 3);
        assert_eq!(c, at("e1", 5));
        c.advance(&"e1".into(), 8);
        assert_eq!(c, at("e1", 8));
        c.advance(&"e2".into(), 2);
        assert_eq!(c, at("e2", 2));
    }

    #[test]
    fn a_fully_kept_range_is_delivered_page_by_page() {
        let mut f = Fill::new(&at("e", 3), 8);
        assert_eq!(f.want(), Some((3, 5)));
        assert_eq!(
            f.page("e", &[4, 5]),
            vec![Step::Deliver(0), Step::Deliver(1)]
        );
        assert_eq!(f.want(), Some((5, 3)));
        // Past `upto` is left to the live feed.
        assert_eq!(
            f.page("e", &[6, 7, 8, 9]),
            vec![Step::Deliver(0), Step::Deliver(1), Step::Deliver(2)]
        );
        assert_eq!(f.want(), None);
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn holes_and_trimmed_starts_are_reported_lost_in_place() {
        let mut f = Fill::new(&at("e", 0), 10);
        // History was trimmed up to 3, and 6 is missing.
        assert_eq!(
            f.page("e", &[4, 5, 7]),
            vec![
                Step::Lost { from: 1, to: 3 },
                Step::Deliver(0),
                Step::Deliver(1),
                Step::Lost { from: 6, to: 6 },
                Step::Deliver(2),
            ]
        );
        // Nothing more is kept: the rest is lost.
        assert_eq!(f.page("e", &[]), vec![]);
        assert_eq!(f.want(), None);
        assert_eq!(f.finish(), Some((8, 10)));
    }

    #[test]
    fn another_epoch_in_history_ends_the_fill() {
        let mut f = Fill::new(&at("e", 2), 5);
        assert_eq!(f.page("other", &[3, 4, 5]), vec![]);
        assert_eq!(f.want(), None);
        assert_eq!(f.finish(), Some((3, 5)));
    }

    #[test]
    fn a_failed_read_leaves_the_rest_of_the_range() {
        let mut f = Fill::new(&at("e", 2), 9);
        f.page("e", &[3, 4]);
        // The caller stops reading (the read failed): 5..=9 are left.
        assert_eq!(f.finish(), Some((5, 9)));
    }

    #[test]
    fn the_bus_side_rules_reset_epochs_only_when_counters_may_have_gone_back() {
        // Fence: no epoch yet, or begun under another master process.
        assert!(starts_new_epoch(false, None, ""));
        assert!(!starts_new_epoch(true, Some(""), ""));
        assert!(!starts_new_epoch(true, Some("f1"), "f1"));
        assert!(starts_new_epoch(true, Some("f0"), "f1"));
        assert!(starts_new_epoch(true, None, "f1"));
        // Epoch check: only a same-epoch counter below what was seen.
        let seen = at("e1", 10);
        assert!(lacks_acknowledged(Some(&at("e1", 7)), &seen));
        assert!(!lacks_acknowledged(Some(&at("e1", 10)), &seen));
        assert!(!lacks_acknowledged(Some(&at("e2", 3)), &seen));
        assert!(!lacks_acknowledged(None, &seen));
    }

    #[test]
    fn after_a_reconnect_rooms_resume_reset_or_catch_up() {
        let mine = at("e1", 10);
        let check = |reset, last, epoch: &str| Check {
            reset,
            last,
            epoch: epoch.into(),
        };
        let table = [
            // Not delivered here: nothing to do.
            (None, check(false, 12, "e1"), Resume::Untracked),
            // The master lacked offsets this node saw: new epoch, from its last.
            (
                Some(&mine),
                check(true, 7, "e2"),
                Resume::Reset(at("e2", 7)),
            ),
            // Behind: catch up.
            (
                Some(&mine),
                check(false, 15, "e1"),
                Resume::From {
                    from: mine.clone(),
                    upto: 15,
                },
            ),
            // Up to date.
            (
                Some(&mine),
                check(false, 10, "e1"),
                Resume::From {
                    from: mine.clone(),
                    upto: 10,
                },
            ),
            // A new epoch began meanwhile: all of it is news.
            (
                Some(&mine),
                check(false, 4, "e3"),
                Resume::From {
                    from: at("e3", 0),
                    upto: 4,
                },
            ),
            // The room is gone: its next message starts a new epoch.
            (
                Some(&mine),
                check(false, 0, ""),
                Resume::From {
                    from: at("", 0),
                    upto: 0,
                },
            ),
        ];
        for (cursor, check, want) in table {
            assert_eq!(resume(cursor, &check), want, "{cursor:?} {check:?}");
        }
    }
}
