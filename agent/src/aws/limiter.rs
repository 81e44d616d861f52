//! Agent-wide EC2 request pacing: token buckets per API action, shared by every job of the
//! agent, so that a burst (several large deploys at once) waits for tokens instead of being
//! throttled by EC2 and burning the SDK's retry quota.
//!
//! The sizes are EC2's documented defaults for an account and region: non-mutating actions
//! (Describe*) 100 tokens refilling 20 per second; mutating actions 50 refilling 5 per second;
//! RunInstances 1000 refilling 2 per second. Accounts with raised limits can turn the pacing off
//! (`aws_rate_limit = false`); throttling that still happens is retried by the SDK.
//!
//! It sits in the HTTP layer (a wrapper around the SDK's HTTP client), where the action name is
//! in the request body of EC2's query protocol, so every call of every operation is paced
//! without touching the call sites.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;

#[derive(Debug)]
struct Bucket {
    size: f64,
    refill: f64,
    tokens: f64,
    at: Instant,
}

/// Token buckets by action.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// EC2's default bucket (size, refill per second) for an action.
pub fn ec2_bucket(action: &str) -> (f64, f64) {
    if action == "RunInstances" {
        (1000.0, 2.0)
    } else if action.starts_with("Describe") {
        (100.0, 20.0)
    } else {
        (50.0, 5.0)
    }
}

impl Limiter {
    /// How long to wait before a token for `action` is available at `now`; takes it when 0.
    fn try_take(&self, action: &str, now: Instant) -> Duration {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(action.to_owned()).or_insert_with(|| {
            let (size, refill) = ec2_bucket(action);
            Bucket {
                size,
                refill,
                tokens: size,
                at: now,
            }
        });
        // `now` was read before the lock: a caller that read it earlier than the last update
        // must not move `at` back (that would count the same refill twice).
        if now > b.at {
            b.tokens = (b.tokens + (now - b.at).as_secs_f64() * b.refill).min(b.size);
            b.at = now;
        }
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / b.refill)
        }
    }

    /// Waits for a token for `action`.
    pub async fn acquire(&self, action: &str) {
        loop {
            let wait = self.try_take(action, Instant::now());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// The action of an EC2 (query protocol) request body.
fn action_of(body: &[u8]) -> String {
    std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.split('&').find_map(|p| p.strip_prefix("Action=")))
        .unwrap_or("Unknown")
        .to_owned()
}

/// The SDK's HTTP client, with every request paced by `limiter`.
#[derive(Debug, Clone)]
pub struct PacedClient {
    pub inner: SharedHttpClient,
    pub limiter: Arc<Limiter>,
}

impl HttpClient for PacedClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(PacedConnector {
            inner: self.inner.http_connector(settings, components),
            limiter: self.limiter.clone(),
        })
    }
}

#[derive(Debug)]
struct PacedConnector {
    inner: SharedHttpConnector,
    limiter: Arc<Limiter>,
}

impl HttpConnector for PacedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let action = request
            .body()
            .bytes()
            .map(action_of)
            .unwrap_or_else(|| "Unknown".into());
        let (inner, limiter) = (self.inner.clone(), self.limiter.clone());
        HttpConnectorFuture::new(async move {
            // EC2's buckets only: other services (SSM, Instance Connect, S3) pass unpaced.
            if action != "Unknown" {
                limiter.acquire(&action).await;
            }
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_drain_and_refill_at_ec2_rates() {
        let l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..50 {
            assert_eq!(l.try_take("CreateSecurityGroup", t0), Duration::ZERO);
        }
        // Empty: the 51st waits 1/5 s; 0.2 s later it goes through.
        let wait = l.try_take("CreateSecurityGroup", t0);
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            l.try_take("CreateSecurityGroup", t0 + Duration::from_millis(200)),
            Duration::ZERO
        );
        // Buckets are per action: another mutating action still has its 50.
        assert_eq!(
            l.try_take("AuthorizeSecurityGroupIngress", t0),
            Duration::ZERO
        );
        assert_eq!(ec2_bucket("DescribeInstances"), (100.0, 20.0));
        assert_eq!(ec2_bucket("RunInstances"), (1000.0, 2.0));
        assert_eq!(
            action_of(b"Action=RunInstances&Version=2016-11-15"),
            "RunInstances"
        );
    }
}
