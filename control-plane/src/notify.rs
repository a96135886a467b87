//! Wake-ups for agents' long polls.
//!
//! Every transaction that changes what a host must run bumps `hosts.generation`
//! and calls `pg_notify('nimbus_host', host_id)`; PostgreSQL delivers the
//! notification when (and only if) the transaction commits, to every control
//! plane replica. One listener task per process fans it out to the long polls
//! waiting for that host. A lost notification only delays an agent until its
//! poll times out: the generation in the database is the truth.

use sqlx::postgres::{PgListener, PgPool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub const CHANNEL: &str = "nimbus_host";

#[derive(Clone, Default)]
pub struct HostEvents {
    senders: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
    /// Per host, the number of the newest long poll (see [`HostEvents::begin_poll`]).
    polls: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

/// A long poll's place in its host's line: only the newest poll of a host
/// waits; beginning one ends the wait of the one before.
pub struct PollTicket {
    mine: u64,
    newest: watch::Receiver<u64>,
}

impl PollTicket {
    /// Resolves once a newer poll of the same host has begun.
    pub async fn superseded(&mut self) {
        let mine = self.mine;
        // An error means the sender is gone: nothing newer can begin, wait forever.
        if self.newest.wait_for(|n| *n != mine).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl HostEvents {
    /// Begins a long poll of `host_id`. A host has one agent and needs one
    /// poll at a time: a new poll (an agent that restarted, or one credential
    /// used many times at once) ends the wait of the previous one, which then
    /// answers at once, so one credential cannot hold many requests open.
    pub fn begin_poll(&self, host_id: &str) -> PollTicket {
        let mut polls = self.polls.lock().unwrap_or_else(|p| p.into_inner());
        polls.retain(|_, tx| tx.receiver_count() > 0);
        let tx = polls.entry(host_id.to_string()).or_insert_with(|| watch::channel(0).0);
        let mut mine = 0;
        tx.send_modify(|n| {
            *n += 1;
            mine = *n;
        });
        PollTicket { mine, newest: tx.subscribe() }
    }

    /// A receiver that changes whenever `host_id` is notified.
    pub fn subscribe(&self, host_id: &str) -> watch::Receiver<u64> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.entry(host_id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// How many long polls of `host_id` wait for a notification now.
    pub fn waiting(&self, host_id: &str) -> usize {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.get(host_id).map_or(0, |tx| tx.receiver_count())
    }

    pub fn notify(&self, host_id: &str) {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(host_id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn notify_all(&self) {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|_, tx| tx.receiver_count() > 0);
        for tx in senders.values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Listens for `nimbus_host` notifications until the process ends or
    /// the pool is closed.
    pub fn spawn_listener(&self, pool: PgPool) {
        let events = self.clone();
        tokio::spawn(async move {
            loop {
                if pool.is_closed() {
                    return;
                }
                match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(e) = listener.listen(CHANNEL).await {
                            tracing::warn!(error = %e, "LISTEN failed");
                        } else {
                            // Anything may have changed while we were not listening.
                            events.notify_all();
                            loop {
                                match listener.try_recv().await {
                                    Ok(Some(n)) => events.notify(n.payload()),
                                    Ok(None) => {
                                        tracing::warn!("notification connection lost; reconnecting");
                                        events.notify_all();
                                    }
                                    Err(_) if pool.is_closed() => return,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "notification listener failed");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot connect notification listener"),
                }
                events.notify_all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
