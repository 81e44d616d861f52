//! The execution-server selector: which agent gets the next job of a (role, selector) queue.
//!
//! Pure decision logic, table-tested. The rules:
//! 1. Only agents that are available (connected, healthy, not draining) and have a free slot count.
//! 2. Primaries first: a fallback (`-b`) gets work only when no available primary has room.
//! 3. Among the remaining, the least loaded (largest free fraction of its slots) wins, so work is
//!    spread and no agent grabs the whole queue; ties go to the agent picked least recently.

/// One agent as the selector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub fallback: bool,
    /// Connected, healthy (fresh heartbeats, probe not failing) and not draining.
    pub available: bool,
    pub slots: u32,
    /// Leased plus offered jobs.
    pub busy: u32,
    /// Monotonic stamp of the last time this agent was picked (0 = never).
    pub last_pick: u64,
}

impl Candidate {
    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.busy)
    }
}

/// Index of the agent that should get the next job, or `None` when nobody can take one.
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    let usable = |c: &Candidate| c.available && c.free() > 0;
    let any_primary = candidates.iter().any(|c| usable(c) && !c.fallback);
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| usable(c) && c.fallback != any_primary)
        .min_by(|(_, a), (_, b)| {
            // Larger free fraction first: compare free_a/slots_a > free_b/slots_b without floats.
            let fa = a.free() as u64 * b.slots as u64;
            let fb = b.free() as u64 * a.slots as u64;
            fb.cmp(&fa).then(a.last_pick.cmp(&b.last_pick))
        })
        .map(|(i, _)| i)
}

/// One connected agent as the submit warning sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server<'a> {
    pub role: es_proto::v1::Role,
    pub selector: &'a str,
    /// Healthy and not draining.
    pub available: bool,
}

/// What a submitter should hear when no connected agent can run a job of `role` and
/// `selector` (a typo in the selector, an agent down): the job is still queued and waits.
pub fn no_server_warning(
    agents: &[Server],
    role: es_proto::v1::Role,
    selector: &str,
) -> Option<String> {
    let same_role: Vec<&Server> = agents.iter().filter(|a| a.role == role).collect();
    let serving: Vec<&&Server> = same_role
        .iter()
        .filter(|a| a.selector == selector)
        .collect();
    if serving.iter().any(|a| a.available) {
        return None;
    }
    let waits = "the job is queued and waits until one is";
    if !serving.is_empty() {
        return Some(format!(
            "every connected {} agent with selector {selector:?} is draining or unhealthy: {waits} available (see `es-server agents`)",
            role.name()
        ));
    }
    let mut others: Vec<String> = same_role
        .iter()
        .map(|a| format!("{:?}", a.selector))
        .collect();
    others.sort();
    others.dedup();
    let seen = if others.is_empty() {
        format!("no {} agent is connected at all", role.name())
    } else {
        format!(
            "connected {} agents serve {}",
            role.name(),
            others.join(", ")
        )
    };
    Some(format!(
        "no connected {} agent serves selector {selector:?} ({seen}): {waits} registered (check --selector)",
        role.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(fallback: bool, available: bool, slots: u32, busy: u32, last_pick: u64) -> Candidate {
        Candidate {
            fallback,
            available,
            slots,
            busy,
            last_pick,
        }
    }

    #[test]
    fn table() {
        let p = false;
        let b = true;
        let cases: Vec<(&str, Vec<Candidate>, Option<usize>)> = vec![
            ("nobody", vec![], None),
            ("single primary", vec![c(p, true, 4, 0, 0)], Some(0)),
            (
                "primary preferred over idle fallback",
                vec![c(b, true, 4, 0, 0), c(p, true, 4, 3, 0)],
                Some(1),
            ),
            (
                "fallback when primary full",
                vec![c(p, true, 4, 4, 0), c(b, true, 4, 0, 0)],
                Some(1),
            ),
            (
                "fallback when primary unavailable",
                vec![c(p, false, 4, 0, 0), c(b, true, 4, 0, 0)],
                Some(1),
            ),
            (
                "nothing when all full",
                vec![c(p, true, 1, 1, 0), c(b, true, 1, 1, 0)],
                None,
            ),
            (
                "unavailable fallback is not used",
                vec![c(p, true, 2, 2, 0), c(b, false, 4, 0, 0)],
                None,
            ),
            (
                "least loaded fraction wins",
                vec![c(p, true, 64, 40, 0), c(p, true, 8, 2, 9)],
                Some(1),
            ),
            (
                "tie goes to least recently picked",
                vec![c(p, true, 8, 4, 7), c(p, true, 8, 4, 3)],
                Some(1),
            ),
            (
                "busy over slots counts as full",
                vec![c(p, true, 2, 5, 0), c(p, true, 2, 1, 0)],
                Some(1),
            ),
        ];
        for (name, cands, want) in cases {
            assert_eq!(choose(&cands), want, "{name}");
        }
    }

    #[test]
    fn spreads_work_evenly_between_equal_agents() {
        let mut agents = [c(false, true, 64, 0, 0), c(false, true, 64, 0, 0)];
        for stamp in 1..=100 {
            let i = choose(&agents).unwrap();
            agents[i].busy += 1;
            agents[i].last_pick = stamp;
        }
        assert_eq!(agents[0].busy, 50);
        assert_eq!(agents[1].busy, 50);
    }

    #[test]
    fn a_submitter_hears_when_no_agent_can_run_the_job() {
        use es_proto::v1::Role::{Commands, Shells};
        let a = |role, selector, available| Server {
            role,
            selector,
            available,
        };
        let east = [a(Shells, "us-east-1", true), a(Commands, "us-west-2", true)];
        let cases: &[(&[Server], es_proto::v1::Role, &str, Option<&str>)] = &[
            (&east, Shells, "us-east-1", None),
            (
                &east,
                Shells,
                "us-east-l",
                Some("connected shells agents serve \"us-east-1\""),
            ),
            (
                &east,
                Commands,
                "us-east-1",
                Some("connected commands agents serve \"us-west-2\""),
            ),
            (&[], Shells, "", Some("no shells agent is connected at all")),
            (
                &[a(Shells, "x", false), a(Shells, "x", false)],
                Shells,
                "x",
                Some("draining or unhealthy"),
            ),
            (
                &[a(Shells, "x", false), a(Shells, "x", true)],
                Shells,
                "x",
                None,
            ),
        ];
        for (agents, role, selector, want) in cases {
            let got = no_server_warning(agents, *role, selector);
            match want {
                None => assert_eq!(got, None, "{role:?} {selector}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{role:?} {selector}: {got:?}"
                ),
            }
        }
    }
}
