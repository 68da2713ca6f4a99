//! The tracker with a recording sink and an in-memory history.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use futures_util::FutureExt;

use super::*;

/// What the subscribers were handed: `(offset, lost)`, in order.
#[derive(Default)]
struct Sink(Mutex<Vec<(u64, bool)>>);

impl Deliver for Sink {
    fn deliver(&self, d: Delivery) {
        lock(&self.0).push((d.offset, false));
    }
    fn lost(&self, _: &RoomName, _: &Arc<str>, upto: u64) {
        lock(&self.0).push((upto, true));
    }
}

fn room() -> RoomName {
    RoomName::parse("r").unwrap()
}

fn msg(offset: u64) -> Delivery {
    Delivery {
        room: room(),
        offset,
        epoch: "e".into(),
        frame: format!("{{\"offset\":{offset}}}").into(),
        published_at_us: 0,
    }
}

fn setup() -> (Arc<Sink>, Tracker) {
    let sink = Arc::new(Sink::default());
    let tracker = Tracker::new(sink.clone(), Arc::new(Metrics::new()));
    tracker.baseline(&room(), Cursor::new("e", 0));
    (sink, tracker)
}

/// History keeping `kept` offsets of epoch `e`; `None` reads fail.
fn history(kept: Option<Vec<u64>>) -> ReadPage<String> {
    Arc::new(move |_room, after, limit, _bytes| {
        let page = kept.as_ref().map(|kept| History {
            epoch: "e".into(),
            last: kept.last().copied().unwrap_or(0),
            messages: kept
                .iter()
                .filter(|o| **o > after)
                .take(limit.min(2))
                .map(|o| msg(*o))
                .collect(),
            read: None,
        });
        std::future::ready(page.ok_or_else(|| "down".to_string())).boxed()
    })
}

fn got(sink: &Sink) -> Vec<(u64, bool)> {
    std::mem::take(&mut *lock(&sink.0))
}

#[test]
fn in_order_messages_go_straight_through_and_repeats_are_dropped() {
    let (sink, t) = setup();
    assert!(t.live(msg(1)).is_none());
    assert!(t.live(msg(2)).is_none());
    assert!(t.live(msg(2)).is_none());
    // A room the node does not track is delivered as it comes.
    let other = Delivery {
        room: RoomName::parse("other").unwrap(),
        ..msg(9)
    };
    assert!(t.live(other).is_none());
    assert_eq!(got(&sink), vec![(1, false), (2, false), (9, false)]);
    assert_eq!(t.cursor(&room()), Some(Cursor::new("e", 2)));
}

#[tokio::test]
async fn a_gap_holds_the_room_until_its_fill_hands_everything_over_in_order() {
    let (sink, t) = setup();
    t.live(msg(1));
    let job = t.live(msg(5)).unwrap();
    // Held behind the fill, not delivered.
    assert!(t.live(msg(6)).is_none());
    assert_eq!(got(&sink), vec![(1, false)]);
    t.fill(job, &history(Some(vec![1, 2, 3, 4, 5, 6])))
        .await
        .unwrap();
    assert_eq!(
        got(&sink),
        vec![(2, false), (3, false), (4, false), (5, false), (6, false)]
    );
    // The room is delivered directly again.
    assert!(t.live(msg(7)).is_none());
    assert_eq!(got(&sink), vec![(7, false)]);
}

#[tokio::test]
async fn what_history_lost_is_told_in_its_place() {
    let (sink, t) = setup();
    t.live(msg(1));
    got(&sink);
    let job = t.live(msg(6)).unwrap();
    t.fill(job, &history(Some(vec![4, 5, 6]))).await.unwrap();
    assert_eq!(
        got(&sink),
        vec![(3, true), (4, false), (5, false), (6, false)]
    );
}

#[tokio::test]
async fn a_failed_read_reports_the_gap_lost_and_live_messages_go_on() {
    let (sink, t) = setup();
    t.live(msg(1));
    got(&sink);
    let job = t.live(msg(4)).unwrap();
    t.fill(job, &history(None)).await.unwrap();
    assert_eq!(got(&sink), vec![(3, true), (4, false)]);
}

#[tokio::test]
async fn a_catch_up_that_cannot_read_keeps_the_cursor_for_the_next_try() {
    let (sink, t) = setup();
    t.live(msg(1));
    got(&sink);
    let job = t.resume(&room(), Cursor::new("e", 1), 4).unwrap();
    assert!(t.fill(job, &history(None)).await.is_err());
    assert_eq!(got(&sink), vec![]);
    assert_eq!(t.cursor(&room()), Some(Cursor::new("e", 1)));
    t.stop_fills();
    let job = t.resume(&room(), Cursor::new("e", 1), 4).unwrap();
    t.fill(job, &history(Some(vec![2, 3, 4]))).await.unwrap();
    assert_eq!(got(&sink), vec![(2, false), (3, false), (4, false)]);
    assert!(t.resume(&room(), Cursor::new("e", 4), 4).is_none());
}

#[tokio::test]
async fn live_messages_past_the_hold_limit_are_read_from_history() {
    let (sink, t) = setup();
    let last = 2 + MAX_HELD as u64 + 10;
    let job = t.live(msg(2)).unwrap();
    for offset in 3..=last {
        assert!(t.live(msg(offset)).is_none());
    }
    t.fill(job, &history(Some((1..=last).collect())))
        .await
        .unwrap();
    let offsets: Vec<u64> = got(&sink).into_iter().map(|(o, _)| o).collect();
    assert_eq!(offsets, (1..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stopped_fill_delivers_nothing_more() {
    let (sink, t) = setup();
    let job = t.live(msg(3)).unwrap();
    t.stop_fills();
    t.fill(job, &history(Some(vec![1, 2, 3]))).await.unwrap();
    assert_eq!(got(&sink), vec![]);
    // Forgotten rooms too.
    let job = t.resume(&room(), Cursor::new("e", 0), 3).unwrap();
    t.forget(&room());
    t.fill(job, &history(Some(vec![1, 2, 3]))).await.unwrap();
    assert_eq!(got(&sink), vec![]);
}

#[test]
fn a_resume_with_nothing_to_catch_up_lets_live_messages_through() {
    let (sink, t) = setup();
    t.live(msg(1));
    // A gap opened, but the link ended before its fill ran; after the
    // reconnect there is nothing to catch up.
    assert!(t.live(msg(3)).is_some());
    t.stop_fills();
    assert!(t.resume(&room(), Cursor::new("e", 3), 3).is_none());
    t.live(msg(4));
    assert_eq!(got(&sink), vec![(1, false), (4, false)]);
}
