//! `shoal bench`: what a lease recall costs a writer, and small-file throughput through one
//! mount, measured on a share started in-process on a temporary export.
//!
//! Recall round trip: two mounts, A and B, of the same share. Each iteration A overwrites a
//! small file with `pwrite(2)` (on a descriptor opened once) while no other mount holds a
//! lease on it (the baseline), B reads it (which grants B a lease), and A overwrites it
//! again: that write returns only after the server has recalled B's lease and B has
//! acknowledged. B checks that every read returns the bytes of the write before it, so the
//! benchmark is a consistency check as well.
//!
//! Small files: create+write+close, stat, read and remove N files through one mount, and the
//! same directly on the export's filesystem for reference.
//!
//! Owns the measurement and its report only; starting the share and the mounts is
//! [`crate::local`]'s.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::local::LocalShare;

/// What `shoal bench` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Recall iterations (B reads, A overwrites); 0 skips the recall benchmark.
    pub iterations: usize,
    /// Small files for the throughput pass; 0 skips it.
    pub files: usize,
    /// Bytes written to each small file.
    pub file_size: usize,
    /// Where the temporary export is created (default: the system temporary directory).
    pub dir: Option<PathBuf>,
    /// Lease term of the share.
    pub lease_term: Duration,
}

/// Sorted latencies and their percentiles.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort();
        Latencies(samples)
    }

    fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0[((self.0.len() - 1) as f64 * p).round() as usize]
    }

    fn line(&self) -> String {
        format!(
            "median {:>9}  p99 {:>9}  max {:>9}",
            us(self.pct(0.5)),
            us(self.pct(0.99)),
            us(self.pct(1.0))
        )
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn opt_us(d: Option<Duration>) -> String {
    d.map(us).unwrap_or_else(|| "-".into())
}

pub fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let local = LocalShare::start("shoal-bench.", opts.dir.as_deref(), opts.lease_term)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "shoal bench: export {} served on {} (lease channel {}), lease term {:?}",
        local.export.display(),
        local.running.nfs_addr,
        local.running.channel_addr,
        opts.lease_term
    )?;
    let a = local.mount("bench-a")?;
    let b = local.mount("bench-b")?;
    writeln!(out, "mounts: A {}  B {}", a.dir.display(), b.dir.display())?;

    if opts.iterations > 0 {
        recall(&mut out, &local, &a.dir, &b.dir, opts.iterations)?;
    }
    if opts.files > 0 {
        small_files(&mut out, &local, &a.dir, opts.files, opts.file_size)?;
    }
    drop(b);
    drop(a);
    drop(local);
    Ok(())
}

/// The content of iteration `i`: always the same length, so a stale read cannot hide.
fn content(i: usize) -> Vec<u8> {
    format!("shoal bench iteration {i:010}\n").into_bytes()
}

