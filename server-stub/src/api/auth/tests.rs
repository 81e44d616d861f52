//! Policy files, certificate identities and scopes.

use super::policy::*;
use super::*;

#[test]
fn tokens_file_round_trip_scopes_and_errors() {
    let (token, line) = new_token("ci", Scope::Read);
    let map = parse_tokens(&format!("# comment\n\n{line}\n")).unwrap();
    assert_eq!(map.get(&digest(&token)), Some(&("ci".into(), Scope::Read)));
    // A line of an older release (no scope) keeps what it could do: submit.
    let (t2, l2) = new_token("old", Scope::Admin);
    let old = l2.rsplit_once(' ').unwrap().0;
    assert_eq!(
        parse_tokens(old).unwrap().get(&digest(&t2)),
        Some(&("old".into(), Scope::Submit))
    );
    for (text, want) in [
        ("ci es_plaintext".to_owned(), "64 hex"),
        (format!("{line}\n{line}"), "twice"),
        ("lonely".to_owned(), "NAME SHA256HEX"),
        (
            format!("{} root", &line[..line.len() - 5]),
            "scope \"root\"",
        ),
    ] {
        let e = parse_tokens(&text).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn deny_and_agents_files() {
    let d = parse_deny(&format!(
        "serial=0A:1B\nserial 00ff\ndigest {}\nname es-shells-old\n",
        "ab".repeat(32)
    ))
    .unwrap();
    assert!(d.serials.contains("a1b") && d.serials.contains("ff"));
    assert!(d.names.contains("es-shells-old") && d.digests.len() == 1);
    assert!(parse_deny("serial zz").is_err());
    assert!(parse_deny("token x").unwrap_err().contains("line 1"));

    let a =
        parse_agents("es-shells-prod shells prod,prod-b\nes-cmd commands -\nany shells *").unwrap();
    assert_eq!(
        a["es-shells-prod"],
        AgentGrant {
            role: Role::Shells,
            selectors: vec!["prod".into(), "prod-b".into()]
        }
    );
    assert_eq!(a["es-cmd"].selectors, vec![String::new()]);
    assert!(parse_agents("x wizard prod").unwrap_err().contains("role"));
    assert!(parse_agents("x shells").unwrap_err().contains("NAME ROLE"));
}

#[test]
fn scopes_nest() {
    let c = Caller {
        actor: "submitter:ro".into(),
        scope: Scope::Read,
    };
    assert!(c.require(Scope::Read, "Get").is_ok());
    let e = c.require(Scope::Submit, "Submit").unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("--scope submit"), "{}", e.message());
    let admin = Caller {
        actor: "submitter:ops".into(),
        scope: Scope::Admin,
    };
    assert!(admin.require(Scope::Submit, "Submit").is_ok());
}

#[test]
fn serials_are_normalized() {
    assert_eq!(normalize_serial("serial=00:0A:ff"), "aff");
    assert_eq!(normalize_serial("0AFF"), "aff");
    assert_eq!(normalize_serial("00"), "0");
}
