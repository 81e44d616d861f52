//! EC2 client construction (standard credential chain, endpoint override for emulators, assumed
//! roles), the per-job call counter, error classification and tag helpers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use es_proto::v1::Job;
use std::sync::Arc;

use super::{Result, ShellsError, CREATED_BY, TAG_CREATED_BY, TAG_SANDBOX};

/// AWS settings of the agent (from its configuration).
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Region; empty = the standard chain (AWS_REGION, profile, IMDS).
    pub region: String,
    /// Endpoint override (an emulator such as moto); empty = AWS.
    pub endpoint_url: String,
    /// Attempts per call for throttling and 5xx (SDK standard retry mode).
    pub max_attempts: u32,
    /// Longest single attempt of a call (then it is abandoned and retried); zero = 30 s.
    pub call_timeout: Duration,
    /// Concurrent EC2 calls of one job (e.g. RunInstances of a DeploySandbox).
    pub concurrency: usize,
    /// Pace requests with EC2's default token buckets (see `limiter.rs`).
    pub rate_limit: bool,
    /// Roles jobs may assume (`assume_roles`); empty = none.
    pub assume_roles: Vec<super::assume::AllowedRole>,
    /// A sweep never touches a sandbox younger than this (`sweep_min_age`).
    pub sweep_min_age: Duration,
}

/// Counts a job's AWS calls (attempts) by operation; with a job context it also reports each
/// mutating call (with the resource ids it named or returned) as a job event for the audit
/// trail, and counts attempts into the agent's metrics.
#[derive(Default)]
pub struct CallCounter {
    counts: Mutex<HashMap<String, u64>>,
    events: Option<tokio::sync::mpsc::UnboundedSender<crate::job::JobEventOut>>,
    metrics: Option<Arc<crate::metrics::AgentMetrics>>,
}

impl std::fmt::Debug for CallCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCounter").finish_non_exhaustive()
    }
}

impl CallCounter {
    /// A counter for one job: audit events go to the job's event stream.
    pub fn for_job(ctx: &crate::job::JobCtx) -> Arc<CallCounter> {
        Arc::new(CallCounter {
            counts: Mutex::default(),
            events: Some(ctx.events.clone()),
            metrics: Some(ctx.metrics.clone()),
        })
    }

    pub fn snapshot(&self) -> HashMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Interceptor that counts each attempt of a call into a [`CallCounter`] (any AWS SDK client).
#[derive(Debug)]
pub(crate) struct Count(pub Arc<CallCounter>);

impl Intercept for Count {
    fn name(&self) -> &'static str {
        "es-call-counter"
    }

    fn read_before_attempt(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let op = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| m.name().to_owned())
            .unwrap_or_else(|| "unknown".into());
        *self
            .0
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op)
            .or_default() += 1;
        Ok(())
    }

    fn read_before_transmit(
        &self,
        ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let (service, op) = call_names(cfg);
        if self.0.events.is_none() || !audit::mutating(&op) {
            return Ok(());
        }
        let req = ctx.request();
        let body = req
            .body()
            .bytes()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let ids = audit::request_ids(&service, req.uri(), &body);
        cfg.interceptor_state().store_put(audit::RequestIds(ids));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(m) = &self.0.metrics {
            let (service, op) = call_names(cfg);
            let outcome = match ctx.response() {
                Some(r) => audit::classify(r.status().as_u16(), r.body().bytes()).0,
                None => "error",
            };
            m.aws_call(&service, &op, outcome);
        }
        Ok(())
    }

    fn read_after_execution(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let Some(events) = &self.0.events else {
            return Ok(());
        };
        let (service, operation) = call_names(cfg);
        if !audit::mutating(&operation) {
            return Ok(());
        }
        let mut ids = cfg
            .load::<audit::RequestIds>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let error = match ctx.response() {
            Some(r) => {
                let body = r.body().bytes();
                if let Some(b) = body {
                    audit::response_ids(&service, &String::from_utf8_lossy(b), &mut ids);
                }
                audit::classify(r.status().as_u16(), body).1
            }
            None => "no response (transport error or timeout)".to_owned(),
        };
        let _ = events.send(crate::job::JobEventOut::AwsCall(es_proto::v1::AwsCall {
            service,
            operation,
            resource_ids: ids,
            error,
            at_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
        }));
        Ok(())
    }
}

