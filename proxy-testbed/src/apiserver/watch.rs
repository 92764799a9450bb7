//! Watch responses: newline-separated JSON events, streamed until the timeout, an expiry, or the
//! connection's end.
//!
//! Order on the stream: the backlog (the synthetic ADDED events of the current state, or the
//! replay of the history after the requested resourceVersion), the initial-events-end BOOKMARK if
//! asked for, then live events and periodic BOOKMARKs. Every event goes through the request's
//! filter, with the real server's rule for objects that cross it: a MODIFIED object that stopped
//! matching is sent as DELETED, one that began to match as ADDED.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::Shared;
use super::request::WatchRequest;
use super::resource::Kind;
use super::selectors::Filter;
use super::status::ApiError;
use super::store::{Change, Delivery, Event, Start, TooOld};

/// The event stream for a watch of `kind` on a connection of `epoch`.
pub(crate) fn watch(
    shared: Arc<Shared>,
    epoch: u64,
    kind: Kind,
    request: WatchRequest,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let subscription = {
        let mut store = shared.store();
        // Checked with the store locked, as restart() and refuse_connections() hold it while they
        // disconnect the watches and move the epoch: no watch may start on a connection they drop.
        if shared.control.borrow().epoch != epoch {
            return futures::stream::pending().left_stream();
        }
        store.subscribe(kind, request.start)
    };
    let bookmark_interval = shared.bookmark_interval();
    let mut watch = Watch {
        shared,
        kind,
        filter: request.filter,
        cursor: 0,
        queue: VecDeque::new(),
        live: None,
        bookmarks: None,
        deadline: Instant::now() + request.timeout,
    };
    match subscription {
        Ok(subscription) => {
            match request.start {
                Start::State => subscription.backlog.iter().for_each(|e| watch.send(e)),
                Start::Now => {}
                Start::After(rv) => {
                    watch.cursor = rv;
                    subscription.backlog.iter().for_each(|e| watch.deliver(e));
                }
            }
            watch.cursor = watch.cursor.max(subscription.rv);
            if request.initial_events_end {
                watch.bookmark(watch.cursor, true);
            }
            watch.live = Some(subscription.live);
            if request.bookmarks {
                let mut interval =
                    tokio::time::interval_at(Instant::now() + bookmark_interval, bookmark_interval);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                watch.bookmarks = Some(interval);
            }
        }
        Err(TooOld {
            requested,
            compacted,
        }) => {
            watch.error(&ApiError::expired(format!(
                "too old resource version: {requested} ({compacted})"
            )));
        }
    }
    futures::stream::unfold(watch, |mut watch| async move {
        let line = watch.next_line().await?;
        Some((line, watch))
    })
    .right_stream()
}

struct Watch {
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    /// The highest resourceVersion this watch has dealt with.
    cursor: u64,
    /// Lines ready to send.
    queue: VecDeque<Bytes>,
    /// `None` once the stream is to end when `queue` is empty.
    live: Option<UnboundedReceiver<Delivery>>,
    bookmarks: Option<Interval>,
    deadline: Instant,
}

/// What woke a waiting watch.
enum Wake {
    Delivery(Option<Delivery>),
    Bookmark,
    Timeout,
}

impl Watch {
    /// The next line to send, or `None` to end the response.
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if self.shared.stalled.load(Ordering::Relaxed) {
                // A dead peer: nothing more, ever, not even the end of the response. The
                // subscription goes, so changes stop queueing up for a stream that will not send.
                return self.hang().await;
            }
            if let Some(line) = self.queue.pop_front() {
                return Some(line);
            }
            let live = self.live.as_mut()?;
            let wake = tokio::select! {
                delivery = live.recv() => Wake::Delivery(delivery),
                () = tick(&mut self.bookmarks) => Wake::Bookmark,
                () = tokio::time::sleep_until(self.deadline) => Wake::Timeout,
            };
            match wake {
                Wake::Delivery(Some(Delivery::Event(event))) => self.deliver(&event),
                Wake::Delivery(Some(Delivery::Expire)) => self.expire(),
                // The store disconnected this watch: its connection is being dropped.
                Wake::Delivery(None) => return self.hang().await,
                Wake::Bookmark => self.periodic_bookmark(),
                Wake::Timeout => self.live = None,
            }
        }
    }

    /// Sends nothing more, until the connection is dropped.
    async fn hang(&mut self) -> Option<Bytes> {
        self.live = None;
        std::future::pending().await
    }

    /// A live or replayed event: sent unless this watch is already past it.
    fn deliver(&mut self, event: &Event) {
        if event.rv > self.cursor {
            self.cursor = event.rv;
            self.send(event);
        }
    }

    /// Queues `event` as this watch's filter sees it.
    fn send(&mut self, event: &Event) {
        let matches = self.filter.matches(&event.object);
        let change = match event.change {
            Change::Added | Change::Deleted if matches => event.change,
            Change::Modified => {
                let matched = event
                    .previous
                    .as_ref()
                    .is_some_and(|previous| self.filter.matches(previous));
                match (matched, matches) {
                    (true, true) => Change::Modified,
                    (false, true) => Change::Added,
                    (true, false) => Change::Deleted,
                    (false, false) => return,
                }
            }
            Change::Added | Change::Deleted => return,
        };
        self.push(change.as_str(), &event.object);
    }

    /// A BOOKMARK at the current resourceVersion, after whatever is still on its way.
    fn periodic_bookmark(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let (pending, rv) = self.shared.store().catch_up(live);
        for delivery in pending {
            match delivery {
                Delivery::Event(event) => self.deliver(&event),
                Delivery::Expire => return self.expire(),
            }
        }
        self.cursor = self.cursor.max(rv);
        self.bookmark(self.cursor, false);
    }

    fn bookmark(&mut self, rv: u64, initial_events_end: bool) {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({
            "kind": self.kind.name(),
            "apiVersion": self.kind.api_version(),
            "metadata": metadata,
        });
        self.push("BOOKMARK", &object);
    }

    /// The mid-watch 410 the real server sends when a watcher falls out of its window.
    fn expire(&mut self) {
        self.error(&ApiError::expired(
            "The resourceVersion for the provided watch is too old.",
        ));
    }

    /// An ERROR event, after which the stream ends.
    fn error(&mut self, error: &ApiError) {
        self.push("ERROR", &error.to_status());
        self.live = None;
    }

    fn push(&mut self, event_type: &str, object: &Value) {
        self.queue.push_back(Bytes::from(format!(
            "{{\"type\":\"{event_type}\",\"object\":{object}}}\n"
        )));
    }
}

/// The next bookmark time, or never when bookmarks are off.
async fn tick(bookmarks: &mut Option<Interval>) {
    match bookmarks {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
