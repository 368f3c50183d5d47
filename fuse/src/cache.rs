//! The daemon's lease-bound cache: attributes, name lookups and the "page cache is still
//! good" marks of the nodes this client holds leases on.
//!
//! Owns the rules of what may be served without asking the server. Every entry carries a
//! deadline no later than the lease term known when the server's reply arrived, so an entry
//! can never outlive the lease it was granted under, even if the daemon was frozen and the
//! lease renewed after it thawed. Inserts carry a [`Ticket`] taken before the server call; a
//! recall or a new session between the ticket and the reply voids the insert, so a reply that
//! raced a recall is never cached. It never talks to the server or the kernel.

use std::collections::HashMap;
use std::time::Instant;

use shoal_nfs::channel::proto::{Attr, NodeId, Time};

/// A snapshot of the cache's state taken before a server call; inserting a reply under a
/// stale ticket is a no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    seq: u64,
}

/// The version of a file's contents as its attributes show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    size: u64,
    mtime: Time,
}

impl Version {
    fn of(attr: &Attr) -> Version {
        Version {
            size: attr.size,
            mtime: attr.mtime,
        }
    }
}

/// What a name means after this client's own change to it.
#[derive(Debug, Clone, Copy)]
pub enum NameNow<'a> {
    /// It names this node (just created).
    Node(&'a Attr),
    /// It names nothing (removed, or renamed away).
    Gone,
    /// It names something whose attributes this client does not have (renamed onto).
    Unknown,
}

/// What a cached lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Attr),
    Missing,
}

#[derive(Debug, Default)]
pub struct Cache {
    /// Session generation the entries belong to.
    generation: u64,
    /// Bumped by every recall and every reset: tickets older than it are void.
    seq: u64,
    /// Attributes by node, with the instant they stop being trustworthy.
    attrs: HashMap<NodeId, (Attr, Instant)>,
    /// Name lookups: (directory, name) to child node (or known absence).
    entries: HashMap<(NodeId, Vec<u8>), (Option<NodeId>, Instant)>,
    /// Directories whose names this client may answer from `entries`: a lookup in the
    /// directory granted a lease on it, which lasts until recalled (this client's own
    /// changes to the directory do not recall it).
    dirs: HashMap<NodeId, Instant>,
    /// Nodes whose kernel page cache was filled under a lease held continuously since, with
    /// the content version seen and the deadline of that continuity.
    data: HashMap<NodeId, (Version, Instant)>,
    /// Counters, for debug logs.
    pub hits: u64,
    pub misses: u64,
}

impl Cache {
    pub fn new(generation: u64) -> Cache {
        Cache {
            generation,
            ..Cache::default()
        }
    }

    /// Drops everything if the session generation moved on. Returns true if it did.
    pub fn sync_generation(&mut self, generation: u64) -> bool {
        if generation != self.generation {
            self.clear();
            self.generation = generation;
            true
        } else {
            false
        }
    }

    /// Drops every entry and voids every outstanding ticket.
    pub fn clear(&mut self) {
        self.seq += 1;
        self.attrs.clear();
        self.entries.clear();
        self.dirs.clear();
        self.data.clear();
    }

