//! The subcommands and flags of `es-server sandbox` (clap); sandbox.rs turns them into jobs.

use std::path::PathBuf;

use clap::Subcommand;

use super::run_args::RunArgs;

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Prepare the network and deploy the apps of a blueprint (YAML or JSON).
    Up {
        blueprint: PathBuf,
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Power apps on or off (all apps unless --app is given).
    Power {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Reboot the running apps (all unless --app is given); --cycle powers them off, then on.
    Reboot {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        /// Off, then on (each app waits until stopped, then until running), instead of an OS
        /// reboot.
        #[arg(long)]
        cycle: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Current IP addresses of the apps.
    Ips {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// State, type, image and addresses of the apps.
    Details {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete one app (instance, Elastic IP, its port group).
    DeleteApp {
        app: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete everything the sandbox owns (found by its ReservationId tag).
    Down {
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Run a script on the sandbox's apps (es-commands): per-instance status, exit code, output.
    Run(Box<RunArgs>),
    /// Add (or change) tags on everything the apps own: instance, volumes, NICs, Elastic IP.
    Tag {
        /// KEY=VALUE (repeat).
        #[arg(required = true)]
        tags: Vec<String>,
        #[arg(long)]
        sandbox: String,
        /// Only these apps (default: every app).
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Replace a running app's inbound rules (no restart): --port PROTO:PORT[-PORT][:CIDR]
    /// (repeat; none = no inbound ports), and --isolated to be reached by the Management VPC
    /// only.
    Security {
        app: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        port: Vec<String>,
        #[arg(long)]
        isolated: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Snapshot every volume of an app (or, with --image, make an image of it), without a
    /// reboot; waits until ready. Cleanup removes it unless --keep.
    Snapshot {
        app: String,
        #[arg(long)]
        sandbox: String,
        /// The set's name (default: the job id).
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        image: bool,
        /// Outlive the sandbox (tagged es:kept-from instead of ReservationId).
        #[arg(long)]
        keep: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// The sandbox's snapshots and images.
    Snapshots {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Replace an app's root volume from the root-device snapshot of a set (same instance).
    Restore {
        app: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// An app's console output (boot diagnostics).
    Console {
        app: String,
        #[arg(long)]
        sandbox: String,
        /// The most recent output (Nitro instances) instead of the buffer of the last boot.
        #[arg(long)]
        latest: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Save the sandbox key pair's private key to a new file (mode 0600). It is sealed to a
    /// one-time key of this command: only this command can read it, not the server or others.
    AccessKey {
        #[arg(long)]
        sandbox: String,
        /// Where to write it (default SANDBOX.key); an existing file is never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete resources tagged with any sandbox not in --live and not known alive to the server
    /// (--dry-run lists them). Needs an admin token. Sandboxes younger than the agent's
    /// sweep_min_age (default 1 h) or --min-age are always kept.
    Sweep {
        /// Sandboxes that are alive (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        live: Vec<String>,
        /// No --live list: every sandbox the server does not know of is an orphan.
        #[arg(long, conflicts_with = "live")]
        all_except_known: bool,
        /// Keep sandboxes younger than this (never below the agent's sweep_min_age).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_age: Option<std::time::Duration>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
}
