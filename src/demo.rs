//! `shoal demo`: the main job on an embedded default. Exports a temporary directory, mounts
//! it three times with `shoal mount` (three "nodes"), writes on one mount and reads on the
//! others, prints what each saw and the lease counters, and cleans everything up.

use std::io::Write;
use std::time::Duration;

use anyhow::bail;

use crate::local::{LocalMount, LocalShare};

pub fn run(keep: bool) -> anyhow::Result<()> {
    let local = LocalShare::start("shoal-demo.", None, Duration::from_secs(10))?;
    let running = &local.running;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "exporting {} on {} (NFSv3) and {} (lease channel)",
        local.export.display(),
        running.nfs_addr,
        running.channel_addr
    )?;

    let mounts = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| local.mount(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for m in &mounts {
        writeln!(out, "mounted {}", m.dir.display())?;
    }

    let page = b"<h1>Hello from node-a</h1>\n";
    std::fs::write(mounts[0].dir.join("index.html"), page)?;
    writeln!(out, "node-a wrote index.html ({} bytes)", page.len())?;
    read_everywhere(&mut out, &mounts[1..], page)?;
    let edit = b"<h1>Edited on node-c</h1>\n";
    std::fs::write(mounts[2].dir.join("index.html"), edit)?;
    writeln!(out, "node-c rewrote index.html")?;
    read_everywhere(&mut out, &mounts[..2], edit)?;
    let s = running.share.leases.stats();
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.2} ms", d.as_secs_f64() * 1000.0)
        })
    };
    writeln!(
        out,
        "lease counters: {} sessions, {} leases held, {} recalls sent ({} acked, {} ran out), \
         recall round trip median {}, p99 {}",
        s.sessions,
        s.leases_held,
        s.recalls_sent,
        s.recalls_acked,
        s.recalls_expired,
        ms(s.recall_rtt_median),
        ms(s.recall_rtt_p99)
    )?;
    if keep {
        writeln!(out, "mounts stay up; press Ctrl-C to unmount and clean up")?;
        out.flush()?;
        local.rt.block_on(crate::shutdown_signal());
    }
    drop(mounts);
    drop(local);
    writeln!(out, "unmounted and cleaned up")?;
    Ok(())
}

/// Reads `index.html` through each of `mounts`, says what each saw, and fails on any other
/// bytes than `want`.
fn read_everywhere(out: &mut impl Write, mounts: &[LocalMount], want: &[u8]) -> anyhow::Result<()> {
    for m in mounts {
        let seen = std::fs::read(m.dir.join("index.html"))?;
        let shown = String::from_utf8_lossy(&seen);
        writeln!(out, "{} reads: {}", m.dir.display(), shown.trim_end())?;
        if seen != want {
            bail!("{} saw other bytes than were written", m.dir.display());
        }
    }
    Ok(())
}
