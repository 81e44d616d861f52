//! The job's states as one pure function: where a job goes on each event, or `None` when the
//! event does not apply in that state. The core asks it at every transition (acquire, a lost
//! lease, the end of a job), so the rules of ARCHITECTURE.md's "Life of a job" live here once.

use es_proto::JobState;

/// What happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// An agent takes the lease (a retried Acquire by the holder is answered before this).
    Acquire,
    /// A result, a cancel of a queued job, or a fence ends it in this state.
    Finish(JobState),
    /// The lease ended without a result. `cancel`: the final state a requested cancel or
    /// timeout ends in; `attempts_left`: whether another attempt is allowed.
    LeaseLost {
        cancel: Option<JobState>,
        attempts_left: bool,
    },
}

/// The state after `ev` in `from`, or `None` when `ev` cannot happen there.
pub(super) fn next(from: JobState, ev: Event) -> Option<JobState> {
    use JobState::*;
    match (from, ev) {
        (Queued, Event::Acquire) => Some(Running),
        // Queued jobs end only by a cancel; running ones in any final state.
        (Queued, Event::Finish(Cancelled)) => Some(Cancelled),
        (Running, Event::Finish(to)) if to.is_terminal() => Some(to),
        (
            Running,
            Event::LeaseLost {
                cancel: Some(to), ..
            },
        ) if to.is_terminal() => Some(to),
        (
            Running,
            Event::LeaseLost {
                cancel: None,
                attempts_left: true,
            },
        ) => Some(Queued),
        (
            Running,
            Event::LeaseLost {
                cancel: None,
                attempts_left: false,
            },
        ) => Some(Failed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    #[test]
    fn every_state_and_event() {
        let lost = |cancel, attempts_left| Event::LeaseLost {
            cancel,
            attempts_left,
        };
        let cases: Vec<(JobState, Event, Option<JobState>)> = vec![
            (Queued, Event::Acquire, Some(Running)),
            (Running, Event::Acquire, None),
            (Queued, Event::Finish(Cancelled), Some(Cancelled)),
            (Queued, Event::Finish(Succeeded), None),
            (Queued, Event::Finish(Failed), None),
            (Running, Event::Finish(Succeeded), Some(Succeeded)),
            (Running, Event::Finish(Failed), Some(Failed)),
            (Running, Event::Finish(Cancelled), Some(Cancelled)),
            (Running, Event::Finish(TimedOut), Some(TimedOut)),
            (Running, Event::Finish(Queued), None),
            (Running, Event::Finish(Running), None),
            (Running, lost(None, true), Some(Queued)),
            (Running, lost(None, false), Some(Failed)),
            (Running, lost(Some(Cancelled), true), Some(Cancelled)),
            (Running, lost(Some(TimedOut), false), Some(TimedOut)),
            (Queued, lost(None, true), None),
            (Unspecified, Event::Acquire, None),
        ];
        for (from, ev, want) in cases {
            assert_eq!(next(from, ev), want, "{from:?} + {ev:?}");
        }
        // Final states are final.
        for from in [Succeeded, Failed, Cancelled, TimedOut] {
            for ev in [
                Event::Acquire,
                Event::Finish(Cancelled),
                Event::Finish(Failed),
                lost(None, true),
                lost(Some(Cancelled), true),
            ] {
                assert_eq!(next(from, ev), None, "{from:?} + {ev:?}");
            }
        }
    }
}
