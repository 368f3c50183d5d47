//! The client end of the channel: one TCP connection to a share-manager, calls multiplexed
//! by id, recalls delivered to the owner, the session renewed in the background.
//!
//! Owns connection management (fail-fast connect, reconnect after a loss, call timeouts) and
//! the client's view of its lease: `cache_valid()` turns false before the server's term can
//! have run out. It holds no cache itself; callers (the FUSE client, the CSI controller) do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::proto::{self, Attr, Frame, NodeId, Reply, Request};

/// Errors of a channel call, each mappable to the errno a filesystem caller returns.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach share at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("share at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("connection to the share was lost")]
    Lost,
    #[error("share refused the session: {0}")]
    Refused(String),
    #[error("{message}")]
    Remote { errno: i32, message: String },
    #[error("{0}")]
    Protocol(String),
}

impl ClientError {
    /// The errno a filesystem caller should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Remote { errno, .. } => *errno,
            ClientError::Timeout(..) => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}

/// A recall from the server: drop everything cached about `nodes`, then `ack_recall(recall)`.
#[derive(Debug, Clone)]
pub struct Recall {
    pub recall: u64,
    pub nodes: Vec<NodeId>,
}

/// Called by the connection's reader for each recall, before any later frame is delivered:
/// a cache must drop the recalled nodes here, or a reply that follows the recall on the wire
/// (and so reflects the change) could meet the old cache entry.
pub type RecallHook = Arc<dyn Fn(&[NodeId]) + Send + Sync>;

/// Tunables of a client; `Default` suits a mount.
#[derive(Clone)]
pub struct ClientOptions {
    /// Name shown in the server's logs.
    pub name: String,
    /// How long a connect (TCP plus Hello) may take before the share counts as unreachable.
    pub connect_timeout: Duration,
    /// Extra time a call may take beyond two lease terms (a change may wait a full term for
    /// a frozen holder's lease to run out).
    pub call_slack: Duration,
    /// Whether this client caches replies (and so holds leases that changes recall).
    pub caching: bool,
    /// Runs inline for every recall (see [`RecallHook`]).
    pub on_recall: Option<RecallHook>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("name", &self.name)
            .field("connect_timeout", &self.connect_timeout)
            .field("call_slack", &self.call_slack)
            .field("caching", &self.caching)
            .field("on_recall", &self.on_recall.is_some())
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: format!("client-{}", std::process::id()),
            connect_timeout: Duration::from_secs(5),
            call_slack: Duration::from_secs(5),
            caching: true,
            on_recall: None,
        }
    }
}

/// The channel port of a share whose NFS port is `nfs_port`: the next port up. A client that
/// knows only the share's ADDR:PORT finds the channel there.
pub fn channel_port(nfs_port: u16) -> u16 {
    nfs_port.wrapping_add(1)
}

/// A session as the server granted it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub lease_term: Duration,
    pub root: Attr,
}

/// One live connection and its session.
struct Conn {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    dead: AtomicBool,
    /// Flips to true when the connection is given up; its reader and writer then stop, which
    /// closes the socket so the server ends the session.
    closed: watch::Sender<bool>,
    session: Session,
    /// Until when (nanoseconds after `Client::epoch`) cached data may be trusted.
    valid_until: AtomicU64,
}

impl Conn {
    fn fail_all(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.pending.lock().unwrap().clear();
        self.closed.send_replace(true);
    }
}

struct Inner {
    addr: SocketAddr,
    opts: ClientOptions,
    /// Held while a connection is opened, so concurrent callers open only one.
    connecting: tokio::sync::Mutex<()>,
    /// The current connection.
    current: Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    /// Increments each time a new session is established: every cache from an older
    /// generation is void (the server forgot its leases).
    generation: AtomicU64,
    recalls: mpsc::UnboundedSender<Recall>,
    epoch: Instant,
}

