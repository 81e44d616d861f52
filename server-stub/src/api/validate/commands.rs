//! Checks of the es-commands job kind (RunCommand). Every error names the field with its path
//! (e.g. `spec.run_command.env[2].name`) and says what is accepted. Whether the targets exist and
//! are reachable is learnt by the agent, per instance, and reported in the result.

use std::collections::HashSet;

use es_proto::v1::{job_spec::Kind, CommandTransport, RunCommand, Shell, SubmitRequest};

use super::field::{bad, FieldError};

/// Most targets of one RunCommand.
pub const MAX_TARGETS: usize = 500;
/// Largest script (SSM's `commands` parameter and an SSH stdin alike).
pub const MAX_SCRIPT: usize = 48 * 1024;
const MAX_VARS: usize = 64;
const MAX_VALUE: usize = 8 * 1024;
const MAX_EXECUTION_S: u32 = 48 * 3600;
const MAX_DELIVERY_S: u32 = 30 * 24 * 3600;
const MAX_SSH_CONNECT_S: u32 = 600;

fn instance_id(field: &str, v: &str) -> Result<(), FieldError> {
    let hex = v.strip_prefix("i-").unwrap_or("");
    if !(8..=17).contains(&hex.len()) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(
            field,
            format!("{v:?} is not an instance id like i-0123456789abcdef0"),
        ));
    }
    Ok(())
}

/// "N" (at least `min`) or "P%" (0..=100, at least `min`).
fn count_or_percent(field: &str, v: &str, min: u32) -> Result<(), FieldError> {
    let (num, pct) = match v.strip_suffix('%') {
        Some(n) => (n, true),
        None => (v, false),
    };
    let n: u32 = num.parse().map_err(|_| {
        bad(
            field,
            format!("{v:?} is not a count like \"10\" or a percentage like \"20%\""),
        )
    })?;
    if n < min || (pct && n > 100) {
        let range = if pct { "100%" } else { "a count" };
        return Err(bad(
            field,
            format!("{v:?} is out of range; use {min} to {range}"),
        ));
    }
    Ok(())
}

fn env_name(field: &str, v: &str) -> Result<(), FieldError> {
    let mut chars = v.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || v.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(
            field,
            format!(
                "{v:?} is not a variable name: letters, digits and _, not starting with a digit"
            ),
        ));
    }
    Ok(())
}

/// Checks a RunCommand submission (role, targets, script and options).
pub fn submit(req: &SubmitRequest, kind: &Kind) -> Result<(), FieldError> {
    let Kind::RunCommand(rc) = kind else {
        return Ok(());
    };
    if req.role != es_proto::Role::Commands as i32 {
        return Err(bad(
            "role",
            "run_command runs on es-commands: use role commands",
        ));
    }
    run_command(rc, &req.sandbox_id)
}