    pub fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation,
            seq: self.seq,
        }
    }

    fn current(&self, t: Ticket) -> bool {
        t == self.ticket()
    }

    /// Honours a recall: forgets the nodes' attributes, the entries of those that are
    /// directories, and their page-cache marks.
    pub fn recall(&mut self, nodes: &[NodeId]) {
        self.seq += 1;
        for n in nodes {
            self.attrs.remove(n);
            self.data.remove(n);
            self.dirs.remove(n);
        }
        if !nodes.is_empty() {
            self.entries.retain(|(dir, _), _| !nodes.contains(dir));
        }
    }

    /// The client no longer holds leases on these nodes.
    pub fn release(&mut self, nodes: &[NodeId]) {
        self.recall(nodes);
    }

    /// Caches attributes from a server reply. Also keeps the node's page-cache mark alive if
    /// the contents did not change, and drops it if they did.
    pub fn put_attr(&mut self, t: Ticket, attr: &Attr, until: Instant) -> bool {
        if !self.current(t) {
            return false;
        }
        self.attrs.insert(attr.node, (attr.clone(), until));
        if let Some((v, d)) = self.data.get_mut(&attr.node) {
            if *v == Version::of(attr) && *d > Instant::now() {
                *d = until;
            } else {
                self.data.remove(&attr.node);
            }
        }
        true
    }

    /// Caches attributes this client's own write produced: the kernel's page cache holds the
    /// bytes written, so the page-cache mark moves to the new version.
    pub fn put_written(&mut self, t: Ticket, attr: &Attr, until: Instant) -> bool {
        if !self.current(t) {
            self.data.remove(&attr.node);
            return false;
        }
        if let Some((v, d)) = self.data.get_mut(&attr.node) {
            *v = Version::of(attr);
            *d = until;
        }
        self.attrs.insert(attr.node, (attr.clone(), until));
        true
    }

    pub fn attr(&mut self, node: NodeId, now: Instant) -> Option<Attr> {
        match self.attrs.get(&node) {
            Some((a, until)) if *until > now => {
                self.hits += 1;
                Some(a.clone())
            }
            Some(_) => {
                self.attrs.remove(&node);
                self.misses += 1;
                None
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Caches the result of looking `name` up in `dir` (and the child's attributes).
    pub fn put_entry(
        &mut self,
        t: Ticket,
        dir: NodeId,
        name: &[u8],
        found: Option<&Attr>,
        until: Instant,
    ) -> bool {
        if !self.current(t) {
            return false;
        }
        self.entries
            .insert((dir, name.to_vec()), (found.map(|a| a.node), until));
        self.dirs.insert(dir, until);
        if let Some(a) = found {
            self.put_attr(t, a, until);
        }
        true
    }

    /// The node a cached name points at, without counting a hit or checking deadlines.
    pub fn peek_entry(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.entries
            .get(&(dir, name.to_vec()))
            .and_then(|(n, _)| *n)
    }

    /// This client changed `name` in `dir` (and the server acknowledged it). The directory's
    /// attributes are stale; its other names stay valid while its lease does (the changer
    /// keeps its lease), and `name` now means `now`.
    ///
    /// `t` is the ticket taken before the change was sent: if a recall or a new session came
    /// since, what the reply says may be older than that recall, so `name` is only forgotten.
    pub fn own_change(
        &mut self,
        t: Ticket,
        dir: NodeId,
        name: &[u8],
        now: NameNow<'_>,
        until: Instant,
    ) {
        let now = if self.current(t) {
            now
        } else {
            NameNow::Unknown
        };
        // In-flight replies about this directory predate the change: void them.
        self.seq += 1;
        self.attrs.remove(&dir);
        let key = (dir, name.to_vec());
        let leased = matches!(self.dirs.get(&dir), Some(d) if *d > Instant::now());
        match now {
            NameNow::Node(a) if leased => {
                self.entries.insert(key, (Some(a.node), until));
                self.attrs.insert(a.node, (a.clone(), until));
            }
            NameNow::Node(a) => {
                self.entries.remove(&key);
                self.attrs.insert(a.node, (a.clone(), until));
            }
            NameNow::Gone if leased => {
                self.entries.insert(key, (None, until));
            }
            NameNow::Gone | NameNow::Unknown => {
                self.entries.remove(&key);
            }
        }
    }

    /// A cached lookup, if the directory's lease, the name and (when present) the child's
    /// attributes are all live.
    pub fn lookup(&mut self, dir: NodeId, name: &[u8], now: Instant) -> Option<Lookup> {
        if !matches!(self.dirs.get(&dir), Some(until) if *until > now) {
            self.misses += 1;
            return None;
        }
        let key = (dir, name.to_vec());
        let child = match self.entries.get(&key) {
            Some((child, until)) if *until > now => *child,
            Some(_) => {
                self.entries.remove(&key);
                self.misses += 1;
                return None;
            }
            None => {
                self.misses += 1;
                return None;
            }
        };
        match child {
            None => {
                self.hits += 1;
                Some(Lookup::Missing)
            }
            Some(node) => self.attr(node, now).map(Lookup::Found),
        }
    }

    /// Decides whether an open may keep the kernel's page cache of `node`, and marks the
    /// page cache as filled under the lease from now on (until `until`). `attr` is the
    /// node's current attributes as served to this open.
    pub fn open_keep_cache(&mut self, node: NodeId, attr: &Attr, until: Instant) -> bool {
        let now = Instant::now();
        let keep =
            matches!(self.data.get(&node), Some((v, d)) if *d > now && *v == Version::of(attr));
        match self.data.get_mut(&node) {
            Some((v, d)) if keep => {
                *v = Version::of(attr);
                *d = until.max(*d);
            }
            _ => {
                self.data.insert(node, (Version::of(attr), until));
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_nfs::channel::proto::FileKind;

    use super::*;

    fn attr(node: NodeId, size: u64) -> Attr {
        Attr {
            node,
            kind: FileKind::File,
            size,
            used: 0,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            atime: Time::default(),
            mtime: Time {
                secs: size as i64,
                nanos: 0,
            },
            ctime: Time::default(),
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn serves_what_was_put_until_recalled() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        c.put_attr(t, &attr(1, 0), later());
        c.put_entry(t, 1, b"a", Some(&attr(5, 3)), later());
        assert_eq!(
            c.lookup(1, b"a", Instant::now()),
            Some(Lookup::Found(attr(5, 3)))
        );
        c.recall(&[5]);
        // The name is still known, but the child's attributes are not: a miss.
        assert_eq!(c.lookup(1, b"a", Instant::now()), None);
        assert_eq!(c.attr(5, Instant::now()), None);
    }

    #[test]
    fn own_changes_keep_the_directory_s_other_names() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        c.put_entry(t, 1, b"a", Some(&attr(5, 3)), later());
        c.put_entry(t, 1, b"gone", None, later());
        c.own_change(c.ticket(), 1, b"new", NameNow::Node(&attr(6, 0)), later());
        c.own_change(c.ticket(), 1, b"a", NameNow::Gone, later());
        let now = Instant::now();
        assert_eq!(c.lookup(1, b"new", now), Some(Lookup::Found(attr(6, 0))));
        assert_eq!(c.lookup(1, b"a", now), Some(Lookup::Missing));
        assert_eq!(c.lookup(1, b"gone", now), Some(Lookup::Missing));
        c.own_change(c.ticket(), 1, b"gone", NameNow::Unknown, later());
        assert_eq!(
            c.lookup(1, b"gone", now),
            None,
            "renamed onto: ask the server"
        );
        // Without a lease on the directory, nothing is answered from the cache.
        c.own_change(c.ticket(), 2, b"x", NameNow::Gone, later());
        assert_eq!(c.lookup(2, b"x", now), None);
        // A reply that raced a recall is not believed: the name is only forgotten.
        let stale = c.ticket();
        c.recall(&[6]);
        c.own_change(stale, 1, b"late", NameNow::Node(&attr(7, 0)), later());
        assert_eq!(c.lookup(1, b"late", now), None);
        // Another client's change recalls the directory: all its names go.
        c.recall(&[1]);
        assert_eq!(c.lookup(1, b"new", now), None);
    }

    #[test]
    fn recalling_a_directory_drops_its_names() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        c.put_attr(t, &attr(1, 0), later());
        c.put_entry(t, 1, b"a", None, later());
        assert_eq!(c.lookup(1, b"a", Instant::now()), Some(Lookup::Missing));
        c.recall(&[1]);
        assert_eq!(c.lookup(1, b"a", Instant::now()), None);
    }

    #[test]
    fn a_reply_racing_a_recall_is_not_cached() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        c.recall(&[99]);
        c.put_attr(t, &attr(5, 1), later());
        assert_eq!(c.attr(5, Instant::now()), None);
    }

    #[test]
    fn a_new_generation_voids_everything() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        c.put_attr(t, &attr(5, 1), later());
        assert!(c.sync_generation(2));
        assert_eq!(c.attr(5, Instant::now()), None);
        c.put_attr(t, &attr(5, 1), later());
        assert_eq!(c.attr(5, Instant::now()), None, "old ticket");
        assert!(!c.sync_generation(2));
    }

    #[test]
    fn entries_expire_with_the_lease_they_were_granted_under() {
        let mut c = Cache::new(1);
        let t = c.ticket();
        let soon = Instant::now() + Duration::from_millis(10);
        c.put_attr(t, &attr(5, 1), soon);
        assert!(c.attr(5, Instant::now()).is_some());
        assert_eq!(c.attr(5, soon + Duration::from_millis(1)), None);
    }

    #[test]
    fn keep_cache_only_after_continuous_lease_and_same_version() {
        let mut c = Cache::new(1);
        let a = attr(5, 10);
        assert!(!c.open_keep_cache(5, &a, later()), "first open fills");
        assert!(c.open_keep_cache(5, &a, later()), "nothing changed since");
        c.recall(&[5]);
        assert!(!c.open_keep_cache(5, &a, later()), "recalled since");
        assert!(c.open_keep_cache(5, &a, later()));
        // Another node changed the file: a refresh shows a new version.
        let t = c.ticket();
        c.put_attr(t, &attr(5, 11), later());
        assert!(!c.open_keep_cache(5, &attr(5, 11), later()));
        // Our own write keeps the mark.
        let t = c.ticket();
        c.put_written(t, &attr(5, 12), later());
        assert!(c.open_keep_cache(5, &attr(5, 12), later()));
        // A lapse of the lease breaks continuity.
        let gone = Instant::now();
        assert!(!c.open_keep_cache(6, &a, gone));
        assert!(!c.open_keep_cache(6, &a, later()));
        c.clear();
        assert!(!c.open_keep_cache(5, &attr(5, 12), later()));
    }
}
