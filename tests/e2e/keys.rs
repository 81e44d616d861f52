//! The sandbox key pair (issue 11), against moto: PrepareSandboxNetwork makes it and keeps its
//! private key only in SSM Parameter Store (a SecureString, tagged), apps launch with it, and
//! `es-server sandbox access-key` hands it to the one who asked. The key is read back with the
//! test's own SDK clients; that it never reaches the job store, events, audit trail or logs is
//! checked on the bytes of each. Cleanup removes the parameter and the key pair; a second
//! cleanup finds nothing.

use std::os::unix::fs::PermissionsExt;

use es_proto::v1::*;
use es_tests::*;

use crate::shells::{app, apps_of, ok, refused_naming, run, setup_with, shells_req, subnet, Aws};

fn prepare(a: &Aws, third_octet: u8, key_type: &str) -> job_spec::Kind {
    prepare_for(a, third_octet, key_type, &[])
}

/// As `prepare`, naming the images the sandbox's apps boot from (they decide the key type when
/// `key_type` is empty).
fn prepare_for(a: &Aws, third_octet: u8, key_type: &str, amis: &[&str]) -> job_spec::Kind {
    job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
        amis: amis.iter().map(|s| s.to_string()).collect(),
        key_type: key_type.into(),
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", &format!("10.0.{third_octet}.0/24"), false)],
        management: Some(a.mgmt.clone()),
        shared: None,
    })
}

fn network_of(j: &Job) -> NetworkResult {
    match j
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    {
        Some(shells_result::Result::Network(n)) => n,
        other => panic!("not a network: {other:?}"),
    }
}