/// (service, operation) of the call being made, e.g. ("ec2", "RunInstances").
fn call_names(cfg: &ConfigBag) -> (String, String) {
    cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
        .map(|m| (m.service().to_ascii_lowercase(), m.name().to_owned()))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

/// What the audit trail records of a call, read from the wire: resource ids in the request and
/// the response, and the error code. Works for every protocol the agent uses (EC2 query, JSON
/// for SSM and Instance Connect, REST-XML for S3) without a per-operation table.
pub(crate) mod audit {
    use std::sync::LazyLock;

    use aws_smithy_types::config_bag::{Storable, StoreReplace};
    use regex::Regex;

    /// Ids found in a call's request, kept until its response is read.
    #[derive(Debug, Clone)]
    pub struct RequestIds(pub Vec<String>);
    impl Storable for RequestIds {
        type Storer = StoreReplace<Self>;
    }

    /// At most this many ids per call are recorded.
    const MAX_IDS: usize = 64;

    static EC2_ID: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\b(?:i|vpc|subnet|sg|rtb|rtbassoc|igw|pcx|eipalloc|eipassoc|eni|eni-attach|tgw|tgw-attach|vol|ami|acl|aclassoc|nat|snap)-[0-9a-f]{8,17}\b")
            .expect("static regex")
    });
    static XML_CODE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"<Code>([^<]{1,128})</Code>").expect("static regex"));
    static JSON_TYPE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r##""__type"\s*:\s*"(?:[^"#]*#)?([^"]{1,128})""##).expect("static regex")
    });

    /// Describe*, Get*, List* only read.
    pub fn mutating(op: &str) -> bool {
        !(op.starts_with("Describe") || op.starts_with("Get") || op.starts_with("List"))
    }

    fn push(ids: &mut Vec<String>, id: &str) {
        if ids.len() < MAX_IDS && !ids.iter().any(|x| x == id) {
            ids.push(id.to_owned());
        }
    }

    static UUID: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
            .expect("static regex")
    });

    /// A whole string that is an EC2 id or a UUID (SSM command ids).
    fn id(s: &str, ids: &mut Vec<String>) {
        let ec2 = EC2_ID.find(s).is_some_and(|m| m.len() == s.len());
        if ec2 || UUID.is_match(s) {
            push(ids, s);
        }
    }

    /// Ids are taken only from fields that hold ids, never from free text: a request or response
    /// may carry a script with secret values (SSM `Parameters`), user data, tag values or command
    /// output, and none of that may reach the audit trail.
    ///
    /// EC2 (query protocol): the values of parameters named `...Id` (`InstanceId.1`, `VpcId`,
    /// `NetworkInterface.1.SubnetId`, ...).
    fn form_ids(body: &str, ids: &mut Vec<String>) {
        for pair in body.split('&') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let name = key
                .rsplit('.')
                .find(|p| !p.chars().all(|c| c.is_ascii_digit()))
                .unwrap_or(key);
            if name.ends_with("Id") {
                id(value, ids);
            }
        }
    }

    /// JSON protocols (SSM, EC2 Instance Connect): string values of the fields `InstanceId`,
    /// `InstanceIds` and `CommandId`, at any depth.
    fn json_ids(v: &serde_json::Value, ids: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("InstanceId" | "CommandId", serde_json::Value::String(s)) => id(s, ids),
                        ("InstanceIds", serde_json::Value::Array(a)) => {
                            for s in a.iter().filter_map(|x| x.as_str()) {
                                id(s, ids);
                            }
                        }
                        (_, v) => json_ids(v, ids),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| json_ids(x, ids)),
            _ => {}
        }
    }

    pub fn request_ids(service: &str, uri: &str, body: &str) -> Vec<String> {
        let mut ids = Vec::new();
        if service == "s3" {
            // The object written: s3://bucket/key (path-style) or the key (virtual host). The
            // body (command output) is never read.
            let path = uri
                .split("://")
                .nth(1)
                .and_then(|r| r.find('/').map(|i| &r[i..]))
                .unwrap_or(uri);
            let path = path.split('?').next().unwrap_or(path);
            push(&mut ids, &format!("s3:/{path}"));
        } else if body.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str(body) {
                json_ids(&v, &mut ids);
            }
        } else if service == "ec2" {
            form_ids(body, &mut ids);
        }
        ids
    }

    pub fn response_ids(service: &str, body: &str, ids: &mut Vec<String>) {
        if body.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str(body) {
                json_ids(&v, ids);
            }
        } else if service == "ec2" {
            // EC2 answers in XML with ids in their own elements (<instanceId>, <vpcId>, ...);
            // no EC2 operation the agent calls echoes user data or other free text.
            for m in EC2_ID.find_iter(body) {
                push(ids, m.as_str());
            }
        }
    }

    /// (metrics outcome, audit error): `ok`/"" for a 2xx; `throttled` or `error` with the
    /// service's error code otherwise.
    pub fn classify(status: u16, body: Option<&[u8]>) -> (&'static str, String) {
        if (200..300).contains(&status) {
            return ("ok", String::new());
        }
        let text = body.map(String::from_utf8_lossy).unwrap_or_default();
        let code = XML_CODE
            .captures(&text)
            .or_else(|| JSON_TYPE.captures(&text))
            .map(|c| c[1].to_owned())
            .unwrap_or_else(|| format!("HTTP {status}"));
        let throttled = status == 429
            || [
                "Throttling",
                "ThrottlingException",
                "RequestLimitExceeded",
                "TooManyRequestsException",
                "SlowDown",
                "RequestThrottled",
            ]
            .contains(&code.as_str());
        (if throttled { "throttled" } else { "error" }, code)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_and_codes_from_the_wire() {
            let ids = request_ids(
                "ec2",
                "http://127.0.0.1:5000/",
                "Action=RunInstances&ImageId=ami-12345678&SubnetId=subnet-0123456789abcdef0&SecurityGroupId.1=sg-0aaaaaaaaaaaaaaaa",
            );
            assert_eq!(
                ids,
                [
                    "ami-12345678",
                    "subnet-0123456789abcdef0",
                    "sg-0aaaaaaaaaaaaaaaa"
                ]
            );
            // A secret that looks like an id, in user data, a tag value or the script's
            // parameters, is not an id field and is never recorded.
            let ids = request_ids(
                "ec2",
                "http://127.0.0.1:5000/",
                "Action=RunInstances&UserData=vol-0123456789abcdef0&TagSpecification.1.Tag.1.Value=sg-11111111&NetworkInterface.1.SubnetId=subnet-22222222",
            );
            assert_eq!(ids, ["subnet-22222222"]);
            let mut ids = request_ids(
                "ssm",
                "https://ssm.us-east-1.amazonaws.com/",
                r#"{"Comment":"es job 0195f0a2-0000-7000-8000-000000000000","InstanceIds":["i-0123456789abcdef0"],"Parameters":{"commands":["export TOKEN='vol-0123456789abcdef0'"]}}"#,
            );
            response_ids(
                "ssm",
                r#"{"Command":{"CommandId":"3b9d1f2e-1111-2222-3333-444455556666","Parameters":{"commands":["export TOKEN='sg-0aaaaaaaaaaaaaaaa'"]}}}"#,
                &mut ids,
            );
            // The job id in the comment and the secrets are not resources; the command id is.
            assert_eq!(
                ids,
                [
                    "i-0123456789abcdef0",
                    "3b9d1f2e-1111-2222-3333-444455556666"
                ]
            );
            assert_eq!(
                request_ids(
                    "s3",
                    "http://127.0.0.1:9/bucket/out/job/i-1.txt?x-id=PutObject",
                    ""
                ),
                ["s3://bucket/out/job/i-1.txt"]
            );
            assert_eq!(classify(200, None), ("ok", String::new()));
            let xml = b"<Response><Errors><Error><Code>RequestLimitExceeded</Code></Error></Errors></Response>";
            assert_eq!(classify(503, Some(xml)).0, "throttled");
            let json = br#"{"__type":"com.amazonaws.ssm#InvalidInstanceId","message":"x"}"#;
            assert_eq!(
                classify(400, Some(json)),
                ("error", "InvalidInstanceId".to_owned())
            );
            assert_eq!(classify(500, None), ("error", "HTTP 500".to_owned()));
            assert!(mutating("TerminateInstances") && !mutating("DescribeVpcs"));
        }
    }
}