fn run_command(rc: &RunCommand, sandbox_id: &str) -> Result<(), FieldError> {
    const P: &str = "spec.run_command";
    if rc.instance_ids.is_empty() && sandbox_id.is_empty() {
        return Err(bad(
            format!("{P}.instance_ids"),
            "no targets: give instance_ids, or the job's sandbox_id (and optionally apps)",
        ));
    }
    if !rc.instance_ids.is_empty() && !rc.apps.is_empty() {
        return Err(bad(
            format!("{P}.apps"),
            "give instance_ids or apps, not both",
        ));
    }
    for (field, n) in [
        ("instance_ids", rc.instance_ids.len()),
        ("apps", rc.apps.len()),
    ] {
        if n > MAX_TARGETS {
            return Err(bad(
                format!("{P}.{field}"),
                format!("has {n} targets; at most {MAX_TARGETS} per job: split the work"),
            ));
        }
    }
    let mut seen = HashSet::new();
    for (i, id) in rc.instance_ids.iter().enumerate() {
        instance_id(&format!("{P}.instance_ids[{i}]"), id)?;
        if !seen.insert(id) {
            return Err(bad(
                format!("{P}.instance_ids[{i}]"),
                format!("{id} is listed twice"),
            ));
        }
    }
    for (i, a) in rc.apps.iter().enumerate() {
        if a.is_empty() || a.len() > 64 {
            return Err(bad(format!("{P}.apps[{i}]"), "must be 1 to 64 characters"));
        }
    }
    if rc.script.trim().is_empty() {
        return Err(bad(
            format!("{P}.script"),
            "is empty; give the script text to run",
        ));
    }
    if rc.script.len() > MAX_SCRIPT {
        return Err(bad(
            format!("{P}.script"),
            format!(
                "is {} bytes; at most {MAX_SCRIPT}: put larger scripts in S3 and run a short one that fetches them",
                rc.script.len()
            ),
        ));
    }
    if Shell::try_from(rc.shell).is_err() {
        return Err(bad(
            format!("{P}.shell"),
            format!("unknown shell {}; use bash or powershell", rc.shell),
        ));
    }
    let transport = CommandTransport::try_from(rc.transport).map_err(|_| {
        bad(
            format!("{P}.transport"),
            format!("unknown transport {}; use ssm or ssh", rc.transport),
        )
    })?;
    if rc.working_directory.len() > 1024 || rc.working_directory.contains('\0') {
        return Err(bad(
            format!("{P}.working_directory"),
            "at most 1024 bytes, no NUL",
        ));
    }
    if rc.env.len() > MAX_VARS {
        return Err(bad(
            format!("{P}.env"),
            format!("has {} variables; at most {MAX_VARS}", rc.env.len()),
        ));
    }
    let mut names = HashSet::new();
    for (i, v) in rc.env.iter().enumerate() {
        env_name(&format!("{P}.env[{i}].name"), &v.name)?;
        if !names.insert(&v.name) {
            return Err(bad(
                format!("{P}.env[{i}].name"),
                format!("{} is set twice", v.name),
            ));
        }
        // The value itself is never quoted in an error: it may be a secret.
        if v.value.len() > MAX_VALUE || v.value.contains('\0') {
            return Err(bad(
                format!("{P}.env[{i}].value"),
                format!("at most {MAX_VALUE} bytes, no NUL"),
            ));
        }
    }
    if rc.execution_timeout_s > MAX_EXECUTION_S {
        return Err(bad(
            format!("{P}.execution_timeout_s"),
            format!(
                "is {}; at most {MAX_EXECUTION_S} (48 h)",
                rc.execution_timeout_s
            ),
        ));
    }
    let ssh = transport == CommandTransport::Ssh;
    let d = rc.delivery_timeout_s;
    if ssh && d > MAX_SSH_CONNECT_S {
        return Err(bad(
            format!("{P}.delivery_timeout_s"),
            format!("is {d}; over SSH it is the connect timeout: at most {MAX_SSH_CONNECT_S}"),
        ));
    }
    if !ssh && d != 0 && !(30..=MAX_DELIVERY_S).contains(&d) {
        return Err(bad(
            format!("{P}.delivery_timeout_s"),
            format!("is {d}; SSM accepts 30 to {MAX_DELIVERY_S} (0 = 600)"),
        ));
    }
    if !rc.max_concurrency.is_empty() {
        count_or_percent(&format!("{P}.max_concurrency"), &rc.max_concurrency, 1)?;
    }
    if !rc.max_errors.is_empty() {
        count_or_percent(&format!("{P}.max_errors"), &rc.max_errors, 0)?;
    }
    let b = &rc.output_s3_bucket;
    if !b.is_empty()
        && (!(3..=63).contains(&b.len())
            || !b
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
    {
        return Err(bad(
            format!("{P}.output_s3_bucket"),
            format!("{b:?} is not an S3 bucket name (3-63 lowercase letters, digits, - .)"),
        ));
    }
    if b.is_empty() && !rc.output_s3_prefix.is_empty() {
        return Err(bad(
            format!("{P}.output_s3_prefix"),
            "is set without output_s3_bucket",
        ));
    }
    if rc.output_s3_prefix.len() > 500 {
        return Err(bad(format!("{P}.output_s3_prefix"), "at most 500 bytes"));
    }
    if let Some(o) = &rc.ssh {
        if !ssh {
            return Err(bad(
                format!("{P}.ssh"),
                "SSH options are set but the transport is ssm; set transport ssh",
            ));
        }
        let u = &o.user;
        if !u.is_empty()
            && (u.len() > 32
                || !u
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                || !u
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'))
        {
            return Err(bad(
                format!("{P}.ssh.user"),
                format!("{u:?} is not a login name like ec2-user"),
            ));
        }
        if o.port > 65535 {
            return Err(bad(
                format!("{P}.ssh.port"),
                format!("is {}; at most 65535", o.port),
            ));
        }
        if o.host_keys.len() > MAX_TARGETS {
            return Err(bad(
                format!("{P}.ssh.host_keys"),
                format!("has {}; at most {MAX_TARGETS}", o.host_keys.len()),
            ));
        }
        for (k, v) in &o.host_keys {
            let field = format!("{P}.ssh.host_keys[{}]", es_proto::limits::clip(k, 80));
            if k.is_empty() || k.len() > 64 {
                return Err(bad(field, "the key names an instance id or a private IP"));
            }
            // Parsed, not pattern-matched: a truncated paste must be refused here, not turn
            // into "no pinned key" (and so "accept any host") on the agent.
            if v.len() > 16 * 1024 || ssh_key::PublicKey::from_openssh(v.trim()).is_err() {
                return Err(bad(
                    field,
                    "is not a whole OpenSSH public key like \"ssh-ed25519 AAAAC3...\" \
                     (copy the line from ssh-keyscan or the instance's console output)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{CommandVariable, JobSpec, Role, SshOptions};

    fn req(rc: RunCommand) -> SubmitRequest {
        SubmitRequest {
            role: Role::Commands as i32,
            sandbox_id: "sb-1".into(),
            spec: Some(JobSpec {
                kind: Some(Kind::RunCommand(rc)),
                target: None,
            }),
            ..Default::default()
        }
    }

    fn good() -> RunCommand {
        RunCommand {
            script: "echo hi".into(),
            ..Default::default()
        }
    }

    fn field_of(r: SubmitRequest) -> String {
        let kind = r.spec.as_ref().unwrap().kind.clone().unwrap();
        submit(&r, &kind).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        let f = |m: fn(&mut RunCommand)| {
            let mut rc = good();
            m(&mut rc);
            field_of(req(rc))
        };
        assert_eq!(f(|r| r.script = "  \n".into()), "spec.run_command.script");
        assert_eq!(
            f(|r| r.script = "x".repeat(MAX_SCRIPT + 1)),
            "spec.run_command.script"
        );
        assert_eq!(f(|r| r.shell = 7), "spec.run_command.shell");
        assert_eq!(f(|r| r.transport = 9), "spec.run_command.transport");
        assert_eq!(
            f(|r| r.instance_ids = vec!["i-1234567890abcdef0".into(); 2]),
            "spec.run_command.instance_ids[1]"
        );
        assert_eq!(
            f(|r| r.instance_ids = vec!["web".into()]),
            "spec.run_command.instance_ids[0]"
        );
        assert_eq!(
            f(|r| { r.instance_ids = (0..=MAX_TARGETS).map(|i| format!("i-{i:017x}")).collect() }),
            "spec.run_command.instance_ids"
        );
        assert_eq!(
            f(|r| {
                r.instance_ids = vec!["i-1234567890abcdef0".into()];
                r.apps = vec!["web".into()];
            }),
            "spec.run_command.apps"
        );
        assert_eq!(
            f(|r| r.env = vec![CommandVariable {
                name: "1BAD".into(),
                ..Default::default()
            }]),
            "spec.run_command.env[0].name"
        );
        assert_eq!(
            f(|r| r.max_concurrency = "0".into()),
            "spec.run_command.max_concurrency"
        );
        assert_eq!(
            f(|r| r.max_errors = "120%".into()),
            "spec.run_command.max_errors"
        );
        assert_eq!(
            f(|r| r.delivery_timeout_s = 5),
            "spec.run_command.delivery_timeout_s"
        );
        assert_eq!(
            f(|r| r.execution_timeout_s = 200_000),
            "spec.run_command.execution_timeout_s"
        );
        assert_eq!(
            f(|r| r.output_s3_bucket = "Bad_Bucket".into()),
            "spec.run_command.output_s3_bucket"
        );
        assert_eq!(
            f(|r| r.ssh = Some(SshOptions::default())),
            "spec.run_command.ssh"
        );
        assert_eq!(
            f(|r| {
                r.transport = CommandTransport::Ssh as i32;
                r.ssh = Some(SshOptions {
                    host_keys: [("i-1".to_string(), "nonsense".to_string())].into(),
                    ..Default::default()
                });
            }),
            "spec.run_command.ssh.host_keys[i-1]"
        );
    }

    #[test]
    fn targets_are_required_and_the_role_must_be_commands() {
        let mut r = req(good());
        r.sandbox_id.clear();
        assert_eq!(field_of(r), "spec.run_command.instance_ids");
        let mut r = req(good());
        r.role = Role::Shells as i32;
        assert_eq!(field_of(r), "role");
    }

    #[test]
    fn a_secret_value_never_appears_in_an_error() {
        let mut rc = good();
        rc.env = vec![CommandVariable {
            name: "TOKEN".into(),
            value: format!("hunter2{}", "x".repeat(MAX_VALUE)),
            secret: true,
        }];
        let r = req(rc);
        let kind = r.spec.as_ref().unwrap().kind.clone().unwrap();
        let e = submit(&r, &kind).unwrap_err();
        assert_eq!(e.field, "spec.run_command.env[0].value");
        assert!(!e.to_string().contains("hunter2"));
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE3lMLx8x7TtsIsGqhHITTSwTfVqVeN6BiIGLkk4fHwL";

    #[test]
    fn good_ones_pass() {
        assert!(submit(&req(good()), &Kind::RunCommand(good())).is_ok());
        let mut rc = good();
        rc.instance_ids = vec!["i-0123456789abcdef0".into()];
        rc.transport = CommandTransport::Ssh as i32;
        rc.ssh = Some(SshOptions {
            user: "ec2-user".into(),
            port: 2222,
            host_keys: [("i-0123456789abcdef0".to_string(), KEY.to_string())].into(),
        });
        rc.max_concurrency = "10%".into();
        rc.max_errors = "0".into();
        assert!(submit(&req(rc.clone()), &Kind::RunCommand(rc.clone())).is_ok());
        // The same key cut short by a bad paste: refused, never "no key pinned".
        let cut = &KEY[..KEY.len() - 6];
        rc.ssh.as_mut().unwrap().host_keys =
            [("i-0123456789abcdef0".to_string(), cut.to_string())].into();
        let e = submit(&req(rc.clone()), &Kind::RunCommand(rc)).unwrap_err();
        assert_eq!(
            e.field,
            "spec.run_command.ssh.host_keys[i-0123456789abcdef0]"
        );
    }
}
