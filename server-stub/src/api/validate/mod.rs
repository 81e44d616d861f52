//! Checks of what agents and submitters send, before anything is stored or dispatched.
//! Every error names the field and says what would be accepted.

use es_proto::limits::{MAX_ARN, MAX_KEY, MAX_NAME, MAX_REASON, MAX_SPEC};
use es_proto::v1::{job_spec, AgentIdentity, AwsTarget, JobSpec, Role, SubmitRequest};
use prost::Message;

pub const MAX_SLOTS: u32 = 1024;
const MAX_ECHO: usize = 64 * 1024;
const MAX_SLEEP_MS: u64 = 24 * 3600 * 1000;
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
const MAX_ATTEMPTS: u32 = 100;
const MAX_STEPS: u32 = 10_000;

mod apps;
mod commands;
mod field;
mod shells;

use field::bad;
pub use field::FieldError;

/// Free text (reasons): at most [`MAX_REASON`] bytes.
pub fn reason(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_REASON {
        return Err(bad(
            field,
            format!(
                "is {} bytes; at most {MAX_REASON}: say why in a sentence",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks `spec.target` (an assumed role and region), for every job kind.
pub fn target(t: &AwsTarget) -> Result<(), FieldError> {
    let arn = &t.role_arn;
    if arn.len() > MAX_ARN {
        return Err(bad(
            "spec.target.role_arn",
            format!(
                "is {} bytes; an IAM role ARN is at most {MAX_ARN}",
                arn.len()
            ),
        ));
    }
    if !arn.is_empty() {
        // arn:PARTITION:iam::ACCOUNT:role/PATH/NAME
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ok = parts.len() == 6
            && parts[0] == "arn"
            && parts[1].starts_with("aws")
            && parts[2] == "iam"
            && parts[3].is_empty()
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/")
            && parts[5].len() > 5
            && parts[5]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b));
        if !ok {
            return Err(bad(
                "spec.target.role_arn",
                "must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME",
            ));
        }
    }
    if !t.external_id.is_empty() {
        return Err(bad(
            "spec.target.external_id",
            "external ids are not taken from jobs (every reader could see them): put it beside \
             the role in the agent's `assume_roles` configuration and leave this field empty",
        ));
    }
    if !t.region.is_empty()
        && (t.region.len() > 32
            || !t
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Err(bad(
            "spec.target.region",
            format!(
                "{:?} is not a region like us-east-1",
                es_proto::limits::clip(&t.region, 40)
            ),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str, required: bool) -> Result<(), FieldError> {
    if value.is_empty() {
        return if required {
            Err(bad(
                field,
                "is empty; give a name such as `es-shells-us-east-1`",
            ))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_NAME {
        return Err(bad(
            field,
            format!("is {} bytes long; at most {MAX_NAME}", value.len()),
        ));
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')))
    {
        return Err(bad(
            field,
            format!("contains {ch:?}; use letters, digits and - _ . : /"),
        ));
    }
    Ok(())
}

fn check_role(field: &str, role: i32) -> Result<Role, FieldError> {
    match Role::try_from(role) {
        Ok(Role::Shells) => Ok(Role::Shells),
        Ok(Role::Commands) => Ok(Role::Commands),
        _ => Err(bad(
            field,
            format!("unknown role {role}; must be `shells` or `commands`"),
        )),
    }
}

/// Checks an agent's registration.
pub fn identity(id: Option<&AgentIdentity>) -> Result<&AgentIdentity, FieldError> {
    let id = id.ok_or_else(|| bad("identity", "missing; the agent must say who it is"))?;
    check_name("identity.name", &id.name, true)?;
    check_role("identity.role", id.role)?;
    check_name("identity.selector", &id.selector, false)?;
    if id.slots == 0 || id.slots > MAX_SLOTS {
        return Err(bad(
            "identity.slots",
            format!("is {}; must be between 1 and {MAX_SLOTS}", id.slots),
        ));
    }
    if !id.health_addr.is_empty() && id.health_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(bad(
            "identity.health_addr",
            format!("{:?} is not host:port (e.g. 10.0.0.5:7701)", id.health_addr),
        ));
    }
    Ok(id)
}

/// Checks a job spec (also used for the kind-specific limits).
pub fn spec(spec: Option<&JobSpec>) -> Result<&JobSpec, FieldError> {
    let spec = spec.ok_or_else(|| {
        bad(
            "spec",
            "missing; set one job kind (sleep, echo, prepare_network, deploy_sandbox, ...)",
        )
    })?;
    match &spec.kind {
        None => Err(bad("spec.kind", "missing; set one job kind (sleep, echo)")),
        Some(job_spec::Kind::Sleep(s)) => {
            reason("spec.sleep.fail_message", &s.fail_message)?;
            if s.duration_ms > MAX_SLEEP_MS {
                return Err(bad(
                    "spec.sleep.duration_ms",
                    format!("is {}; at most {MAX_SLEEP_MS} (24 h)", s.duration_ms),
                ));
            }
            if s.steps > MAX_STEPS {
                return Err(bad(
                    "spec.sleep.steps",
                    format!("is {}; at most {MAX_STEPS}", s.steps),
                ));
            }
            Ok(spec)
        }
        Some(job_spec::Kind::Echo(e)) => {
            if e.message.len() > MAX_ECHO {
                return Err(bad(
                    "spec.echo.message",
                    format!("is {} bytes; at most {MAX_ECHO}", e.message.len()),
                ));
            }
            Ok(spec)
        }
        // The es-shells and es-commands kinds are checked with the rest of the submission.
        Some(_) => Ok(spec),
    }
}

/// Checks a submission; answers the role.
pub fn submit(req: &SubmitRequest) -> Result<Role, FieldError> {
    let role = check_role("role", req.role)?;
    check_name("selector", &req.selector, false)?;
    check_name("sandbox_id", &req.sandbox_id, false)?;
    if req.idempotency_key.len() > MAX_KEY {
        return Err(bad(
            "idempotency_key",
            format!("is {} bytes; at most {MAX_KEY}", req.idempotency_key.len()),
        ));
    }
    if req.submitted_by.len() > MAX_NAME {
        return Err(bad("submitted_by", format!("at most {MAX_NAME} bytes")));
    }
    if req.timeout_ms > MAX_TIMEOUT_MS {
        return Err(bad(
            "timeout_ms",
            format!("is {}; at most {MAX_TIMEOUT_MS} (7 days)", req.timeout_ms),
        ));
    }
    if req.max_attempts > MAX_ATTEMPTS {
        return Err(bad(
            "max_attempts",
            format!("is {}; at most {MAX_ATTEMPTS}", req.max_attempts),
        ));
    }
    let spec = spec(req.spec.as_ref())?;
    // The target first: an oversized ARN is named as such, not as an oversized spec.
    if let Some(t) = &spec.target {
        target(t)?;
    }
    let size = spec.encoded_len();
    if size > MAX_SPEC {
        return Err(bad(
            "spec",
            format!("is {size} bytes encoded; a job spec is at most {MAX_SPEC}: split the job"),
        ));
    }
    if let Some(kind) = &spec.kind {
        match es_proto::kinds::info(kind).family {
            es_proto::kinds::Family::Shells => shells::submit(req, kind)?,
            es_proto::kinds::Family::Commands => commands::submit(req, kind)?,
            es_proto::kinds::Family::Diagnostic => {}
        }
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{EchoJob, SleepJob};

    type Case<T> = (fn(&mut T), &'static str);

    fn ident() -> AgentIdentity {
        AgentIdentity {
            name: "es-shells-a".into(),
            role: Role::Shells as i32,
            selector: "us-east-1".into(),
            slots: 4,
            ..Default::default()
        }
    }

    #[test]
    fn identity_errors_name_the_field() {
        let cases: Vec<Case<AgentIdentity>> = vec![
            (|i| i.name.clear(), "identity.name"),
            (|i| i.name = "bad name".into(), "identity.name"),
            (|i| i.role = 0, "identity.role"),
            (|i| i.role = 9, "identity.role"),
            (|i| i.slots = 0, "identity.slots"),
            (|i| i.slots = 5000, "identity.slots"),
            (|i| i.health_addr = "nope".into(), "identity.health_addr"),
        ];
        for (mutate, field) in cases {
            let mut id = ident();
            mutate(&mut id);
            assert_eq!(identity(Some(&id)).unwrap_err().field, field);
        }
        assert!(identity(Some(&ident())).is_ok());
        assert_eq!(identity(None).unwrap_err().field, "identity");
    }

    #[test]
    fn submit_errors_name_the_field() {
        let good = SubmitRequest {
            role: Role::Commands as i32,
            spec: Some(JobSpec {
                kind: Some(job_spec::Kind::Echo(EchoJob {
                    message: "x".into(),
                })),
                target: None,
            }),
            ..Default::default()
        };
        assert_eq!(submit(&good), Ok(Role::Commands));
        let cases: Vec<Case<SubmitRequest>> = vec![
            (|r| r.role = 0, "role"),
            (|r| r.spec = None, "spec"),
            (
                |r| {
                    r.spec = Some(JobSpec {
                        kind: None,
                        target: None,
                    })
                },
                "spec.kind",
            ),
            (
                |r| {
                    r.spec = Some(JobSpec {
                        kind: Some(job_spec::Kind::Sleep(SleepJob {
                            duration_ms: u64::MAX,
                            ..Default::default()
                        })),
                        target: None,
                    })
                },
                "spec.sleep.duration_ms",
            ),
            (|r| r.max_attempts = 1000, "max_attempts"),
            (|r| r.timeout_ms = u64::MAX, "timeout_ms"),
            (|r| r.sandbox_id = "a b".into(), "sandbox_id"),
            (|r| r.idempotency_key = "k".repeat(300), "idempotency_key"),
        ];
        for (mutate, field) in cases {
            let mut r = good.clone();
            mutate(&mut r);
            assert_eq!(submit(&r).unwrap_err().field, field);
        }
    }
}