impl Drop for Inner {
    /// The last handle is gone: close the connection, so the server ends the session (its
    /// leases and open files) at once instead of when the lease runs out.
    fn drop(&mut self) {
        if let Some(conn) = self.current.lock().unwrap().take() {
            conn.fail_all();
        }
    }
}

/// A cloneable handle to the channel of one share.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the share whose NFS endpoint is `addr` (`HOST:PORT`), opening a session on
    /// its channel port. Fails within `opts.connect_timeout` if the share is unreachable.
    /// Returns the client, the first session and the stream of recalls.
    pub async fn connect(
        addr: &str,
        opts: ClientOptions,
    ) -> Result<(Client, Session, mpsc::UnboundedReceiver<Recall>), ClientError> {
        let nfs_addr = resolve(addr, opts.connect_timeout).await?;
        let chan = SocketAddr::new(nfs_addr.ip(), channel_port(nfs_addr.port()));
        let (rtx, rrx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            addr: chan,
            opts,
            connecting: tokio::sync::Mutex::new(()),
            current: Mutex::new(None),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            recalls: rtx,
            epoch: Instant::now(),
        });
        let client = Client { inner };
        let conn = client.connection().await?;
        Ok((client, conn.session.clone(), rrx))
    }

    /// Sends one request and waits for its reply. `Reply::Error` becomes `ClientError::Remote`.
    /// After a lost connection the next call reconnects (a new session, new generation).
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        match self.call_once(&request).await {
            // A read that lost its connection is safe to send again on a new one; a change
            // is not (it may have been applied), so its caller gets the error.
            Err(ClientError::Lost) if request.is_idempotent() => self.call_once(&request).await,
            other => other,
        }
    }

    async fn call_once(&self, request: &Request) -> Result<Reply, ClientError> {
        let conn = self.connection().await?;
        let request = request.clone();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap().insert(id, tx);
        if conn
            .out
            .send(proto::encode(&Frame::Call { id, request }))
            .is_err()
        {
            conn.fail_all();
            return Err(ClientError::Lost);
        }
        let limit = conn.session.lease_term * 2 + self.inner.opts.call_slack;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Reply::Error { errno, message })) => Err(ClientError::Remote { errno, message }),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::Lost),
            Err(_) => {
                conn.pending.lock().unwrap().remove(&id);
                // A server that stops answering is as good as gone: drop the connection so
                // the next call reconnects instead of queueing behind it.
                conn.fail_all();
                Err(ClientError::Timeout(self.inner.addr.to_string(), limit))
            }
        }
    }

    /// Sends a request that has no reply (`Open`, `Close`), on the current connection or a
    /// new one. It is queued behind every request sent before it.
    pub async fn send(&self, request: Request) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        conn.out
            .send(proto::encode(&Frame::Call { id: 0, request }))
            .map_err(|_| ClientError::Lost)
    }

    /// Tells the server that recall `recall` has been honoured.
    pub fn ack_recall(&self, recall: u64) {
        if let Some(conn) = self.inner.current.lock().unwrap().clone() {
            let frame = Frame::Call {
                id: 0,
                request: Request::RecallAck { recall },
            };
            let _ = conn.out.send(proto::encode(&frame));
        }
    }

    /// True while cached replies of the current generation may be trusted: the session is
    /// alive and was renewed recently enough that the server still counts our leases.
    pub fn cache_valid(&self) -> bool {
        match self.inner.current.lock().unwrap().as_ref() {
            Some(conn) if !conn.dead.load(Ordering::SeqCst) => {
                let now = self.inner.epoch.elapsed().as_nanos() as u64;
                now < conn.valid_until.load(Ordering::SeqCst)
            }
            _ => false,
        }
    }

    /// How much longer cached replies may be trusted (zero if not at all).
    pub fn cache_remaining(&self) -> Duration {
        match self.inner.current.lock().unwrap().as_ref() {
            Some(conn) if !conn.dead.load(Ordering::SeqCst) => {
                let now = self.inner.epoch.elapsed().as_nanos() as u64;
                Duration::from_nanos(conn.valid_until.load(Ordering::SeqCst).saturating_sub(now))
            }
            _ => Duration::ZERO,
        }
    }

    /// The session generation; changes whenever the client had to open a new session.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// The current live connection, or a new one.
    async fn connection(&self) -> Result<Arc<Conn>, ClientError> {
        let _connecting = self.inner.connecting.lock().await;
        let current = self.inner.current.lock().unwrap().clone();
        if let Some(c) = current.as_ref() {
            let now = self.inner.epoch.elapsed().as_nanos() as u64;
            let lapsed = now
                > c.valid_until.load(Ordering::SeqCst) + c.session.lease_term.as_nanos() as u64 / 5;
            if lapsed && !c.dead.load(Ordering::SeqCst) {
                // Not renewed for longer than the server keeps a lease (this process was
                // frozen or starved): the server will refuse the session, so start afresh
                // rather than lose the next call to that refusal.
                warn!("lease lapsed; opening a new session");
                c.fail_all();
            }
            if !c.dead.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        let conn = open(&self.inner).await?;
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        *self.inner.current.lock().unwrap() = Some(conn.clone());
        Ok(conn)
    }
}

