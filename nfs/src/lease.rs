//! The lease table: which client session may cache which node, and the recall a change waits
//! for before it is acknowledged.
//!
//! Owns sessions (one per connected caching client, renewed within a term), the holders of
//! each node, recalls and their acknowledgements, and the counters about them. It never
//! touches the volume: callers say which nodes a change affects.
//!
//! A change to a node recalls the lease of every holder but the changer. The change is
//! acknowledged once each holder has acknowledged its recall, or once that holder's lease has
//! run out (a frozen or partitioned client); a holder that is alive but does not answer in
//! time has its session revoked, which closes its connection.

use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use dashmap::DashMap;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use crate::types::NodeId;

/// A client session's id.
pub type SessionId = u64;

/// Default lease term.
pub const DEFAULT_TERM: Duration = Duration::from_secs(10);

/// How a session hears about recalls: the connection that serves it implements this.
pub trait RecallSink: Send + Sync {
    /// Queues a recall of `nodes` with id `recall` to the client. Must not block.
    fn send_recall(&self, recall: u64, nodes: Vec<NodeId>);
}

/// One client session.
pub struct Session {
    pub id: SessionId,
    /// The client's name, for logs.
    pub name: String,
    /// When the lease runs out unless renewed.
    expires: Mutex<Instant>,
    sink: Box<dyn RecallSink>,
    /// Recalls sent and not acknowledged yet.
    pending: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Nodes this session holds a lease on.
    held: Mutex<HashSet<NodeId>>,
    /// Set when the session is closed or revoked; its connection must close.
    ended: AtomicBool,
    /// Wakes the connection when the session is revoked.
    pub revoked: Notify,
    /// Recalls sent to this session, numbered; held while a reply or a recall is queued so
    /// the two are queued in the order their data was read or changed.
    outbox: Mutex<RecallLog>,
    /// False for a client that caches nothing: it is granted no leases.
    caching: bool,
}

/// The most recent recalls of a session, to tell whether a reply read before one of them.
#[derive(Default)]
struct RecallLog {
    seq: u64,
    recent: VecDeque<(u64, Vec<NodeId>)>,
}

/// How many recent recalls a session remembers for `reply_unless_recalled`.
const RECALL_LOG: usize = 64;

impl Session {
    fn expires(&self) -> Instant {
        *self.expires.lock().unwrap()
    }
    /// True once the session was closed or revoked.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// A mark to pass to `reply_unless_recalled`: take it before reading.
    pub fn recall_mark(&self) -> u64 {
        self.outbox.lock().unwrap().seq
    }

    /// Queues a reply (by calling `send`) unless one of `nodes` was recalled from this session
    /// since `mark`: then the data read may predate a change whose recall is already on its
    /// way, and the caller must read again. Returns whether it sent.
    pub fn reply_unless_recalled(&self, mark: u64, nodes: &[NodeId], send: impl FnOnce()) -> bool {
        let log = self.outbox.lock().unwrap();
        if log.seq != mark {
            let oldest = log.recent.front().map(|r| r.0).unwrap_or(u64::MAX);
            if oldest > mark + 1 {
                return false; // the log no longer reaches back to the mark
            }
            let hit = log
                .recent
                .iter()
                .filter(|r| r.0 > mark)
                .any(|r| r.1.iter().any(|n| nodes.contains(n)));
            if hit {
                return false;
            }
        }
        send();
        true
    }
}

/// Counters exposed by the lease table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseStats {
    pub sessions: usize,
    pub leases_held: usize,
    pub recalls_sent: u64,
    pub recalls_acked: u64,
    pub recalls_expired: u64,
    pub sessions_revoked: u64,
    /// Median and 99th percentile of recall round trips (send to ack) over the last samples.
    pub recall_rtt_median: Option<Duration>,
    pub recall_rtt_p99: Option<Duration>,
}

/// How many recall round-trip samples are kept for the percentiles.
const RTT_SAMPLES: usize = 4096;

pub struct LeaseTable {
    term: Duration,
    sessions: DashMap<SessionId, Arc<Session>>,
    /// Node to the sessions that hold a lease on it.
    holders: DashMap<NodeId, HashSet<SessionId>>,
    next_session: AtomicU64,
    next_recall: AtomicU64,
    recalls_sent: AtomicU64,
    recalls_acked: AtomicU64,
    recalls_expired: AtomicU64,
    sessions_revoked: AtomicU64,
    rtts: Mutex<VecDeque<Duration>>,
}