fn recall(
    out: &mut impl Write,
    local: &LocalShare,
    a: &Path,
    b: &Path,
    iterations: usize,
) -> anyhow::Result<()> {
    let name = "recall.txt";
    std::fs::write(a.join(name), content(0)).context("creating the file on A")?;
    let file = OpenOptions::new()
        .write(true)
        .open(a.join(name))
        .context("opening the file on A")?;

    // Each iteration pairs a write with no other holder (B's lease was recalled by the
    // previous iteration and B has not read since) with one that must recall B's lease, so
    // both see the same machine load.
    let before = local.running.share.leases.stats();
    let mut alone = Vec::with_capacity(iterations);
    let mut held = Vec::with_capacity(iterations);
    let mut reads = Vec::with_capacity(iterations);
    for i in 1..=iterations {
        let t = Instant::now();
        file.write_all_at(&content(2 * i - 1), 0)?;
        alone.push(t.elapsed());

        let t = Instant::now();
        let seen = std::fs::read(b.join(name)).context("reading on B")?;
        reads.push(t.elapsed());
        if seen != content(2 * i - 1) {
            bail!(
                "iteration {i}: B read {:?}, expected {:?}",
                String::from_utf8_lossy(&seen),
                String::from_utf8_lossy(&content(2 * i - 1))
            );
        }

        let t = Instant::now();
        file.write_all_at(&content(2 * i), 0)?;
        held.push(t.elapsed());
    }
    let after = local.running.share.leases.stats();
    drop(file);

    let (alone, held, reads) = (
        Latencies::new(alone),
        Latencies::new(held),
        Latencies::new(reads),
    );
    writeln!(out)?;
    writeln!(
        out,
        "recall round trip: {iterations} iterations, {} B file, A overwrites with pwrite(2)",
        content(0).len()
    )?;
    writeln!(out, "  write on A, no other holder       {}", alone.line())?;
    writeln!(out, "  write on A, B holds a lease       {}", held.line())?;
    writeln!(
        out,
        "  added by the recall (median)      {}",
        us(held.pct(0.5).saturating_sub(alone.pct(0.5)))
    )?;
    writeln!(out, "  read on B (open+read+close)       {}", reads.line())?;
    writeln!(
        out,
        "  server recall round trip          median {:>9}  p99 {:>9}  (last {} samples)",
        opt_us(after.recall_rtt_median),
        opt_us(after.recall_rtt_p99),
        after.recalls_acked.min(4096)
    )?;
    writeln!(
        out,
        "  recalls during the run            sent {}  acked {}  expired {}  (total sent {})",
        after.recalls_sent - before.recalls_sent,
        after.recalls_acked - before.recalls_acked,
        after.recalls_expired - before.recalls_expired,
        after.recalls_sent
    )?;
    if after.recalls_sent - before.recalls_sent != iterations as u64 {
        writeln!(
            out,
            "  note: recalls sent differ from iterations: some writes did not recall exactly once"
        )?;
    }
    Ok(())
}

/// One throughput phase: `op` on each of `paths`, in ops/s.
fn phase(
    paths: &[PathBuf],
    mut op: impl FnMut(&Path) -> std::io::Result<()>,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    for p in paths {
        op(p).with_context(|| format!("{}", p.display()))?;
    }
    Ok(paths.len() as f64 / t.elapsed().as_secs_f64())
}

/// create+write+close, stat, read, remove of `files` files in a fresh directory under
/// `root`; returns ops/s per phase.
fn file_phases(root: &Path, files: usize, size: usize) -> anyhow::Result<[f64; 4]> {
    let dir = root.join("small-files");
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths: Vec<PathBuf> = (0..files).map(|i| dir.join(format!("f{i:06}"))).collect();
    let data = vec![0x5a_u8; size];
    let create = phase(&paths, |p| File::create(p)?.write_all(&data))?;
    let stat = phase(&paths, |p| std::fs::metadata(p).map(drop))?;
    let read = phase(&paths, |p| {
        let got = std::fs::read(p)?;
        if got.len() != size {
            return Err(std::io::Error::other(format!(
                "read {} bytes, expected {size}",
                got.len()
            )));
        }
        Ok(())
    })?;
    let remove = phase(&paths, |p| std::fs::remove_file(p))?;
    std::fs::remove_dir(&dir)?;
    Ok([create, stat, read, remove])
}

fn small_files(
    out: &mut impl Write,
    local: &LocalShare,
    mount: &Path,
    files: usize,
    size: usize,
) -> anyhow::Result<()> {
    let fuse = file_phases(mount, files, size)?;
    // The same on the export's own filesystem, beside the export so the share never sees it.
    let reference = file_phases(local.work.path(), files, size)?;
    writeln!(out)?;
    writeln!(
        out,
        "small files: {files} files of {size} B, one thread, through mount A vs. the export's filesystem directly"
    )?;
    writeln!(
        out,
        "  {:<20} {:>14} {:>14}",
        "phase", "shoal mount", "local fs"
    )?;
    let names = ["create+write+close", "stat", "read", "remove"];
    for (i, name) in names.iter().enumerate() {
        writeln!(
            out,
            "  {:<20} {:>8.0} ops/s {:>8.0} ops/s",
            name, fuse[i], reference[i]
        )?;
    }
    Ok(())
}