async fn resolve(addr: &str, limit: Duration) -> Result<SocketAddr, ClientError> {
    if !addr.contains(':') {
        return Err(ClientError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "expected HOST:PORT"),
        });
    }
    let err = |e| ClientError::Connect {
        addr: addr.to_string(),
        source: e,
    };
    let found = tokio::time::timeout(limit, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| {
            err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "name lookup timed out",
            ))
        })?
        .map_err(err)?
        .next();
    found.ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        ))
    })
}

/// Connects, says Hello, and starts the reader, writer and renewer tasks of a connection.
async fn open(inner: &Arc<Inner>) -> Result<Arc<Conn>, ClientError> {
    let addr = inner.addr;
    let limit = inner.opts.connect_timeout;
    let cerr = |e| ClientError::Connect {
        addr: addr.to_string(),
        source: e,
    };
    let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            cerr(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(cerr)?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);

    // Hello, synchronously, before any task exists.
    let hello = Frame::Call {
        id: 0,
        request: Request::Hello {
            version: proto::PROTOCOL_VERSION,
            client: inner.opts.name.clone(),
            caching: inner.opts.caching,
        },
    };
    let asked = Instant::now();
    let welcome = tokio::time::timeout(limit, async {
        wr.write_all(&proto::encode(&hello)).await?;
        read_frame(&mut rd).await
    })
    .await
    .map_err(|_| ClientError::Timeout(addr.to_string(), limit))?
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            // Something answered, but not in our protocol.
            ClientError::Protocol(format!(
                "{addr} is not a Shoal lease channel (is another service on the port after the share's?)"
            ))
        } else {
            cerr(e)
        }
    })?;
    let session = match welcome {
        Frame::Reply {
            reply:
                Reply::Welcome {
                    session,
                    lease_term_ms,
                    root,
                },
            ..
        } => Session {
            id: session,
            lease_term: Duration::from_millis(lease_term_ms),
            root,
        },
        Frame::Reply {
            reply: Reply::Error { message, .. },
            ..
        } => return Err(ClientError::Refused(message)),
        other => {
            return Err(ClientError::Protocol(format!(
                "unexpected reply from share: {other:?}"
            )))
        }
    };
    info!(%addr, session = session.id, term = ?session.lease_term, "session opened");

    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let conn = Arc::new(Conn {
        out,
        pending: Mutex::new(HashMap::new()),
        dead: AtomicBool::new(false),
        closed: watch::channel(false).0,
        session,
        valid_until: AtomicU64::new(0),
    });
    conn.valid_until.store(
        trust_deadline(inner, asked, conn.session.lease_term),
        Ordering::SeqCst,
    );

    // Writer: batches whatever is queued into as few syscalls as possible.
    let wconn = conn.clone();
    let mut wclosed = conn.closed.subscribe();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                f = out_rx.recv() => f,
                _ = wclosed.wait_for(|c| *c) => None,
            };
            let Some(first) = first else { break };
            if proto::write_batch(&mut wr, first, &mut out_rx)
                .await
                .is_err()
            {
                break;
            }
        }
        wconn.fail_all();
    });

    // Reader: replies to their callers, recalls to the owner.
    let rconn = conn.clone();
    let recalls = inner.recalls.clone();
    let on_recall = inner.opts.on_recall.clone();
    let mut rclosed = conn.closed.subscribe();
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                f = read_frame(&mut rd) => f,
                _ = rclosed.wait_for(|c| *c) => break,
            };
            match frame {
                Ok(Frame::Reply { id, reply }) => {
                    if let Some(tx) = rconn.pending.lock().unwrap().remove(&id) {
                        let _ = tx.send(reply);
                    }
                }
                Ok(Frame::Recall { recall, nodes }) => {
                    debug!(recall, ?nodes, "recall");
                    if let Some(hook) = &on_recall {
                        hook(&nodes);
                    }
                    let _ = recalls.send(Recall { recall, nodes });
                }
                Ok(Frame::Call { .. }) => {
                    warn!("server sent a call frame; closing");
                    break;
                }
                Err(e) => {
                    // The server went away (a connection this client gave up ends above).
                    warn!(%addr, "connection to share lost: {e}");
                    break;
                }
            }
        }
        rconn.fail_all();
    });

    // Renewer: renews at a third of the term; trust is extended from the send time.
    let nconn = conn.clone();
    // Weak: a renewer must not keep a dropped client's connection alive.
    let ninner = Arc::downgrade(inner);
    tokio::spawn(async move {
        let term = nconn.session.lease_term;
        loop {
            tokio::time::sleep(term / 3).await;
            if nconn.dead.load(Ordering::SeqCst) {
                break;
            }
            let sent = Instant::now();
            let Some(ninner) = ninner.upgrade() else {
                break;
            };
            let id = ninner.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            nconn.pending.lock().unwrap().insert(id, tx);
            if nconn
                .out
                .send(proto::encode(&Frame::Call {
                    id,
                    request: Request::Renew,
                }))
                .is_err()
            {
                break;
            }
            match tokio::time::timeout(term, rx).await {
                Ok(Ok(Reply::Ok)) => {
                    nconn
                        .valid_until
                        .store(trust_deadline(&ninner, sent, term), Ordering::SeqCst);
                }
                Ok(Ok(other)) => {
                    warn!("renew refused: {other:?}");
                    nconn.fail_all();
                    break;
                }
                _ => {
                    warn!("renew unanswered; cache no longer trusted");
                    nconn.pending.lock().unwrap().remove(&id);
                }
            }
        }
    });
    Ok(conn)
}

/// The instant (as nanoseconds after the client's epoch) until which a lease renewed by a
/// request sent at `sent` may be trusted: the term, less 10% for clock-rate differences and a
/// fixed half second for scheduling, counted from the send time (the server counts from the
/// later receive time, so the client always gives up first).
fn trust_deadline(inner: &Inner, sent: Instant, term: Duration) -> u64 {
    let margin = term / 10 + Duration::from_millis(500);
    let until = sent + term.saturating_sub(margin);
    until.saturating_duration_since(inner.epoch).as_nanos() as u64
}

/// Reads one frame (also used by the server side).
pub(crate) async fn read_frame<R: AsyncReadExt + Unpin>(rd: &mut R) -> std::io::Result<Frame> {
    let len = rd.read_u32().await? as usize;
    if len > proto::MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    proto::decode(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}
