//! Network interfaces: the sandbox's detached ones and, in dedicated mode, every one inside its
//! VPC. What to do with each is decided by `action` (pure, table-tested): delete it, detach it
//! first, or, when another AWS service manages it (Lambda, a load balancer, an endpoint being
//! deleted), wait a bounded time for that service to release it and else report who holds it.

use std::time::Duration;

use aws_sdk_ec2::types::NetworkInterface;
use es_proto::resources::Ec2Kind;
use es_proto::v1::DeletedResource;

use crate::shells::ec2::{code, retry_consistency};
use crate::shells::Result;

use super::list;
use super::scope::{done, Scope, FOREIGN_NIC_WAIT};

/// What a cleanup does with one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    Delete,
    /// Attached (attachment id) by something that is not a service: detach, then delete.
    Detach(String),
    /// Managed by another AWS service (named): only it can remove the interface.
    WaitFor(String),
    /// An instance's primary interface: it cannot be detached and goes with its instance
    /// (terminated before interfaces are looked at). Not reported.
    WithInstance,
}

/// The facts `action` decides on.
pub(super) struct Facts<'a> {
    pub requester_managed: bool,
    pub requester_id: &'a str,
    pub interface_type: &'a str,
    pub description: &'a str,
    pub attachment_id: Option<&'a str>,
    /// The attachment's device index (0: the instance's primary interface).
    pub device_index: Option<i32>,
}

pub(super) fn action(n: &Facts<'_>) -> Action {
    // Interfaces EC2 makes for a service carry its type; ordinary ones are "interface".
    let service_type = !matches!(n.interface_type, "" | "interface" | "efa" | "trunk");
    if n.requester_managed || service_type {
        let who = [n.interface_type, n.requester_id, n.description]
            .into_iter()
            .filter(|s| !s.is_empty() && *s != "interface")
            .collect::<Vec<_>>()
            .join(", ");
        return Action::WaitFor(if who.is_empty() {
            "another AWS service".into()
        } else {
            who
        });
    }
    match n.attachment_id {
        Some(a) if !a.is_empty() && n.device_index == Some(0) => Action::WithInstance,
        Some(a) if !a.is_empty() => Action::Detach(a.to_owned()),
        _ => Action::Delete,
    }
}

fn facts(n: &NetworkInterface) -> Facts<'_> {
    Facts {
        requester_managed: n.requester_managed() == Some(true),
        requester_id: n.requester_id().unwrap_or_default(),
        interface_type: n.interface_type().map(|t| t.as_str()).unwrap_or_default(),
        description: n.description().unwrap_or_default(),
        attachment_id: n.attachment().and_then(|a| a.attachment_id()),
        device_index: n.attachment().and_then(|a| a.device_index()),
    }
}

/// Listed once instances, NAT gateways and endpoints are gone: theirs go with them.
pub(super) async fn delete(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    s.ready(Ec2Kind::NetworkInterface).await;
    let ec2 = s.ec2;
    let inside = async {
        match s.in_vpcs("vpc-id") {
            Some(f) => list::nics(ec2, f, false).await,
            None => Ok(Vec::new()),
        }
    };
    let (tagged, inside) = tokio::try_join!(list::nics(ec2, s.tag.clone(), true), inside)?;
    let mut items: Vec<(String, Action)> = Vec::new();
    for n in tagged.iter().chain(&inside) {
        let id = n.network_interface_id().unwrap_or_default();
        let act = action(&facts(n));
        let seen = items.iter().any(|(x, _)| x == id);
        if s.owns(n.tag_set(), &[n.vpc_id()]) && !seen && act != Action::WithInstance {
            items.push((id.to_owned(), act));
        }
    }
    let kind = Ec2Kind::NetworkInterface;
    Ok(s.each(kind, items, |id, act| async move {
        let r = match act {
            Action::WaitFor(who) => {
                let gone = super::net::wait_until(FOREIGN_NIC_WAIT, || gone(s, &id)).await;
                match gone {
                    true => Ok(()),
                    false => Err(format!(
                        "in use by {who}: AWS removes it when that service lets go of it (a \
                         Lambda function's can take 45 minutes); run CleanupSandbox again then"
                    )),
                }
            }
            Action::Detach(att) => {
                let r = ec2
                    .detach_network_interface()
                    .attachment_id(&att)
                    .force(true)
                    .send()
                    .await;
                match done("DetachNetworkInterface", r) {
                    Ok(()) => delete_detached(s, &id).await,
                    Err(e) => Err(e),
                }
            }
            Action::Delete | Action::WithInstance => delete_detached(s, &id).await,
        };
        vec![s.rec(kind, &id, r)]
    })
    .await)
}

/// Whether the interface no longer exists.
async fn gone(s: &Scope<'_>, id: &str) -> bool {
    let r = s
        .ec2
        .describe_network_interfaces()
        .network_interface_ids(id)
        .send()
        .await;
    match r {
        Ok(r) => r.network_interfaces().is_empty(),
        Err(e) => code(&e).ends_with(".NotFound"),
    }
}

/// Deletes an interface, waiting (up to a minute) while a detach is still under way.
async fn delete_detached(s: &Scope<'_>, id: &str) -> std::result::Result<(), String> {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = retry_consistency(|| {
            s.ec2
                .delete_network_interface()
                .network_interface_id(id)
                .send()
        })
        .await;
        match r {
            Err(e)
                if code(&e) == "InvalidNetworkInterface.InUse"
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => return done("DeleteNetworkInterface", r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_happens_to_each_interface() {
        let f = |rm: bool, ty: &'static str, att: Option<&'static str>| Facts {
            device_index: att.map(|_| 1),
            requester_managed: rm,
            requester_id: if rm { "AROAEXAMPLE:lambda" } else { "" },
            interface_type: ty,
            description: if ty == "lambda" {
                "AWS Lambda VPC ENI-f"
            } else {
                ""
            },
            attachment_id: att,
        };
        let cases = [
            (f(false, "interface", None), Action::Delete),
            (f(false, "", None), Action::Delete),
            (
                f(false, "interface", Some("eni-attach-1")),
                Action::Detach("eni-attach-1".into()),
            ),
            (f(false, "interface", Some("")), Action::Delete),
            (
                f(true, "lambda", Some("ela-attach-1")),
                Action::WaitFor("lambda, AROAEXAMPLE:lambda, AWS Lambda VPC ENI-f".into()),
            ),
            (
                f(false, "nat_gateway", None),
                Action::WaitFor("nat_gateway".into()),
            ),
            (
                f(false, "vpc_endpoint", Some("x")),
                Action::WaitFor("vpc_endpoint".into()),
            ),
            (
                f(true, "interface", None),
                Action::WaitFor("AROAEXAMPLE:lambda".into()),
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(action(&facts), want, "type {:?}", facts.interface_type);
        }
    }
}