pub(crate) struct Aws {
    pub settings: AwsSettings,
    base: SdkConfig,
}

impl Aws {
    pub async fn new(mut settings: AwsSettings) -> Aws {
        if settings.max_attempts == 0 {
            settings.max_attempts = 8;
        }
        if settings.concurrency == 0 {
            settings.concurrency = 16;
        }
        if settings.call_timeout.is_zero() {
            settings.call_timeout = Duration::from_secs(30);
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(settings.call_timeout))
                    .operation_attempt_timeout(settings.call_timeout)
                    .build(),
            );
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if !settings.endpoint_url.is_empty() {
            loader = loader.endpoint_url(settings.endpoint_url.clone());
        }
        let mut base = loader.load().await;
        if settings.rate_limit {
            // The SDK picks its default client lazily; build the same one (hyper 1, rustls with
            // aws-lc) here so it can be wrapped.
            let inner = base.http_client().unwrap_or_else(|| {
                use aws_smithy_http_client::tls;
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(
                        tls::rustls_provider::CryptoMode::AwsLc,
                    ))
                    .build_https()
            });
            let paced = super::limiter::PacedClient {
                inner,
                limiter: Arc::new(super::limiter::Limiter::default()),
            };
            base = base.into_builder().http_client(paced).build();
        }
        Aws { base, settings }
    }

    /// The SDK configuration for the job's `spec.target` (assumed role and region), or the
    /// agent's own. A role that is not on the agent's allow-list is refused before any call.
    pub fn sdk_config(&self, job: &Job) -> Result<SdkConfig> {
        let mut sdk = self.base.clone();
        let Some(t) = job.spec.as_ref().and_then(|s| s.target.as_ref()) else {
            return Ok(sdk);
        };
        let region = if t.region.is_empty() {
            sdk.region().cloned()
        } else {
            Some(Region::new(t.region.clone()))
        };
        if let Some(r) = region {
            sdk = sdk.into_builder().region(r).build();
        }
        if !t.role_arn.is_empty() {
            let Some(allowed) = super::assume::allowed(&self.settings.assume_roles, &t.role_arn)
            else {
                return Err(ShellsError::Invalid {
                    field: "spec.target.role_arn".into(),
                    reason: format!(
                        "{} is not on this agent's allow-list of roles to assume: the operator adds it (or its account) to `assume_roles` in the agent's configuration",
                        es_proto::limits::clip(&t.role_arn, 200)
                    ),
                });
            };
            let role =
                super::assume::JobRole::new(&sdk, allowed, &t.role_arn, &job.id, &job.submitted_by);
            sdk = sdk
                .into_builder()
                .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(role))
                .build();
        }
        Ok(sdk)
    }

    /// An EC2 client for the job's target (assumed role and region) that counts calls into
    /// `calls`.
    pub fn client(&self, job: &Job, calls: Arc<CallCounter>) -> Result<aws_sdk_ec2::Client> {
        let sdk = self.sdk_config(job)?;
        let conf = aws_sdk_ec2::config::Builder::from(&sdk)
            .interceptor(Count(calls))
            .build();
        Ok(aws_sdk_ec2::Client::from_conf(conf))
    }
}

