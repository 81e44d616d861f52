//! How a RunCommand's script, variables and working directory reach the instance, as data:
//! - SSM: the lines of the document's `commands` parameter (variables exported first);
//! - SSH: a fixed remote command (numbers only, no user text) that reads exactly N bytes of
//!   standard input into a temporary file and runs it in its own process group, while a watchdog
//!   kills that group when the agent closes standard input (cancel, timeout, lost connection).

use es_proto::v1::{RunCommand, Shell};

/// POSIX single-quoted form of `s` (safe for any byte but NUL, which validation refuses).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// PowerShell single-quoted form of `s`.
fn ps_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn powershell(rc: &RunCommand) -> bool {
    rc.shell == Shell::Powershell as i32
}

/// The preamble that sets the variables (and for SSH, the working directory).
fn preamble(rc: &RunCommand, with_cd: bool) -> String {
    let mut out = String::new();
    for v in &rc.env {
        if powershell(rc) {
            out.push_str(&format!("$env:{} = {}\n", v.name, ps_quote(&v.value)));
        } else {
            out.push_str(&format!("export {}={}\n", v.name, shell_quote(&v.value)));
        }
    }
    if with_cd && !rc.working_directory.is_empty() {
        if powershell(rc) {
            out.push_str(&format!(
                "Set-Location -LiteralPath {} -ErrorAction Stop\n",
                ps_quote(&rc.working_directory)
            ));
        } else {
            out.push_str(&format!(
                "cd -- {} || exit 1\n",
                shell_quote(&rc.working_directory)
            ));
        }
    }
    out
}

/// The SSM document name and its `commands` parameter.
pub fn ssm_commands(rc: &RunCommand) -> (&'static str, Vec<String>) {
    let doc = if powershell(rc) {
        "AWS-RunPowerShellScript"
    } else {
        "AWS-RunShellScript"
    };
    let mut lines: Vec<String> = preamble(rc, false).lines().map(str::to_owned).collect();
    lines.push(rc.script.clone());
    (doc, lines)
}

/// The SSH exec request and the bytes to write to its standard input.
pub fn render_ssh(rc: &RunCommand) -> (String, Vec<u8>) {
    let mut body = preamble(rc, true);
    body.push_str(&rc.script);
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let n = body.len();
    let (suffix, run) = if powershell(rc) {
        (".ps1", "pwsh -NoLogo -NoProfile -NonInteractive -File")
    } else {
        (".sh", "bash")
    };
    // fd 3 keeps the channel's stdin for the watchdog: without job control, a background
    // command's stdin would otherwise be /dev/null.
    let command = format!(
        "f=$(mktemp --suffix={suffix}) || exit 125; trap 'rm -f \"$f\"' EXIT; \
         head -c {n} > \"$f\"; exec 3<&0; \
         setsid {run} \"$f\" </dev/null 3<&- & p=$!; \
         ( cat <&3 >/dev/null; kill -TERM -$p 2>/dev/null; sleep 5; kill -KILL -$p 2>/dev/null ) >/dev/null 2>&1 & \
         exec 3<&-; wait $p; rc=$?; exit $rc"
    );
    (command, body.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::CommandVariable;

    fn rc() -> RunCommand {
        RunCommand {
            script: "echo \"$GREETING\" from $(pwd)".into(),
            working_directory: "/tmp/it's here".into(),
            env: vec![CommandVariable {
                name: "GREETING".into(),
                value: "it's $HOME; `rm -rf /`".into(),
                secret: false,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn quoting_keeps_values_literal() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        let (doc, lines) = ssm_commands(&rc());
        assert_eq!(doc, "AWS-RunShellScript");
        assert_eq!(lines[0], r"export GREETING='it'\''s $HOME; `rm -rf /`'");
        assert_eq!(lines.last().unwrap(), &rc().script);
    }

    #[test]
    fn the_ssh_command_holds_no_user_text() {
        let (cmd, stdin) = render_ssh(&rc());
        assert!(!cmd.contains("GREETING") && !cmd.contains("echo"));
        assert!(cmd.contains(&format!("head -c {}", stdin.len())));
        let text = String::from_utf8(stdin).unwrap();
        assert!(text.starts_with("export GREETING="));
        assert!(text.contains(r"cd -- '/tmp/it'\''s here' || exit 1"));
    }

    #[test]
    fn the_ssh_script_runs_the_way_it_will_remotely() {
        // The same pipeline a remote login shell gets, run by a local sh with the stdin bytes.
        let dir = tempfile::tempdir().unwrap();
        let mut r = rc();
        r.working_directory = dir.path().to_string_lossy().into_owned();
        r.script = "echo \"$GREETING\"; echo err >&2; exit 3".into();
        let (cmd, stdin) = render_ssh(&r);
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(&stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        drop(input);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's $HOME; `rm -rf /`\n"
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }
}
