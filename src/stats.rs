//! `shoal stats`: a share's lease counters, asked over the lease channel like any client.

/// Prints the lease counters of the share at `share` (`HOST:PORT`).
pub fn run(share: &str) -> anyhow::Result<()> {
    use shoal_nfs::channel::client::{Client, ClientOptions};
    use shoal_nfs::channel::proto::{Reply, Request};
    let c = crate::runtime()?.block_on(async {
        let opts = ClientOptions {
            name: format!("shoal-stats@{}", crate::hostname()),
            caching: false,
            ..ClientOptions::default()
        };
        let (client, _, _) = Client::connect(share, opts).await?;
        match client.call(Request::Counters).await? {
            Reply::Counters(c) => Ok::<_, anyhow::Error>(c),
            other => anyhow::bail!("unexpected reply: {other:?}"),
        }
    })?;
    let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} us"));
    println!("sessions          {}", c.sessions);
    println!("leases held       {}", c.leases_held);
    println!("recalls sent      {}", c.recalls_sent);
    println!("recalls acked     {}", c.recalls_acked);
    println!("recalls expired   {}", c.recalls_expired);
    println!("sessions revoked  {}", c.sessions_revoked);
    println!("recall rtt median {}", us(c.recall_rtt_median_us));
    println!("recall rtt p99    {}", us(c.recall_rtt_p99_us));
    Ok(())
}