/// The given instances, every page of them (EC2 implementations may page even when ids are
/// given: moto answers 100 at a time).
pub(crate) async fn describe_ids(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut all = Vec::new();
    for chunk in ids.chunks(1000) {
        let mut token: Option<String> = None;
        loop {
            let r = retry_consistency(|| {
                ec2.describe_instances()
                    .set_instance_ids(Some(chunk.to_vec()))
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .map_err(|e| aws_err("DescribeInstances", e))?;
            for res in r.reservations() {
                all.extend(res.instances().iter().cloned());
            }
            token = r.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(all)
}

/// The error code of an SDK error ("" for transport errors).
pub fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> String {
    e.code().unwrap_or("").to_owned()
}

/// Turns an SDK error into a job error, with a hint for the errors people can fix.
pub fn aws_err<E, R>(op: &'static str, e: SdkError<E, R>) -> ShellsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = code(&e);
    let message = e.message().map(str::to_owned).unwrap_or_else(|| {
        format!(
            "{}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        )
    });
    let hint = if code.starts_with("InvalidAMIID") {
        " (the AMI does not exist in this region or account: check `ami`)"
    } else if matches!(
        code.as_str(),
        "InstanceLimitExceeded"
            | "VcpuLimitExceeded"
            | "VpcLimitExceeded"
            | "AddressLimitExceeded"
            | "InsufficientInstanceCapacity"
    ) {
        " (a quota or capacity limit: request an increase, or deploy fewer or smaller apps)"
    } else if matches!(
        code.as_str(),
        "InvalidSubnet.Conflict" | "InvalidVpc.Range" | "InvalidSubnet.Range"
    ) {
        " (a CIDR conflict: choose a CIDR that is free and inside the VPC)"
    } else if code == "UnauthorizedOperation" || code == "AccessDenied" {
        " (the agent's IAM role lacks this permission)"
    } else {
        ""
    };
    ShellsError::Aws {
        op,
        code,
        message,
        hint: hint.to_owned(),
    }
}

/// True for errors that mean "it is already there".
pub fn already_exists(code: &str) -> bool {
    matches!(
        code,
        "InvalidPermission.Duplicate"
            | "RouteAlreadyExists"
            | "Resource.AlreadyAssociated"
            | "InvalidGroup.Duplicate"
    )
}

/// True for errors that mean "it is already gone".
pub fn already_gone(code: &str) -> bool {
    code.ends_with(".NotFound") || code == "InvalidVpcPeeringConnectionID.NotFound"
}

/// Retries `f` while EC2 answers `*.NotFound` (eventual consistency right after a create) or a
/// dependency violation, with exponential backoff: 10 tries over about 10 s.
pub async fn retry_consistency<T, E, R, F, Fut>(mut f: F) -> std::result::Result<T, SdkError<E, R>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if tries < 9 && consistency_error(&code(&e)) => {
                tries += 1;
                let jitter = rand::random_range(0..=delay.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter) + delay / 2).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            other => return other,
        }
    }
}

/// Errors that a moment of waiting may fix: a resource not visible yet right after its
/// creation, or a dependency still being released. A missing AMI is a real error.
fn consistency_error(code: &str) -> bool {
    (code.ends_with(".NotFound") && !code.starts_with("InvalidAMIID"))
        || code == "DependencyViolation"
}

pub fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(|v| v.to_string()).collect()))
        .build()
}

