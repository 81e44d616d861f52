//! Facts about each job kind, in one table (one match arm per kind): its name (CLI, audit trail,
//! store), the family of executors that runs it (agent), the role it needs (validation) and
//! whether it must have its sandbox to itself (dispatch). Adding a kind means adding one arm here,
//! and the compiler then points at every place that has to know more.

use crate::v1::{job_spec::Kind, Job};
use crate::Role;

/// The executors of an agent, by the kinds they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Sleep and Echo: run on any role, need no cloud.
    Diagnostic,
    /// es-shells: networks, apps, power, teardown (EC2).
    Shells,
    /// es-commands: scripts on instances (SSM, SSH).
    Commands,
}

/// What is known of a job kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub name: &'static str,
    pub family: Family,
    /// The role that runs it; `None` = any role.
    pub role: Option<Role>,
    /// es-shells jobs of one sandbox run one at a time: two provisioning runs at once could each
    /// create what the other is creating.
    pub exclusive_sandbox: bool,
}

impl Family {
    /// The role this family's kinds need (`None`: any).
    pub fn role(self) -> Option<Role> {
        match self {
            Family::Diagnostic => None,
            Family::Shells => Some(Role::Shells),
            Family::Commands => Some(Role::Commands),
        }
    }
}

const fn kind(name: &'static str, family: Family) -> KindInfo {
    KindInfo {
        name,
        family,
        role: match family {
            Family::Diagnostic => None,
            Family::Shells => Some(Role::Shells),
            Family::Commands => Some(Role::Commands),
        },
        exclusive_sandbox: matches!(family, Family::Shells),
    }
}

/// The facts of `k`.
pub fn info(k: &Kind) -> KindInfo {
    use Family::*;
    match k {
        Kind::Sleep(_) => kind("sleep", Diagnostic),
        Kind::Echo(_) => kind("echo", Diagnostic),
        Kind::PrepareNetwork(_) => kind("prepare_network", Shells),
        Kind::DeployApp(_) => kind("deploy_app", Shells),
        Kind::DeploySandbox(_) => kind("deploy_sandbox", Shells),
        Kind::Power(p) if p.on => kind("power_on", Shells),
        Kind::Power(_) => kind("power_off", Shells),
        Kind::Reboot(r) if r.power_cycle => kind("power_cycle", Shells),
        Kind::Reboot(_) => kind("reboot", Shells),
        Kind::RefreshIp(_) => kind("refresh_ip", Shells),
        Kind::GetVmDetails(_) => kind("get_vm_details", Shells),
        Kind::DeleteApp(_) => kind("delete_app", Shells),
        Kind::CleanupSandbox(_) => kind("cleanup_sandbox", Shells),
        Kind::SweepOrphans(_) => kind("sweep_orphans", Shells),
        // Reads the key only: it may run beside the sandbox's other jobs.
        Kind::GetAccessKey(_) => KindInfo {
            exclusive_sandbox: false,
            ..kind("get_access_key", Shells)
        },
        Kind::AddTags(_) => kind("add_tags", Shells),
        Kind::UpdateAppSecurity(_) => kind("update_app_security", Shells),
        // Reads only.
        Kind::ConsoleOutput(_) => KindInfo {
            exclusive_sandbox: false,
            ..kind("console_output", Shells)
        },
        Kind::Snapshot(s) if s.image => kind("create_image", Shells),
        Kind::Snapshot(_) => kind("snapshot", Shells),
        Kind::ListSnapshots(_) => KindInfo {
            exclusive_sandbox: false,
            ..kind("list_snapshots", Shells)
        },
        Kind::RestoreSnapshot(_) => kind("restore_snapshot", Shells),
        Kind::RunCommand(_) => kind("run_command", Commands),
    }
}

/// The kind of a job, if it has one.
pub fn of(job: &Job) -> Option<KindInfo> {
    job.spec.as_ref().and_then(|s| s.kind.as_ref()).map(info)
}

/// The name of a job's kind (`-` when it has none).
pub fn name(job: &Job) -> &'static str {
    of(job).map_or("-", |i| i.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::*;

    #[test]
    fn every_kind_has_its_facts() {
        use Family::*;
        let cases: Vec<(Kind, &str, Family, Option<Role>, bool)> = vec![
            (
                Kind::Sleep(Default::default()),
                "sleep",
                Diagnostic,
                None,
                false,
            ),
            (
                Kind::Echo(Default::default()),
                "echo",
                Diagnostic,
                None,
                false,
            ),
            (
                Kind::Snapshot(Default::default()),
                "snapshot",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::Snapshot(Snapshot {
                    image: true,
                    ..Default::default()
                }),
                "create_image",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::ListSnapshots(Default::default()),
                "list_snapshots",
                Shells,
                Some(Role::Shells),
                false,
            ),
            (
                Kind::RestoreSnapshot(Default::default()),
                "restore_snapshot",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::AddTags(Default::default()),
                "add_tags",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::UpdateAppSecurity(Default::default()),
                "update_app_security",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::ConsoleOutput(Default::default()),
                "console_output",
                Shells,
                Some(Role::Shells),
                false,
            ),
            (
                Kind::GetAccessKey(Default::default()),
                "get_access_key",
                Shells,
                Some(Role::Shells),
                false,
            ),
            (
                Kind::PrepareNetwork(Default::default()),
                "prepare_network",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::DeployApp(Default::default()),
                "deploy_app",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::DeploySandbox(Default::default()),
                "deploy_sandbox",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::Power(PowerApps {
                    apps: vec![],
                    on: true,
                }),
                "power_on",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::Power(PowerApps {
                    apps: vec![],
                    on: false,
                }),
                "power_off",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::Reboot(RebootApps {
                    apps: vec![],
                    power_cycle: false,
                }),
                "reboot",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::Reboot(RebootApps {
                    apps: vec![],
                    power_cycle: true,
                }),
                "power_cycle",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::RefreshIp(Default::default()),
                "refresh_ip",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::GetVmDetails(Default::default()),
                "get_vm_details",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::DeleteApp(Default::default()),
                "delete_app",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::CleanupSandbox(Default::default()),
                "cleanup_sandbox",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::SweepOrphans(Default::default()),
                "sweep_orphans",
                Shells,
                Some(Role::Shells),
                true,
            ),
            (
                Kind::RunCommand(Default::default()),
                "run_command",
                Commands,
                Some(Role::Commands),
                false,
            ),
        ];
        for (k, name, family, role, exclusive) in cases {
            let i = info(&k);
            assert_eq!(
                (i.name, i.family, i.role, i.exclusive_sandbox),
                (name, family, role, exclusive),
                "{k:?}"
            );
            assert_eq!(i.role, i.family.role());
        }
        assert_eq!(name(&Job::default()), "-");
    }
}
