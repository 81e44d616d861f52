//! Following a job to its end across server restarts and failovers: `watch`, `submit --wait`
//! and `sandbox up` resume after the last event they saw (Watch's `after_seq`) on a new
//! connection, and give up only after `--give-up-after` (ES_GIVE_UP_AFTER) with no server at
//! all, with exit 69. The job itself goes on at the server either way.

use std::time::{Duration, Instant};

use es_proto::v1::{JobEvent, WatchRequest};

use super::args::ClientOpts;
use super::conn::{connect, CliError, Client, EXIT_UNAVAILABLE};

/// First wait before reconnecting; doubled up to `MAX_DELAY`.
const BASE_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// A lost stream or server, worth reconnecting for (a restart, a failover, a cut), as opposed
/// to an answer (not found, not allowed).
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable | Unknown | Internal | Cancelled | DeadlineExceeded | Aborted
    )
}

/// Calls `on_event` for each event of `job_id` in order, each once, until the job's stream ends
/// (after its result). `c` is replaced by a new connection when the server is lost.
pub async fn follow(
    opts: &ClientOpts,
    c: &mut Client,
    job_id: &str,
    mut on_event: impl FnMut(&JobEvent),
) -> Result<(), CliError> {
    let mut after = 0u64;
    let mut outage: Option<Instant> = None;
    let mut delay = BASE_DELAY;
    loop {
        let watched = c
            .watch(WatchRequest {
                job_id: job_id.to_owned(),
                after_seq: after,
            })
            .await;
        let lost = match watched {
            Err(s) => s,
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            if outage.take().is_some() {
                                eprintln!("es-server: reconnected; resumed after event #{after}");
                            }
                            delay = BASE_DELAY;
                            after = after.max(ev.seq);
                            on_event(&ev);
                        }
                        Ok(None) => return Ok(()),
                        Err(s) => break s,
                    }
                }
            }
        };
        if !transient(&lost) {
            return Err(lost.into());
        }
        let since = *outage.get_or_insert_with(|| {
            eprintln!(
                "es-server: lost the server ({:?}: {}); reconnecting, resuming after event #{after}",
                lost.code(),
                lost.message()
            );
            Instant::now()
        });
        if since.elapsed() >= opts.give_up_after {
            return Err(CliError {
                code: EXIT_UNAVAILABLE,
                message: format!(
                    "no server answered for {} ({}); job {job_id} goes on: `es-server watch {job_id}` follows it again",
                    humantime::format_duration(opts.give_up_after),
                    lost.message()
                ),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
        if let Ok(fresh) = connect(opts).await {
            *c = fresh;
        }
    }
}
