//! The dispatch core's timing settings and their defaults (the server's flags set them).

use std::time::Duration;

/// Timing settings of the dispatch core.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often agents heartbeat (and renew their leases).
    pub heartbeat_interval: Duration,
    /// A lease not renewed for this long expires.
    pub lease_ttl: Duration,
    /// An agent without a heartbeat for this long is unhealthy (gets no new work).
    pub heartbeat_timeout: Duration,
    /// Longest a long-poll is held open.
    pub poll_wait: Duration,
    /// An offer not acquired within this time goes to another agent.
    pub offer_timeout: Duration,
    /// After a cancel (or timeout) the agent has this long to stop before the job is fenced.
    pub cancel_grace: Duration,
    pub default_timeout: Duration,
    pub default_max_attempts: u32,
    /// Interval of the reaper (expiry, timeouts, offers).
    pub tick: Duration,
    /// Application keepalive on idle Listen streams.
    pub stream_ping: Duration,
    /// Unfinished (queued or running) jobs one submitter may have at once.
    pub max_queued_per_submitter: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(4),
            heartbeat_timeout: Duration::from_secs(3),
            poll_wait: Duration::from_secs(20),
            offer_timeout: Duration::from_secs(3),
            cancel_grace: Duration::from_secs(10),
            default_timeout: Duration::from_secs(3600),
            default_max_attempts: 3,
            tick: Duration::from_millis(100),
            stream_ping: Duration::from_secs(30),
            max_queued_per_submitter: es_proto::limits::DEFAULT_MAX_QUEUED_PER_SUBMITTER,
        }
    }
}