/// The private key as SSM holds it (decrypted by the test's own client), and its type.
async fn stored_key(a: &Aws, sb: &str) -> Option<(String, aws_sdk_ssm::types::ParameterType)> {
    let ssm = a.moto.ssm().await;
    let r = ssm
        .get_parameter()
        .name(format!("/es/sandboxes/{sb}/key-pair"))
        .with_decryption(true)
        .send()
        .await;
    match r {
        Ok(r) => {
            let p = r.parameter.unwrap();
            Some((p.value.unwrap(), p.r#type.unwrap()))
        }
        Err(e) => {
            let code = aws_sdk_ssm::error::ProvideErrorMetadata::code(&e).map(str::to_owned);
            assert_eq!(code.as_deref(), Some("ParameterNotFound"), "{e:?}");
            None
        }
    }
}

/// `secret` is in none of: the audit trail (`audit`, as exported), the server's and the agent's
/// logs, the job store's files (the SQLite database and its WAL).
fn assert_nowhere(a: &Aws, audit: &[u8], secret: &str, what: &str) {
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("audit trail".into(), audit.to_vec()),
        ("server log".into(), a.env.server.proc.log().into_bytes()),
        ("agent log".into(), a.agent.log().into_bytes()),
    ];
    for f in std::fs::read_dir(a.env.dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("es.db"))
        {
            places.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    assert!(places.len() >= 4, "the job store's files were found");
    for (place, bytes) in &places {
        assert!(
            !String::from_utf8_lossy(bytes).contains(secret),
            "the {what} is in the {place}"
        );
    }
}

fn cli(a: &Aws, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::bins().server)
        .args(args)
        .env("ES_SERVER", a.env.server.url())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_key_reaches_only_its_submitter_and_goes_with_the_sandbox() {
    let a = setup_with(ec2proxy::ProxyConfig::default()).await;
    let sb = "sb-key";
    let prep = run(&a, sb, prepare_for(&a, 131, "", &[MOTO_AMI])).await;
    ok(&prep);
    let net = network_of(&prep);
    assert_eq!(net.key_pair_name, "es-sb-key");
    assert_eq!(net.key_parameter, "/es/sandboxes/sb-key/key-pair");

    // In the emulator: one tagged ed25519 key pair, and its private key in SSM as a SecureString
    // tagged with the sandbox.
    let kps = a
        .ec2
        .describe_key_pairs()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap();
    assert_eq!(kps.key_pairs().len(), 1);
    assert_eq!(
        kps.key_pairs()[0].key_type().map(|t| t.as_str()),
        Some("ed25519")
    );
    let (key, ptype) = stored_key(&a, sb).await.expect("the private key is in SSM");
    assert_eq!(ptype, aws_sdk_ssm::types::ParameterType::SecureString);
    assert!(key.contains("PRIVATE KEY-----"), "{}", key.len());
    let tags = a
        .moto
        .ssm()
        .await
        .list_tags_for_resource()
        .resource_type(aws_sdk_ssm::types::ResourceTypeForTagging::Parameter)
        .resource_id(&net.key_parameter)
        .send()
        .await
        .unwrap();
    assert!(tags
        .tag_list()
        .iter()
        .any(|t| t.key() == "ReservationId" && t.value() == sb));
    // A distinctive piece of the private key, looked for everywhere it must not be.
    let secret_line: String = key
        .lines()
        .nth(2)
        .expect("a key body of several lines")
        .to_owned();
    assert!(secret_line.len() >= 40, "{secret_line:?}");

    // A second prepare finds the key and makes nothing.
    let again = run(&a, sb, prepare(&a, 131, "")).await;
    ok(&again);
    let calls = &again
        .result
        .as_ref()
        .unwrap()
        .shells
        .as_ref()
        .unwrap()
        .api_calls;
    assert_eq!(calls.get("CreateKeyPair"), None, "{calls:?}");
    assert_eq!(calls.get("PutParameter"), None, "{calls:?}");
    assert_eq!(stored_key(&a, sb).await.unwrap().0, key, "the same key");

    // Apps launch with it (read back from the emulator).
    let dep = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(app("web", &["app"])),
        }),
    )
    .await;
    ok(&dep);
    let id = apps_of(&dep)[0].instance_id.clone();
    let inst = a
        .ec2
        .describe_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let inst = &inst.reservations()[0].instances()[0];
    assert_eq!(inst.key_name(), Some("es-sb-key"));

    // The CLI saves it to a new file only its owner reads: the very key SSM holds.
    let out_file = a.env.dir.path().join("sb-key.key");
    let out = cli(
        &a,
        &[
            "sandbox",
            "access-key",
            "--sandbox",
            sb,
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("written to") && !text.contains(&secret_line),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), key);
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Never overwritten.
    let out = cli(
        &a,
        &[
            "sandbox",
            "access-key",
            "--sandbox",
            sb,
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwritten"));

    // Through the API: what is stored is sealed to the one-time key of who asked; another key
    // (an admin reading the job back) does not open it.
    let mine = es_proto::sealed::Opener::new();
    let j = run(
        &a,
        sb,
        job_spec::Kind::GetAccessKey(GetAccessKey {
            recipient: mine.recipient(),
        }),
    )
    .await;
    ok(&j);
    let Some(shells_result::Result::AccessKey(k)) = j
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    else {
        panic!("no access key: {j:?}")
    };
    assert_eq!(k.key_name, "es-sb-key");
    assert_eq!(k.key_type, "ed25519");
    assert_eq!(mine.open(&k.sealed_private_key).unwrap(), key.as_bytes());
    assert!(es_proto::sealed::Opener::new()
        .open(&k.sealed_private_key)
        .is_err());

    // Bad input, refused at submission naming the field.
    for (kind, field) in [
        (
            job_spec::Kind::GetAccessKey(GetAccessKey {
                recipient: vec![7; 31],
            }),
            "spec.get_access_key.recipient",
        ),
        (prepare(&a, 131, "dsa"), "spec.prepare_network.key_type"),
    ] {
        refused_naming(&a, sb, kind, field).await;
    }

    // A Windows app needs an RSA key: refused before anything launches in an ed25519 sandbox.
    let mut win = app("win", &["app"]);
    win.ami = MOTO_WINDOWS_AMI.into();
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(win.clone()),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(
        err.contains("spec.deploy_app.app.ami") && err.contains("RSA key pair"),
        "{err}"
    );

    // A key pair whose private key was lost (a crash between the two calls, or a deleted
    // parameter) is made again by the next prepare.
    a.moto
        .ssm()
        .await
        .delete_parameter()
        .name(&net.key_parameter)
        .send()
        .await
        .unwrap();
    ok(&run(&a, sb, prepare(&a, 131, "")).await);
    let (new_key, _) = stored_key(&a, sb).await.expect("made again");
    assert_ne!(new_key, key);

    // The key is nowhere but in SSM and in the file: not in the job store (the SQLite file and
    // its WAL), the events, the audit trail, the server's or the agent's log.
    let mut c = a.env.server.client().await;
    for j in [&prep, &again, &dep] {
        let evs = job_events(&mut c, &j.id).await;
        assert!(!format!("{evs:?}").contains(&secret_line));
    }
    let audit = cli(&a, &["audit", "--sandbox", sb, "--json"]);
    assert!(audit.status.success());
    // The parameter's writes are audited by name (never by value).
    let trail = String::from_utf8_lossy(&audit.stdout).into_owned();
    for op in ["PutParameter", "CreateKeyPair"] {
        assert!(
            trail
                .lines()
                .any(|l| l.contains(&format!("\"operation\":\"{op}\""))),
            "{op} not audited"
        );
    }
    assert!(
        trail.contains("ssm-parameter:/es/sandboxes/sb-key/key-pair"),
        "the parameter's name is in the trail"
    );
    for key in [&key, &new_key] {
        assert_nowhere(
            &a,
            &audit.stdout,
            key.lines().nth(2).unwrap(),
            "private key",
        );
    }

    // Cleanup deletes the parameter, then the key pair; a second cleanup finds nothing.
    let down = run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&down);
    let Some(shells_result::Result::Deleted(d)) = down
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    else {
        panic!("no report")
    };
    let kinds: Vec<&str> = d.resources.iter().map(|r| r.kind.as_str()).collect();
    let param_at = kinds.iter().position(|k| *k == "ssm-parameter").unwrap();
    let key_at = kinds.iter().position(|k| *k == "key-pair").unwrap();
    assert!(param_at < key_at, "{kinds:?}");
    assert_eq!(stored_key(&a, sb).await, None);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
    let second = run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&second);
    let Some(shells_result::Result::Deleted(d)) = second
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    else {
        panic!("no report")
    };
    assert_eq!(d.resources, vec![], "a second cleanup finds nothing");

    // An RSA sandbox takes a Windows app; its key is a PEM RSA key.
    let sb2 = "sb-key-rsa";
    ok(&run(&a, sb2, prepare(&a, 133, "rsa")).await);
    ok(&run(
        &a,
        sb2,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(win),
        }),
    )
    .await);
    let (rsa, _) = stored_key(&a, sb2).await.unwrap();
    assert!(
        rsa.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PEM RSA"
    );
    ok(&run(&a, sb2, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(stored_key(&a, sb2).await, None);
    assert_eq!(tagged_resources(&a.ec2, sb2).await, Vec::<String>::new());
    // Every call (SSM's included) is allowed by the policy, as the proxy saw them too.
    crate::shells::check_audit_and_policy(&a, sb, &[id]).await;
}

/// EC2's answer to GetPasswordData for `instance`: `password` encrypted to `key` (RSA PKCS#1
/// v1.5, base64), as Windows leaves it; empty data while it has none yet.
fn password_data_response(
    instance: &str,
    key: Option<&rsa::RsaPublicKey>,
    password: &str,
) -> Vec<u8> {
    let data = key
        .map(|k| {
            let ct = k
                .encrypt(
                    &mut rand_core::OsRng,
                    rsa::Pkcs1v15Encrypt,
                    password.as_bytes(),
                )
                .unwrap();
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ct)
        })
        .unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetPasswordDataResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>es-proxy</requestId><instanceId>{instance}</instanceId><timestamp>2026-11-30T08:00:00.000Z</timestamp><passwordData>{data}</passwordData></GetPasswordDataResponse>"
    );
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_password_reaches_only_its_submitter() {
    use std::sync::{Arc, Mutex};
    const PASSWORD: &str = "Tr0ub4dor&3-es-shells-test";
    // moto answers GetPasswordData with random text; the proxy answers as EC2 does: nothing the
    // first time (Windows is still booting), then the password encrypted to the key pair.
    let public: Arc<Mutex<Option<rsa::RsaPublicKey>>> = Arc::default();
    let asked = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let hook = {
        let (public, asked) = (public.clone(), asked.clone());
        ec2proxy::Hook(Arc::new(move |_head: &str, body: &[u8]| {
            let body = String::from_utf8_lossy(body);
            if !body.contains("Action=GetPasswordData") {
                return None;
            }
            let instance = body
                .split('&')
                .find_map(|kv| kv.strip_prefix("InstanceId="))
                .unwrap_or_default()
                .to_owned();
            let n = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let key = public.lock().unwrap().clone();
            Some(password_data_response(
                &instance,
                key.as_ref().filter(|_| n > 0),
                PASSWORD,
            ))
        }))
    };
    let a = setup_with(ec2proxy::ProxyConfig {
        hook: Some(hook),
        ..Default::default()
    })
    .await;
    let sb = "sb-win";
    // No key type given: a Windows image among the apps' makes it RSA.
    ok(&run(
        &a,
        sb,
        prepare_for(&a, 171, "", &[MOTO_AMI, MOTO_WINDOWS_AMI]),
    )
    .await);
    let (pem, _) = stored_key(&a, sb).await.unwrap();
    let private = <rsa::RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_pem(&pem)
        .expect("an RSA key pair");
    *public.lock().unwrap() = Some(rsa::RsaPublicKey::from(&private));

    let mut win = app("win", &["app"]);
    win.ami = MOTO_WINDOWS_AMI.into();
    win.wait_password = true;
    win.wait_timeout_s = 120;
    // Without a recipient the deploy is refused: the password would have nowhere safe to go.
    let mut c = a.env.server.client().await;
    let err = c
        .submit(shells_req(
            sb,
            job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(win.clone()),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.deploy_app.recipient"),
        "{}",
        err.message()
    );
    // A Linux app has no password to wait for: refused before anything launches.
    let mut linux = app("linux", &["app"]);
    linux.wait_password = true;
    let me = es_proto::sealed::Opener::new();
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: me.recipient(),
            app: Some(linux),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(
        err.contains("spec.deploy_app.app.wait_password") && err.contains("not a Windows image"),
        "{err}"
    );

    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: me.recipient(),
            app: Some(win),
        }),
    )
    .await;
    ok(&j);
    let r = &apps_of(&j)[0];
    assert_eq!(me.open(&r.sealed_password).unwrap(), PASSWORD.as_bytes());
    assert!(es_proto::sealed::Opener::new()
        .open(&r.sealed_password)
        .is_err());
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "it waited"
    );

    // Through the CLI: `sandbox up` writes it to SANDBOX-APP.password, 0600.
    let bp = a.env.dir.path().join("win.yaml");
    std::fs::write(
        &bp,
        format!(
            "network:\n  mode: single\n  subnets: [{{ name: app, cidr: 10.0.173.0/24 }}]\n  management: {{ vpc_id: {}, cidr: 10.0.0.0/16 }}\napps:\n  - {{ name: win, ami: {MOTO_WINDOWS_AMI}, instance_type: t3.micro, subnets: [app], wait_password: true, wait_timeout_s: 120 }}\n",
            a.mgmt.vpc_id
        ),
    )
    .unwrap();
    // The proxy must encrypt to this sandbox's key: it is made by the `up` below, so until the
    // prepare has stored it the proxy answers "no password yet".
    *public.lock().unwrap() = None;
    let sb2 = "sb-win-cli";
    let cli = {
        let url = a.env.server.url();
        let dir = a.env.dir.path().to_owned();
        let bp = bp.clone();
        std::thread::spawn(move || {
            std::process::Command::new(crate::bins().server)
                .args(["sandbox", "up", bp.to_str().unwrap(), "--sandbox", sb2])
                .env("ES_SERVER", url)
                .current_dir(dir)
                .output()
                .unwrap()
        })
    };
    let pem2 = loop {
        if let Some((k, _)) = stored_key(&a, sb2).await {
            break k;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let private2 =
        <rsa::RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_pem(&pem2).unwrap();
    *public.lock().unwrap() = Some(rsa::RsaPublicKey::from(&private2));
    let out = cli.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = a.env.dir.path().join(format!("{sb2}-win.password"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), PASSWORD);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSWORD));

    // The password is in no log, event, audit entry or the job store.
    let evs = format!("{:?}", job_events(&mut c, &j.id).await);
    assert!(!evs.contains(PASSWORD));
    let audit = cli_out(&a, &["audit", "--sandbox", sb, "--json"]);
    assert_nowhere(&a, &audit, PASSWORD, "password");
    for s in [sb, sb2] {
        ok(&run(&a, s, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
        assert_eq!(tagged_resources(&a.ec2, s).await, Vec::<String>::new());
        assert_eq!(stored_key(&a, s).await, None);
    }
    // GetPasswordData (and every other call) is allowed by the policy.
    crate::shells::check_audit_and_policy(&a, sb, std::slice::from_ref(&r.instance_id)).await;
}

fn cli_out(a: &Aws, args: &[&str]) -> Vec<u8> {
    let out = cli(a, args);
    assert!(out.status.success(), "{out:?}");
    out.stdout
}