pub fn sandbox_filter(sandbox: &str) -> Filter {
    filter(&format!("tag:{TAG_SANDBOX}"), &[sandbox])
}

pub fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// TagSpecification for a resource created for `sandbox`, with extra tags.
pub fn tags(
    rt: ResourceType,
    sandbox: &str,
    name: &str,
    extra: &[(&str, &str)],
) -> TagSpecification {
    let mut b = TagSpecification::builder()
        .resource_type(rt)
        .tags(tag(TAG_SANDBOX, sandbox))
        .tags(tag("Name", name))
        .tags(tag(TAG_CREATED_BY, CREATED_BY))
        .tags(tag(
            super::TAG_CREATED_AT,
            &std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string(),
        ));
    for (k, v) in extra {
        b = b.tags(tag(k, v));
    }
    b.build()
}

/// The value of tag `key` in a tag list.
pub fn tag_value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// A peering connection that still exists (not deleted, rejected, failed or expired). The
/// `status-code` filter is also sent, but not every EC2 implementation honours it.
pub fn live_peering(p: &aws_sdk_ec2::types::VpcPeeringConnection) -> bool {
    let code = p
        .status()
        .and_then(|s| s.code())
        .map(|c| c.as_str())
        .unwrap_or("");
    matches!(
        code,
        "pending-acceptance" | "provisioning" | "active" | "initiating-request"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        // Retried here (eventual consistency, dependencies being released).
        assert!(consistency_error("InvalidSubnetID.NotFound"));
        assert!(consistency_error("InvalidGroup.NotFound"));
        assert!(consistency_error("DependencyViolation"));
        // Real errors: fail at once.
        assert!(!consistency_error("InvalidAMIID.NotFound"));
        assert!(!consistency_error("VcpuLimitExceeded"));
        assert!(!consistency_error("InvalidSubnet.Conflict"));
        // Success in disguise.
        assert!(already_exists("RouteAlreadyExists"));
        assert!(already_exists("InvalidPermission.Duplicate"));
        assert!(already_gone("InvalidVpcID.NotFound"));
        assert!(!already_gone("DependencyViolation"));
    }
}
