//! One leader among the replicas on one database: the server holding a PostgreSQL advisory
//! lock on its own session leads, and raises the leader epoch when it takes over. Every write
//! transaction checks that epoch (writer.rs), so a leader that lost the lock without knowing
//! it (paused, cut off) can never commit: its next write is refused and it steps down.
//!
//! The lock alone is not enough: a session the database ended (pg_terminate_backend, a
//! partition, a restart) frees the lock while the old leader may still run. The epoch closes
//! that gap; the lock makes the takeover exclusive and fast (a dead leader's session ends,
//! and with it the lock, as soon as the database sees its socket close or its keepalives fail).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::conn::{describe, Database};

/// Advisory lock key of leadership ("es-lead" in ASCII).
pub const LEADER_LOCK: i64 = 0x0065_732d_6c65_6164_i64;

/// How often a standby asks for the lock, and a leader checks its session.
const POLL: Duration = Duration::from_millis(250);
/// A leader's check of its session that takes longer than this counts as a lost session.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// This server's leadership: its epoch, and whether it has been deposed.
pub struct Leadership {
    epoch: i64,
    deposed: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Leadership {
    fn new(epoch: i64) -> Leadership {
        Leadership {
            epoch,
            deposed: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    /// The epoch this server leads with.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Why this server no longer leads, once it does not.
    pub fn deposed_reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Cancelled once this server no longer leads.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }

    /// Records that this server no longer leads (the first reason wins) and says so once.
    pub fn depose(&self, why: String) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            log::error!("deposed: {why}; this server stops leading (its writes are refused)");
            *reason = Some(why);
            self.deposed.cancel();
        }
    }
}

/// Who leads, as a standby sees it: "NAME at ADDRESS".
pub type LeaderSeen = watch::Sender<String>;

/// Waits for leadership: asks for the lock every 250 ms (publishing who leads meanwhile),
/// takes over by raising the epoch, and answers the leadership with the task that keeps it
/// (checks the session every 250 ms; on a lost session, takes the lock again if the epoch is
/// still this server's, else deposes). `None` if `stop` fires first.
pub async fn campaign(
    db: Database,
    me: String,
    address: String,
    seen: LeaderSeen,
    stop: CancellationToken,
) -> Option<(Arc<Leadership>, tokio::task::JoinHandle<()>)> {
    let mut warned = String::new();
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return None,
            c = session(&db) => c,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                if e != warned {
                    log::warn!(
                        "standby: cannot reach the job store {}: {e}; retrying",
                        db.shown()
                    );
                    warned = e;
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let locked = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await
                .map(|r| r.get::<_, bool>(0));
            match locked {
                Ok(true) => match take_over(&client, &me, &address).await {
                    Ok(epoch) => {
                        log::info!("leading the job store {} with epoch {epoch}", db.shown());
                        let leadership = Arc::new(Leadership::new(epoch));
                        let keeper = tokio::spawn(keep(db, client, leadership.clone(), stop));
                        return Some((leadership, keeper));
                    }
                    Err(e) => {
                        log::warn!("taking over the job store failed: {e}; retrying");
                        break;
                    }
                },
                Ok(false) => {
                    if let Ok(row) = client
                        .query_one("SELECT holder, address, epoch FROM leader", &[])
                        .await
                    {
                        let (holder, addr, epoch): (String, String, i64) =
                            (row.get(0), row.get(1), row.get(2));
                        let now = format!("{holder} at {addr} (epoch {epoch})");
                        seen.send_if_modified(|s| {
                            let changed = *s != now;
                            if changed {
                                log::info!("standby: the leader is {now}");
                                *s = now.clone();
                            }
                            changed
                        });
                    }
                }
                Err(e) => {
                    log::warn!(
                        "standby: lost the job store session: {}; reconnecting",
                        describe(&e)
                    );
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// A session for the lock, with the database's keepalives short too: when this server dies
/// or is cut off, the database ends the session (freeing the lock) within seconds.
async fn session(db: &Database) -> Result<Client, String> {
    let client = db.connect().await.map_err(|e| e.to_string())?;
    client
        .batch_execute(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1; \
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 8000",
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok(client)
}

async fn take_over(client: &Client, me: &str, address: &str) -> Result<i64, String> {
    client
        .query_one(
            "UPDATE leader SET epoch = epoch + 1, holder = $1, address = $2, since = now()
             RETURNING epoch",
            &[&me, &address],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| describe(&e))
}

/// Keeps leadership while the lock session lives; ends at `stop` (dropping the session frees
/// the lock for a standby) or once deposed.
async fn keep(db: Database, mut client: Client, me: Arc<Leadership>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = me.deposed.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let check = tokio::time::timeout(
            CHECK_TIMEOUT,
            client.query_one("SELECT epoch FROM leader", &[]),
        )
        .await;
        let lost = match check {
            Ok(Ok(row)) => {
                let epoch: i64 = row.get(0);
                if epoch != me.epoch {
                    me.depose(format!(
                        "another es-server took over the job store (epoch {epoch}, this server's {})",
                        me.epoch
                    ));
                    return;
                }
                continue;
            }
            Ok(Err(e)) => describe(&e),
            Err(_) => format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
        };
        log::warn!("leader: lost the session holding the lock ({lost}); taking it again");
        // The lock is gone with the session. Taking it again is safe only if nobody led in
        // between, which the epoch tells.
        client = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let Ok(c) = session(&db).await else { continue };
            let relocked = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await
                .map(|r| r.get::<_, bool>(0));
            match relocked {
                Ok(true) => {}
                Ok(false) => {
                    me.depose("another es-server holds the leader lock".into());
                    return;
                }
                Err(_) => continue,
            }
            match c.query_one("SELECT epoch FROM leader", &[]).await {
                Ok(row) if row.get::<_, i64>(0) == me.epoch => {
                    log::info!("leader: holding the lock again (epoch {})", me.epoch);
                    break c;
                }
                Ok(row) => {
                    me.depose(format!(
                        "another es-server led the job store meanwhile (epoch {}, this server's {})",
                        row.get::<_, i64>(0),
                        me.epoch
                    ));
                    return;
                }
                Err(_) => continue,
            }
        };
    }
}
