//! How the CLI shows what the server answers: one place for the tables and the JSON of jobs,
//! events, agents and audit entries (used by cli.rs and sandbox_cli.rs).

use std::time::Duration;

use es_proto::v1::*;
use serde_json::{json, Value};

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn role_name(r: i32) -> &'static str {
    Role::try_from(r).unwrap_or_default().name()
}

pub fn state_name(s: i32) -> &'static str {
    JobState::try_from(s).unwrap_or_default().name()
}

pub fn time(us: i64) -> Value {
    if us == 0 {
        Value::Null
    } else {
        Value::String(
            humantime::format_rfc3339_micros(
                std::time::UNIX_EPOCH + Duration::from_micros(us as u64),
            )
            .to_string(),
        )
    }
}

pub fn audit_json(e: &AuditEntry) -> String {
    let detail: Value = serde_json::from_str(&e.detail_json).unwrap_or(Value::Null);
    json!({
        "id": e.id,
        "time": time(e.at_us),
        "sandbox_id": e.sandbox_id,
        "job_id": e.job_id,
        "actor": e.actor,
        "action": e.action,
        "detail": detail,
    })
    .to_string()
}

pub fn result_json(r: &JobResult) -> Value {
    json!({"state": state_name(r.state), "output": r.output, "error": r.error})
}

/// A job as JSON (stable field names for scripts).
pub fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id,
        "idempotency_key": j.idempotency_key,
        "role": role_name(j.role),
        "selector": j.selector,
        "sandbox_id": j.sandbox_id,
        "kind": es_proto::kinds::name(j),
        "state": state_name(j.state),
        "attempt": j.attempt,
        "max_attempts": j.max_attempts,
        "epoch": j.epoch,
        "agent": j.agent,
        "timeout_ms": j.timeout_ms,
        "cancel_requested": j.cancel_requested,
        "result": j.result.as_ref().map(result_json),
        "created_at": time(j.created_at_us),
        "started_at": time(j.started_at_us),
        "finished_at": time(j.finished_at_us),
        "submitted_by": j.submitted_by,
    })
}

pub fn agent_json(a: &AgentStatus) -> Value {
    let id = a.identity.clone().unwrap_or_default();
    json!({
        "name": id.name,
        "role": role_name(id.role),
        "selector": id.selector,
        "fallback": id.fallback,
        "slots": id.slots,
        "slots_in_use": a.slots_in_use,
        "version": id.version,
        "health_addr": id.health_addr,
        "connected": a.connected,
        "healthy": a.healthy,
        "draining": a.draining,
        "health_detail": a.health_detail,
        "aws_identity": a.aws_identity,
        "aws_problem": a.aws_problem,
        "last_heartbeat": time(a.last_heartbeat_us),
        "counters": a.counters.as_ref().map(|n| json!({
            "leases_granted": n.leases_granted,
            "results_accepted": n.results_accepted,
            "writes_refused": n.writes_refused,
            "leases_expired": n.leases_expired,
        })),
    })
}

pub fn event_json(ev: &JobEvent) -> Value {
    let body = match &ev.event {
        Some(job_event::Event::State(s)) => json!({"state": state_name(*s)}),
        Some(job_event::Event::Progress(p)) => {
            json!({"progress": {"done": p.done, "total": p.total, "message": p.message}})
        }
        Some(job_event::Event::Log(l)) => json!({"log": l}),
        Some(job_event::Event::Result(r)) => json!({"result": result_json(r)}),
        Some(job_event::Event::AwsCall(c)) => json!({"aws_call": {
            "service": c.service, "operation": c.operation,
            "resource_ids": c.resource_ids, "error": c.error}}),
        None => Value::Null,
    };
    json!({"job_id": ev.job_id, "seq": ev.seq, "at": time(ev.at_us), "attempt": ev.attempt, "agent": ev.agent, "event": body})
}

/// One event as a human-readable line.
pub fn event_line(ev: &JobEvent) -> String {
    let at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_micros(ev.at_us.max(0) as u64),
    );
    let what = match &ev.event {
        Some(job_event::Event::State(s)) => match JobState::try_from(*s).unwrap_or_default() {
            JobState::Running => format!("running on {} (attempt {})", ev.agent, ev.attempt),
            st => st.name().to_owned(),
        },
        Some(job_event::Event::Progress(p)) => {
            format!("progress {}/{} {}", p.done, p.total, p.message)
        }
        Some(job_event::Event::Log(l)) => format!("log: {l}"),
        Some(job_event::Event::Result(r)) => {
            let mut s = state_name(r.state).to_owned();
            if !r.output.is_empty() {
                s.push_str(&format!(": {}", r.output));
            }
            if !r.error.is_empty() {
                s.push_str(&format!(" (error: {})", r.error));
            }
            s
        }
        Some(job_event::Event::AwsCall(c)) => {
            let outcome = if c.error.is_empty() {
                "ok".to_owned()
            } else {
                format!("failed: {}", c.error)
            };
            format!(
                "aws {}:{} [{}] {outcome}",
                c.service,
                c.operation,
                c.resource_ids.join(" ")
            )
        }
        None => "?".into(),
    };
    format!("{at}  #{:<3} {what}", ev.seq)
}

