//! The share-manager's end of the channel: accepts FUSE clients, opens a lease session per
//! connection, and translates each call into a [`Share`] method.
//!
//! Owns connections only: framing, the session's life (it ends when the connection does, and
//! a revoked session closes its connection), and turning volume errors into `Reply::Error`.
//! Which leases a call grants and what a change recalls is decided in `share`.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::client::read_frame;
use super::proto::{self, Frame, Reply, Request};
use crate::lease::{RecallSink, Session};
use crate::share::Share;
use crate::types::NodeId;
use crate::volume::{VolResult, VolumeError};

/// Queues recalls onto the connection's outgoing frames.
struct Outgoing(mpsc::UnboundedSender<Vec<u8>>);

impl RecallSink for Outgoing {
    fn send_recall(&self, recall: u64, nodes: Vec<NodeId>) {
        let _ = self.0.send(proto::encode(&Frame::Recall { recall, nodes }));
    }
}

/// Accepts channel connections until the task is dropped; dropping it also ends every
/// connection it accepted.
pub async fn serve(listener: TcpListener, share: Arc<Share>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, peer)) => {
                let share = share.clone();
                connections.spawn(async move {
                    if let Err(e) = connection(stream, share).await {
                        debug!(%peer, "channel connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("channel accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, share: Arc<Share>) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);

    // The first frame must be Hello with our version.
    let hello = tokio::time::timeout(std::time::Duration::from_secs(10), read_frame(&mut rd))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no Hello"))??;
    let (id, name, caching) = match hello {
        Frame::Call {
            id,
            request:
                Request::Hello {
                    version,
                    client,
                    caching,
                },
        } if version == proto::PROTOCOL_VERSION => (id, client, caching),
        Frame::Call {
            id,
            request: Request::Hello { version, .. },
        } => {
            let reply = Reply::Error {
                errno: libc::EPROTO,
                message: format!(
                    "protocol version {version} not supported (server speaks {})",
                    proto::PROTOCOL_VERSION
                ),
            };
            wr.write_all(&proto::encode(&Frame::Reply { id, reply }))
                .await?;
            return Ok(());
        }
        other => {
            warn!(%peer, "first frame was not Hello: {other:?}");
            return Ok(());
        }
    };

    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let session = share.leases.open_session(
        &format!("{name}@{peer}"),
        caching,
        Box::new(Outgoing(out.clone())),
    );
    let root = match share.volume.getattr(share.volume.root_id()) {
        Ok(a) => a,
        Err(e) => {
            share.leases.close_session(session.id);
            let reply = Reply::Error {
                errno: e.errno,
                message: e.message,
            };
            wr.write_all(&proto::encode(&Frame::Reply { id, reply }))
                .await?;
            return Ok(());
        }
    };
    let welcome = Reply::Welcome {
        session: session.id,
        lease_term_ms: share.leases.term().as_millis() as u64,
        root,
    };
    wr.write_all(&proto::encode(&Frame::Reply { id, reply: welcome }))
        .await?;

    let writer = tokio::spawn(async move {
        while let Some(first) = out_rx.recv().await {
            if proto::write_batch(&mut wr, first, &mut out_rx)
                .await
                .is_err()
            {
                break;
            }
        }
    });

    // A live client renews every third of a term; two terms of silence mean it is gone
    // (power lost, cable pulled) even if the TCP connection never says so.
    let silence = share.leases.term() * 2;
    let result = loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(silence, read_frame(&mut rd)) => match f {
                Ok(f) => f,
                Err(_) => {
                    warn!(%peer, session = session.id, "client silent for two lease terms; closing");
                    break Ok(());
                }
            },
            _ = session.revoked.notified() => break Ok(()),
        };
        match frame {
            // Opens and closes are counted in the order they arrive, so not spawned.
            Ok(Frame::Call {
                request: Request::Open { node },
                ..
            }) => share.open(session.id, node),
            Ok(Frame::Call {
                request: Request::Close { node },
                ..
            }) => share.close(session.id, node),
            // Renewals are answered at once, never queued behind slow calls: a late renewal
            // would end the session.
            Ok(Frame::Call {
                id,
                request: Request::Renew,
            }) => {
                let reply = if share.leases.renew(session.id) {
                    Reply::Ok
                } else {
                    Reply::Error {
                        errno: libc::ESTALE,
                        message: "session expired".into(),
                    }
                };
                send(&out, id, reply);
            }
            // Releases too: a lookup sent after a release must be granted after it.
            Ok(Frame::Call {
                id,
                request: Request::Release { nodes },
            }) => {
                share.leases.release(session.id, &nodes);
                send(&out, id, Reply::Ok);
            }
            Ok(Frame::Call { id, request }) => {
                let (share, session, out) = (share.clone(), session.clone(), out.clone());
                tokio::spawn(async move { call(&share, &session, &out, id, request).await });
            }
            Ok(other) => {
                warn!(%peer, "unexpected frame from client: {other:?}");
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };
    share.leases.close_session(session.id);
    share.session_ended(session.id);
    writer.abort();
    info!(%peer, session = session.id, "channel connection closed");
    result
}

fn send(out: &mpsc::UnboundedSender<Vec<u8>>, id: u64, reply: Reply) {
    let _ = out.send(proto::encode(&Frame::Reply { id, reply }));
}

fn reply_of<T>(r: VolResult<T>, ok: impl FnOnce(T) -> Reply) -> Reply {
    match r {
        Ok(v) => ok(v),
        Err(VolumeError { errno, message }) => Reply::Error { errno, message },
    }
}

/// Answers one call.
async fn call(
    share: &Share,
    session: &Arc<Session>,
    out: &mpsc::UnboundedSender<Vec<u8>>,
    id: u64,
    request: Request,
) {
    let by = Some(session.id);
    // Reads that the client will cache go through `cached_read`, which grants the leases and
    // queues the reply (ordered against recalls).
    let cached = |known: &[NodeId],
                  op: &dyn Fn(&crate::volume::Volume) -> VolResult<Reply>,
                  found: &dyn Fn(&Reply) -> Vec<NodeId>| {
        share.cached_read(session, known, op, found, |r| {
            send(out, id, reply_of(r, |x| x))
        });
    };
    let none = |_: &Reply| Vec::new();
    let reply = match request {
        Request::Hello { .. } => Reply::Error {
            errno: libc::EPROTO,
            message: "session already open".into(),
        },
        Request::RecallAck { recall } => {
            share.leases.ack(session.id, recall);
            return;
        }
        // Handled by the connection loop, in order; never reach here.
        Request::Open { .. } | Request::Close { .. } | Request::Release { .. } | Request::Renew => {
            return
        }
        Request::Resolve { path } => {
            let root = share.volume.root_id();
            return cached(&[root], &|v| v.resolve(&path).map(Reply::Attr), &attr_node);
        }
        Request::Lookup { dir, name } => {
            return cached(
                &[dir],
                &|v| v.lookup(dir, &name).map(Reply::Attr),
                &attr_node,
            );
        }
        Request::GetAttr { node } => {
            return cached(&[node], &|v| v.getattr(node).map(Reply::Attr), &none)
        }
        Request::Read { node, offset, len } => {
            let len = len.min(proto::MAX_IO);
            return cached(
                &[node],
                &|v| {
                    v.read(node, offset, len)
                        .map(|(data, eof)| Reply::Data { data, eof })
                },
                &none,
            );
        }
        Request::Readlink { node } => {
            return cached(&[node], &|v| v.readlink(node).map(Reply::Link), &none)
        }
        Request::ReadDir { dir, after, max } => {
            let max = (max as usize).clamp(1, 4096);
            return cached(
                &[dir],
                &|v| {
                    v.readdir(dir, after, max)
                        .map(|(entries, end)| Reply::Entries { entries, end })
                },
                &none,
            );
        }
        Request::StatFs => reply_of(share.volume.statfs(), Reply::FsStat),
        Request::Counters => {
            let s = share.leases.stats();
            let us = |d: Option<std::time::Duration>| d.map(|d| d.as_micros() as u64);
            Reply::Counters(proto::Counters {
                sessions: s.sessions as u64,
                leases_held: s.leases_held as u64,
                recalls_sent: s.recalls_sent,
                recalls_acked: s.recalls_acked,
                recalls_expired: s.recalls_expired,
                sessions_revoked: s.sessions_revoked,
                recall_rtt_median_us: us(s.recall_rtt_median),
                recall_rtt_p99_us: us(s.recall_rtt_p99),
            })
        }
        Request::Fsync { node } => reply_of(share.volume.fsync(node), |_| Reply::Ok),
        Request::Write { node, offset, data } => {
            share.leases.grant(session.id, &[node]);
            let count = data.len() as u32;
            reply_of(share.write(by, node, offset, &data).await, |attr| {
                Reply::Written { count, attr }
            })
        }
        Request::SetAttr { node, set } => {
            share.leases.grant(session.id, &[node]);
            reply_of(share.setattr(by, node, &set).await, Reply::Attr)
        }
        Request::Create {
            dir,
            name,
            mode,
            how,
            owner,
        } => {
            let made = share.create(by, dir, &name, mode, how, owner).await;
            return made_node(share, session, out, id, made);
        }
        Request::Mkdir {
            dir,
            name,
            mode,
            owner,
        } => {
            let made = share.mkdir(by, dir, &name, mode, owner).await;
            return made_node(share, session, out, id, made);
        }
        Request::Symlink {
            dir,
            name,
            target,
            owner,
        } => {
            let made = share.symlink(by, dir, &name, &target, owner).await;
            return made_node(share, session, out, id, made);
        }
        Request::Remove { dir, name } => {
            reply_of(share.remove(by, dir, &name).await, |_| Reply::Ok)
        }
        Request::Rmdir { dir, name } => reply_of(share.rmdir(by, dir, &name).await, |_| Reply::Ok),
        Request::Rename {
            from_dir,
            from_name,
            to_dir,
            to_name,
            no_replace,
        } => reply_of(
            share
                .rename(by, from_dir, &from_name, to_dir, &to_name, no_replace)
                .await,
            |_| Reply::Ok,
        ),
    };
    send(out, id, reply);
}

fn attr_node(r: &Reply) -> Vec<NodeId> {
    match r {
        Reply::Attr(a) => vec![a.node],
        _ => Vec::new(),
    }
}

/// The reply to a call that made a node. The caller will cache it, so it is granted the
/// node's lease and given its attributes read after the grant (through `cached`, ordered
/// against recalls): a change by anyone between the creation and the grant is either in
/// those attributes or recalled.
fn made_node(
    share: &Share,
    session: &Session,
    out: &mpsc::UnboundedSender<Vec<u8>>,
    id: u64,
    made: VolResult<crate::types::Attr>,
) {
    match made {
        Ok(a) => share.cached_read(
            session,
            &[a.node],
            |v| v.getattr(a.node).map(Reply::Attr),
            |_| Vec::new(),
            |r| send(out, id, reply_of(r, |x| x)),
        ),
        Err(VolumeError { errno, message }) => send(out, id, Reply::Error { errno, message }),
    }
}
