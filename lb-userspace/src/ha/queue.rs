//! The master's sending queue: flow changes and refresh records on their
//! way to the sync socket, bounded.
//!
//! Two lanes, both bounded. Flow changes (new, ended) are queued by the
//! controller's actor and the flow-event task and must never wait: `try_send` drops a change when
//! its lane is full (the caller counts it; the next refresh heals it).
//! Refresh records come from a thread of their own, which waits while its
//! lane is full (`send_refresh`): a big table is paced by the socket
//! instead of dropped. The sending side takes flow changes first.

use tokio::sync::mpsc::{
    self,
    error::{TryRecvError, TrySendError},
};

use super::{EVENT_QUEUE, REFRESH_QUEUE, Record};

/// A queue of `EVENT_QUEUE` flow changes and `REFRESH_QUEUE` refresh records.
pub fn queue() -> (QueueTx, QueueRx) {
    with_capacity(EVENT_QUEUE, REFRESH_QUEUE)
}

pub fn with_capacity(events: usize, refresh: usize) -> (QueueTx, QueueRx) {
    let (etx, erx) = mpsc::channel(events.max(1));
    let (rtx, rrx) = mpsc::channel(refresh.max(1));
    (QueueTx { events: etx, refresh: rtx }, QueueRx { events: erx, refresh: rrx })
}

/// Why a record was not queued (and is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Its lane is full.
    Full,
    /// The sending task is gone.
    Closed,
}

/// Where records are queued (cloned for each producer).
#[derive(Clone, Debug)]
pub struct QueueTx {
    events: mpsc::Sender<Record>,
    refresh: mpsc::Sender<Record>,
}

impl QueueTx {
    /// Queues a flow change without waiting; fails (and drops it) when its
    /// lane is full or the sending task is gone.
    pub fn try_send(&self, r: Record) -> Result<(), QueueError> {
        self.events.try_send(r).map_err(|e| match e {
            TrySendError::Full(_) => QueueError::Full,
            TrySendError::Closed(_) => QueueError::Closed,
        })
    }

    /// Queues a refresh record, waiting while its lane is full; fails when
    /// the sending task is gone.
    pub async fn send_refresh(&self, r: Record) -> Result<(), QueueError> {
        self.refresh.send(r).await.map_err(|_| QueueError::Closed)
    }

    /// As [`QueueTx::send_refresh`], from a plain thread (the refresher
    /// walks the table on one).
    pub fn send_refresh_blocking(&self, r: Record) -> Result<(), QueueError> {
        self.refresh.blocking_send(r).map_err(|_| QueueError::Closed)
    }
}

/// What the sending task reads.
#[derive(Debug)]
pub struct QueueRx {
    events: mpsc::Receiver<Record>,
    refresh: mpsc::Receiver<Record>,
}

impl QueueRx {
    /// The next record, flow changes first; none once every sender is gone
    /// and both lanes are empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Record> {
        tokio::select! {
            biased;
            Some(r) = self.events.recv() => Some(r),
            Some(r) = self.refresh.recv() => Some(r),
            else => None,
        }
    }

    /// A queued record if there is one, flow changes first.
    pub fn try_recv(&mut self) -> Result<Record, TryRecvError> {
        self.events.try_recv().or_else(|_| self.refresh.try_recv())
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.refresh.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lb_common::maps::FlowEnd;

    use super::*;
    use crate::ha::Kind;

    fn rec(n: u32) -> Record {
        let flow = FlowEnd { reason: n, ..Default::default() };
        Record { kind: Kind::Live, idle: Duration::ZERO, flow }
    }

    #[tokio::test]
    async fn flow_changes_are_bounded_and_go_first_refreshes_wait() {
        let (tx, mut rx) = with_capacity(2, 2);
        assert!(tx.try_send(rec(1)).is_ok());
        assert!(tx.try_send(rec(2)).is_ok());
        assert_eq!(tx.try_send(rec(3)), Err(QueueError::Full), "full: dropped, not queued");
        tx.send_refresh(rec(10)).await.expect("room");
        tx.send_refresh(rec(11)).await.expect("room");
        // A third refresh record waits for room instead of being dropped.
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_refresh(rec(12)).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut got = Vec::new();
        got.push(rx.recv().await.expect("queued").flow.reason);
        assert!(tx.try_send(rec(4)).is_ok(), "room again");
        while let Ok(r) = rx.try_recv() {
            got.push(r.flow.reason);
        }
        assert!(waiting.await.expect("task"), "the waiting refresh record got in");
        while let Ok(r) = rx.try_recv() {
            got.push(r.flow.reason);
        }
        assert_eq!(&got[..3], &[1, 2, 4], "flow changes first: {got:?}");
        let mut refresh = got[3..].to_vec();
        refresh.sort();
        assert_eq!(refresh, vec![10, 11, 12]);
        assert!(rx.is_empty());
        drop(tx);
        assert!(rx.recv().await.is_none(), "closed once every sender is gone");
        let (tx, rx) = with_capacity(1, 1);
        drop(rx);
        assert_eq!(tx.try_send(rec(1)), Err(QueueError::Closed));
        assert_eq!(tx.send_refresh(rec(1)).await, Err(QueueError::Closed));
    }
}