/// A table: each column as wide as its widest value or heading (`true` = right-aligned), two
/// spaces between columns, the last one unpadded.
pub fn table(columns: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (head, _))| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
                .max(head.len())
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let (w, right) = (widths[i], columns[i].1);
            if i + 1 == columns.len() {
                out.push_str(cell);
            } else if right {
                out.push_str(&format!("{cell:>w$}  "));
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut columns.iter().map(|(h, _)| *h));
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// The `jobs` table: one line per job (kind names run from `echo` to `update_app_security`).
pub fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                state_name(j.state).into(),
                role_name(j.role).into(),
                es_proto::kinds::name(j).into(),
                format!("{}/{}", j.attempt, j.max_attempts),
                j.agent.clone(),
                j.sandbox_id.clone(),
            ]
        })
        .collect();
    table(
        &[
            ("JOB", false),
            ("STATE", false),
            ("ROLE", false),
            ("KIND", false),
            ("ATTEMPT", true),
            ("AGENT", false),
            ("SANDBOX", false),
        ],
        &rows,
    )
}

/// The `agents` table: who is connected, its health, slots, counters and version.
pub fn agents_table(agents: &[AgentStatus]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let id = a.identity.clone().unwrap_or_default();
            let health = if a.draining {
                "draining"
            } else if a.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            let n = a.counters.unwrap_or_default();
            vec![
                id.name,
                role_name(id.role).into(),
                id.selector,
                if id.fallback { "fallback" } else { "primary" }.into(),
                health.into(),
                format!("{}/{}", a.slots_in_use, id.slots),
                n.leases_granted.to_string(),
                n.results_accepted.to_string(),
                n.writes_refused.to_string(),
                n.leases_expired.to_string(),
                id.version,
                if a.aws_identity.is_empty() {
                    "-".into()
                } else {
                    a.aws_identity.clone()
                },
                [
                    a.health_detail.clone(),
                    if a.aws_problem.is_empty() {
                        String::new()
                    } else {
                        format!("AWS jobs held back: {}", a.aws_problem)
                    },
                ]
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
            ]
        })
        .collect();
    table(
        &[
            ("AGENT", false),
            ("ROLE", false),
            ("SELECTOR", false),
            ("KIND", false),
            ("HEALTH", false),
            ("SLOTS", true),
            ("LEASED", true),
            ("DONE", true),
            ("REFUSED", true),
            ("EXPIRED", true),
            ("VERSION", false),
            ("AWS IDENTITY", false),
            ("DETAIL", false),
        ],
        &rows,
    )
}

#[cfg(test)]
mod table_tests {
    use super::table;

    #[test]
    fn columns_are_as_wide_as_their_widest_value() {
        let rows = vec![
            vec!["cleanup_sandbox".into(), "7".into(), "x".into()],
            vec!["echo".into(), "1234".into(), "".into()],
        ];
        let t = table(&[("KIND", false), ("N", true), ("NOTE", false)], &rows);
        assert_eq!(
            t,
            "KIND                N  NOTE\ncleanup_sandbox     7  x\necho             1234\n"
        );
    }
}

pub fn print_job(j: &Job) {
    println!("job        {}", j.id);
    println!(
        "state      {}{}",
        state_name(j.state),
        if j.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        }
    );
    println!(
        "kind       {} ({} / selector {:?})",
        es_proto::kinds::name(j),
        role_name(j.role),
        j.selector
    );
    if !j.sandbox_id.is_empty() {
        println!("sandbox    {}", j.sandbox_id);
    }
    println!(
        "attempt    {}/{} (epoch {})",
        j.attempt, j.max_attempts, j.epoch
    );
    if !j.agent.is_empty() {
        println!("agent      {}", j.agent);
    }
    if let Some(r) = &j.result {
        if !r.output.is_empty() {
            println!("output     {}", r.output);
        }
        if !r.error.is_empty() {
            println!("error      {}", r.error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_table_lines_up_for_every_kind_name() {
        use es_proto::v1::{job_spec::Kind, JobSpec, UpdateAppSecurity};
        let job = |kind: Kind, agent: &str| Job {
            id: "01a22bc5-3f5d-72f1-a9e8-dc80ed78daba".into(),
            spec: Some(JobSpec {
                kind: Some(kind),
                target: None,
            }),
            agent: agent.into(),
            sandbox_id: "sb-1".into(),
            state: es_proto::v1::JobState::Succeeded as i32,
            role: es_proto::Role::Shells as i32,
            ..Default::default()
        };
        let t = jobs_table(&[
            job(Kind::Echo(Default::default()), "es-shells"),
            job(
                Kind::UpdateAppSecurity(UpdateAppSecurity::default()),
                "es-shells-b-with-a-long-name-of-40-chars",
            ),
        ]);
        let at: Vec<usize> = t
            .lines()
            .map(|l| l.rfind("SANDBOX").or(l.rfind("sb-1")).unwrap())
            .collect();
        assert_eq!(at.len(), 3);
        assert!(at.iter().all(|x| *x == at[0]), "{t}");
    }
}
