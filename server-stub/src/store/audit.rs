//! The audit entries a job write implies, the same for every store: written in the same
//! transaction as the write. Ids come only from id fields: never scripts, user data or output,
//! so secrets cannot reach the trail.

use es_proto::v1::{job_event, AuditEntry, Job, JobEvent, JobState, Role};

/// The entry of a new job.
pub fn of_submit(job: &Job) -> AuditEntry {
    AuditEntry {
        at_us: job.created_at_us,
        sandbox_id: job.sandbox_id.clone(),
        job_id: job.id.clone(),
        actor: job.submitted_by.clone(),
        action: "submit".into(),
        detail_json: serde_json::json!({
            "kind": es_proto::kinds::name(job),
            "role": Role::try_from(job.role).unwrap_or_default().name(),
            "selector": job.selector,
            "max_attempts": job.max_attempts,
            "timeout_ms": job.timeout_ms,
            "idempotency_key": job.idempotency_key,
        })
        .to_string(),
        ..Default::default()
    }
}

/// The audit entry a job event implies: leases, state changes, results and AWS calls (progress
/// and log lines are not audited). The sandbox id is filled in from the job's row.
pub fn of_event(ev: &JobEvent) -> Option<AuditEntry> {
    let agent_actor = || {
        if ev.agent.is_empty() {
            "server".to_owned()
        } else {
            format!("agent:{}", ev.agent)
        }
    };
    let (actor, action, detail) = match ev.event.as_ref()? {
        job_event::Event::State(s) => {
            let state = JobState::try_from(*s).unwrap_or_default();
            if state == JobState::Queued && ev.attempt == 0 {
                return None; // the submit entry says it
            }
            if state == JobState::Running {
                (
                    agent_actor(),
                    "lease",
                    serde_json::json!({"attempt": ev.attempt, "agent": ev.agent}),
                )
            } else {
                (
                    "server".to_owned(),
                    "state",
                    serde_json::json!({"state": state.name(), "attempt": ev.attempt}),
                )
            }
        }
        job_event::Event::Result(r) => (
            agent_actor(),
            "result",
            serde_json::json!({
                "state": JobState::try_from(r.state).unwrap_or_default().name(),
                "error": r.error,
                "attempt": ev.attempt,
            }),
        ),
        job_event::Event::AwsCall(c) => (
            agent_actor(),
            "aws_call",
            serde_json::json!({
                "service": c.service,
                "operation": c.operation,
                "resource_ids": c.resource_ids,
                "outcome": if c.error.is_empty() { "ok" } else { c.error.as_str() },
                "attempt": ev.attempt,
            }),
        ),
        job_event::Event::Progress(_) | job_event::Event::Log(_) => return None,
    };
    Some(AuditEntry {
        at_us: ev.at_us,
        job_id: ev.job_id.clone(),
        actor,
        action: action.into(),
        detail_json: detail.to_string(),
        ..Default::default()
    })
}
