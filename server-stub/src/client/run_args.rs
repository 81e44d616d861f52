//! The flags of `es-server sandbox run` and the RunCommand they make (es-commands: a script on
//! the sandbox's instances over SSM or SSH).

use std::path::PathBuf;

use es_proto::v1::*;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long)]
    pub sandbox: String,
    /// Only these apps (default: every running app of the sandbox).
    #[arg(long)]
    app: Vec<String>,
    /// These instances instead of the sandbox's apps.
    #[arg(long, conflicts_with = "app")]
    instance: Vec<String>,
    /// The script text.
    #[arg(
        long,
        required_unless_present = "script_file",
        conflicts_with = "script_file"
    )]
    script: Option<String>,
    /// A file holding the script.
    #[arg(long)]
    script_file: Option<PathBuf>,
    #[arg(long, value_parser = ["bash", "powershell"], default_value = "bash")]
    shell: String,
    #[arg(long, value_parser = ["ssm", "ssh"], default_value = "ssm")]
    transport: String,
    /// NAME=VALUE exported to the script (repeat).
    #[arg(long)]
    env: Vec<String>,
    /// NAME=VALUE exported to the script, never shown (repeat).
    #[arg(long)]
    secret_env: Vec<String>,
    #[arg(long, default_value = "")]
    workdir: String,
    /// Longest run on one instance (e.g. 10m); default 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    execution_timeout: Option<std::time::Duration>,
    /// SSM: longest wait for delivery; SSH: connect timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    delivery_timeout: Option<std::time::Duration>,
    /// Instances at once ("50" or "10%").
    #[arg(long, default_value = "")]
    max_concurrency: String,
    /// Errors after which no new instance starts ("0", "10%"); default: run everywhere.
    #[arg(long, default_value = "")]
    max_errors: String,
    /// S3 bucket (and --output-prefix) for the full output.
    #[arg(long, default_value = "")]
    output_bucket: String,
    #[arg(long, default_value = "")]
    output_prefix: String,
    /// SSH login user (default ec2-user).
    #[arg(long, default_value = "")]
    ssh_user: String,
    #[arg(long, default_value_t = 0)]
    ssh_port: u32,
    /// INSTANCE_OR_IP=PUBLIC_KEY: a known host key (repeat).
    #[arg(long)]
    host_key: Vec<String>,
    #[arg(long, default_value = "")]
    pub selector: String,
}

impl RunArgs {
    /// The RunCommand, or an error naming the flag.
    pub fn run_command(&self) -> Result<RunCommand, String> {
        let script = match (&self.script, &self.script_file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("--script-file {}: {e}", f.display()))?,
            (None, None) => return Err("give --script or --script-file".into()),
        };
        let mut env = Vec::new();
        for (flag, list, secret) in [
            ("--env", &self.env, false),
            ("--secret-env", &self.secret_env, true),
        ] {
            for kv in list {
                let (name, value) = kv.split_once('=').ok_or_else(|| {
                    format!(
                        "{flag}: expected NAME=VALUE, got {:?}",
                        kv.split('=').next().unwrap_or("")
                    )
                })?;
                env.push(CommandVariable {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    secret,
                });
            }
        }
        let mut host_keys = std::collections::HashMap::new();
        for kv in &self.host_key {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--host-key: expected INSTANCE=KEY, got {kv:?}"))?;
            host_keys.insert(k.to_owned(), v.to_owned());
        }
        let ssh = self.transport == "ssh";
        Ok(RunCommand {
            instance_ids: self.instance.clone(),
            apps: self.app.clone(),
            script,
            shell: if self.shell == "powershell" {
                Shell::Powershell as i32
            } else {
                Shell::Bash as i32
            },
            working_directory: self.workdir.clone(),
            env,
            execution_timeout_s: self
                .execution_timeout
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0),
            delivery_timeout_s: self
                .delivery_timeout
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0),
            max_concurrency: self.max_concurrency.clone(),
            max_errors: self.max_errors.clone(),
            output_s3_bucket: self.output_bucket.clone(),
            output_s3_prefix: self.output_prefix.clone(),
            transport: if ssh {
                CommandTransport::Ssh as i32
            } else {
                CommandTransport::Ssm as i32
            },
            ssh: ssh.then(|| SshOptions {
                user: self.ssh_user.clone(),
                port: self.ssh_port,
                host_keys,
            }),
        })
    }
}
