//! Counts a job's AWS calls by operation, and reports each mutating call (with the resource ids
//! read off the wire) as a job event for the audit trail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

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
    /// `InstanceIds` and `CommandId`, at any depth, and SSM parameter names (`Name` holding a
    /// path; the `Value` beside it is never read).
    fn json_ids(v: &serde_json::Value, ids: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("InstanceId" | "CommandId", serde_json::Value::String(s)) => id(s, ids),
                        // An SSM parameter's name (never its value): a path.
                        ("Name", serde_json::Value::String(s)) if s.starts_with('/') => {
                            push(ids, &format!("ssm-parameter:{s}"))
                        }
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