impl LeaseTable {
    pub fn new(term: Duration) -> LeaseTable {
        LeaseTable {
            term,
            sessions: DashMap::new(),
            holders: DashMap::new(),
            // Session ids start from the clock so a restarted server does not reuse old ones.
            next_session: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(1),
            ),
            next_recall: AtomicU64::new(1),
            recalls_sent: AtomicU64::new(0),
            recalls_acked: AtomicU64::new(0),
            recalls_expired: AtomicU64::new(0),
            sessions_revoked: AtomicU64::new(0),
            rtts: Mutex::new(VecDeque::new()),
        }
    }

    pub fn term(&self) -> Duration {
        self.term
    }

    /// Opens a session whose recalls go to `sink`; its lease runs for one term.
    /// A session that does not cache (`caching` false) is never granted a lease.
    pub fn open_session(
        &self,
        name: &str,
        caching: bool,
        sink: Box<dyn RecallSink>,
    ) -> Arc<Session> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            id,
            name: name.to_string(),
            expires: Mutex::new(Instant::now() + self.term),
            sink,
            pending: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            ended: AtomicBool::new(false),
            revoked: Notify::new(),
            outbox: Mutex::new(RecallLog::default()),
            caching,
        });
        self.sessions.insert(id, session.clone());
        info!(session = id, client = name, "session opened");
        session
    }

    /// Ends a session (its connection closed): all its leases go.
    pub fn close_session(&self, id: SessionId) {
        if let Some((_, s)) = self.sessions.remove(&id) {
            s.ended.store(true, Ordering::SeqCst);
            let held: Vec<NodeId> = s.held.lock().unwrap().drain().collect();
            for node in held {
                self.drop_holder(node, id);
            }
            // Anyone waiting on this session's acks need not wait any longer.
            s.pending.lock().unwrap().clear();
            info!(session = id, client = %s.name, "session closed");
        }
    }

    /// Extends a session's lease by one term from now. False if the session is unknown or over.
    /// A session whose lease already ran out cannot be renewed: recalls may have been skipped
    /// while it was silent, so it is ended (its connection closes) and the client must open
    /// a new session with an empty cache.
    pub fn renew(&self, id: SessionId) -> bool {
        let Some(s) = self.sessions.get(&id).map(|s| s.clone()) else {
            return false;
        };
        if s.ended() {
            return false;
        }
        let now = Instant::now();
        let mut expires = s.expires.lock().unwrap();
        if *expires <= now {
            drop(expires);
            info!(session = id, client = %s.name, "renewal after the lease ran out; ending session");
            self.close_session(id);
            s.revoked.notify_one();
            return false;
        }
        *expires = now + self.term;
        true
    }

    /// Grants `session` a lease on `nodes`. Call before reading what the client will cache.
    pub fn grant(&self, session: SessionId, nodes: &[NodeId]) {
        let Some(s) = self.sessions.get(&session).map(|s| s.clone()) else {
            return;
        };
        if !s.caching {
            return;
        }
        let mut held = s.held.lock().unwrap();
        for &node in nodes {
            if held.insert(node) {
                self.holders.entry(node).or_default().insert(session);
            }
        }
    }

    /// The client stopped caching `nodes`.
    pub fn release(&self, session: SessionId, nodes: &[NodeId]) {
        let Some(s) = self.sessions.get(&session).map(|s| s.clone()) else {
            return;
        };
        let mut held = s.held.lock().unwrap();
        for node in nodes {
            if held.remove(node) {
                self.drop_holder(*node, session);
            }
        }
    }

    fn drop_holder(&self, node: NodeId, session: SessionId) {
        if let dashmap::Entry::Occupied(mut e) = self.holders.entry(node) {
            e.get_mut().remove(&session);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    /// A session acknowledged recall `recall`.
    pub fn ack(&self, session: SessionId, recall: u64) {
        if let Some(s) = self.sessions.get(&session) {
            if let Some(tx) = s.pending.lock().unwrap().remove(&recall) {
                let _ = tx.send(());
            }
        }
    }

    /// Takes the leases on `nodes` away from every holder but `changer` and tells them.
    /// Call after the change is on disk and before acknowledging it; await the returned
    /// [`Recall`] to learn when the change may be acknowledged.
    pub fn recall(&self, changer: Option<SessionId>, nodes: &[NodeId]) -> Recall {
        let mut per_session: HashMap<SessionId, Vec<NodeId>> = HashMap::new();
        for &node in nodes {
            let Some(mut holders) = self.holders.get_mut(&node) else {
                continue;
            };
            holders.retain(|&sid| {
                if Some(sid) == changer {
                    return true;
                }
                per_session.entry(sid).or_default().push(node);
                false
            });
            let empty = holders.is_empty();
            drop(holders);
            if empty {
                self.holders.remove_if(&node, |_, h| h.is_empty());
            }
        }
        let mut waits = Vec::new();
        for (sid, nodes) in per_session {
            let Some(s) = self.sessions.get(&sid).map(|s| s.clone()) else {
                continue;
            };
            {
                let mut held = s.held.lock().unwrap();
                for n in &nodes {
                    held.remove(n);
                }
            }
            let deadline = s.expires();
            if deadline <= Instant::now() {
                // Its lease has run out already: the client stopped trusting its cache.
                continue;
            }
            let recall = self.next_recall.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            s.pending.lock().unwrap().insert(recall, tx);
            self.recalls_sent.fetch_add(1, Ordering::Relaxed);
            debug!(session = sid, recall, ?nodes, "recall sent");
            {
                let mut log = s.outbox.lock().unwrap();
                log.seq += 1;
                let seq = log.seq;
                log.recent.push_back((seq, nodes.clone()));
                if log.recent.len() > RECALL_LOG {
                    log.recent.pop_front();
                }
                s.sink.send_recall(recall, nodes);
            }
            waits.push(Pending {
                session: s,
                recall,
                deadline,
                rx,
                sent: Instant::now(),
            });
        }
        Recall { waits }
    }

    /// Books the end of one recall. Returns the instant the change must still wait for: a
    /// holder revoked while its lease was current may trust its cache until that lease
    /// (last renewed after the recall was sent, perhaps) runs out.
    fn finished(&self, p: &Pending, outcome: Outcome) -> Option<Instant> {
        match outcome {
            Outcome::Acked => {
                self.recalls_acked.fetch_add(1, Ordering::Relaxed);
                let mut rtts = self.rtts.lock().unwrap();
                if rtts.len() >= RTT_SAMPLES {
                    rtts.pop_front();
                }
                rtts.push_back(p.sent.elapsed());
                return None;
            }
            // The session ended (its client went away): its leases went with it.
            Outcome::SessionClosed => return None,
            Outcome::TimedOut => {}
        }
        self.recalls_expired.fetch_add(1, Ordering::Relaxed);
        p.session.pending.lock().unwrap().remove(&p.recall);
        let expires = p.session.expires();
        if expires > Instant::now() && !p.session.ended() {
            // Alive (it renewed) but silent: revoke it. Closing the session refuses further
            // renewals and closes its connection, which tells the client that none of its
            // cache may be trusted; until its last renewal runs out it might still trust it,
            // so the change waits for that too.
            warn!(session = p.session.id, client = %p.session.name, "recall unanswered; revoking session");
            self.sessions_revoked.fetch_add(1, Ordering::Relaxed);
            self.close_session(p.session.id);
            p.session.revoked.notify_one();
            Some(expires)
        } else {
            info!(session = p.session.id, client = %p.session.name, "lease ran out during recall");
            None
        }
    }

    pub fn stats(&self) -> LeaseStats {
        let mut rtts: Vec<Duration> = self.rtts.lock().unwrap().iter().copied().collect();
        rtts.sort();
        let pct = |p: f64| {
            (!rtts.is_empty()).then(|| rtts[((rtts.len() - 1) as f64 * p).round() as usize])
        };
        LeaseStats {
            sessions: self.sessions.len(),
            leases_held: self.holders.iter().map(|h| h.len()).sum(),
            recalls_sent: self.recalls_sent.load(Ordering::Relaxed),
            recalls_acked: self.recalls_acked.load(Ordering::Relaxed),
            recalls_expired: self.recalls_expired.load(Ordering::Relaxed),
            sessions_revoked: self.sessions_revoked.load(Ordering::Relaxed),
            recall_rtt_median: pct(0.5),
            recall_rtt_p99: pct(0.99),
        }
    }
}

/// How one recall ended.
enum Outcome {
    Acked,
    SessionClosed,
    TimedOut,
}

struct Pending {
    session: Arc<Session>,
    recall: u64,
    deadline: Instant,
    rx: oneshot::Receiver<()>,
    sent: Instant,
}

/// The recalls one change started; `wait` returns when the change may be acknowledged.
#[must_use = "a change must wait for its recalls before it is acknowledged"]
pub struct Recall {
    waits: Vec<Pending>,
}

impl Recall {
    /// True if no other client held a lease.
    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    /// Waits until every holder acknowledged or its lease ran out.
    pub async fn wait(self, table: &LeaseTable) {
        for mut p in self.waits {
            let left = p.deadline.saturating_duration_since(Instant::now());
            let outcome = match tokio::time::timeout(left, &mut p.rx).await {
                Ok(Ok(())) => Outcome::Acked,
                // A closed session drops its pending senders: not an ack, but its leases are
                // gone, so there is nothing to wait for either.
                Ok(Err(_)) => Outcome::SessionClosed,
                Err(_) => Outcome::TimedOut,
            };
            if let Some(until) = table.finished(&p, outcome) {
                tokio::time::sleep_until(until).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Chan(Mutex<mpsc::Sender<(u64, Vec<NodeId>)>>);
    impl RecallSink for Chan {
        fn send_recall(&self, recall: u64, nodes: Vec<NodeId>) {
            let _ = self.0.lock().unwrap().send((recall, nodes));
        }
    }
    fn session(t: &LeaseTable, name: &str) -> (Arc<Session>, mpsc::Receiver<(u64, Vec<NodeId>)>) {
        let (tx, rx) = mpsc::channel();
        (
            t.open_session(name, true, Box::new(Chan(Mutex::new(tx)))),
            rx,
        )
    }

    #[tokio::test]
    async fn change_recalls_other_holders_not_the_changer() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (a, arx) = session(&t, "a");
        let (b, brx) = session(&t, "b");
        t.grant(a.id, &[5]);
        t.grant(b.id, &[5, 6]);
        assert_eq!(t.stats().leases_held, 3);
        let r = t.recall(Some(a.id), &[5]);
        assert!(arx.try_recv().is_err(), "the changer keeps its lease");
        let (id, nodes) = brx.try_recv().unwrap();
        assert_eq!(nodes, vec![5]);
        t.ack(b.id, id);
        r.wait(&t).await;
        let s = t.stats();
        assert_eq!((s.recalls_sent, s.recalls_acked, s.leases_held), (1, 1, 2));
        assert!(s.recall_rtt_median.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_holder_is_waited_for_until_its_lease_runs_out() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (b, _brx) = session(&t, "b");
        t.grant(b.id, &[9]);
        let started = Instant::now();
        t.recall(None, &[9]).wait(&t).await;
        assert!(started.elapsed() >= Duration::from_secs(9));
        assert_eq!(t.stats().recalls_expired, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_session_cannot_be_renewed() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (b, _brx) = session(&t, "b");
        t.grant(b.id, &[4]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(t.renew(b.id), "renewed within the term");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(!t.renew(b.id), "a lapsed lease is not revived");
        assert!(b.ended());
        assert_eq!(t.stats().leases_held, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_renews_but_never_acks_is_revoked_and_waited_out() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (b, _brx) = session(&t, "b");
        t.grant(b.id, &[3]);
        let started = Instant::now();
        let recall = t.recall(None, &[3]);
        // b keeps renewing during the recall (it is alive, just not answering).
        let renewing = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                t.renew(b.id);
            }
        };
        tokio::join!(recall.wait(&t), renewing);
        // Renewed at 9 s, so b may trust its cache until 19 s: the change waited that long.
        assert!(
            started.elapsed() >= Duration::from_secs(19),
            "{:?}",
            started.elapsed()
        );
        assert!(b.ended(), "revoked");
        assert!(!t.renew(b.id), "no renewal after revocation");
        assert_eq!(t.stats().sessions_revoked, 1);
    }

    #[tokio::test]
    async fn a_client_that_caches_nothing_holds_no_leases() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        let admin = t.open_session("csi-controller", false, Box::new(Chan(Mutex::new(tx))));
        t.grant(admin.id, &[1, 2]);
        assert_eq!(t.stats().leases_held, 0);
        assert!(t.recall(None, &[1, 2]).is_empty(), "no change waits for it");
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn closed_session_leaves_nothing_behind() {
        let t = LeaseTable::new(Duration::from_secs(10));
        let (b, _brx) = session(&t, "b");
        t.grant(b.id, &[1, 2, 3]);
        t.close_session(b.id);
        assert_eq!(t.stats().leases_held, 0);
        assert!(t.recall(None, &[1, 2, 3]).is_empty());
        assert!(!t.renew(b.id));
    }
}
