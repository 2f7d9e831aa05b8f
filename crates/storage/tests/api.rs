//! The storage API against a real server on port 0: every call, the
//! health and reflection services, aliases, quotas, the accounts file
//! reread, and bad requests answered with the right gRPC code.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use correu_proto::v1::check_recipient_response::Status as RcptStatus;
use correu_proto::v1::storage_client::StorageClient;
use correu_proto::v1::*;
use correu_runtime::Config;
use correu_storage::accounts::hash_password;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    client: StorageClient<Channel>,
    channel: Channel,
    root: PathBuf,
    accounts: PathBuf,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

const PASSWORD: &str = "correct horse";

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mail");
    let accounts = dir.path().join("accounts");
    let aliases = dir.path().join("aliases");
    let hash = hash_password(PASSWORD).unwrap();
    std::fs::write(
        &accounts,
        format!(
            "# address:password:uid:gid:gecos:home:shell:extra\n\
             pere@example.org:{{ARGON2ID}}{hash}\n\
             ana@example.org:\n\
             small@example.org:::::::userdb_quota_rule=*:storage=600\n\
             this line is broken\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &aliases,
        "team@example.org: pere@example.org, ana@example.org\n@example.org: ana@example.org\n",
    )
    .unwrap();
    let mut cfg = Config {
        domains: vec!["example.org".into()],
        hostname: "mx.example.org".into(),
        ..Config::default()
    };
    cfg.storage.root = root.clone();
    cfg.storage.accounts_file = Some(accounts.clone());
    cfg.storage.aliases_file = Some(aliases);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { correu_storage::run(&cfg, listener, token).await.unwrap() });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        client: StorageClient::new(channel.clone()),
        channel,
        root,
        accounts,
        _stop: stop.drop_guard(),
        _dir: dir,
    }
}

fn deliver(queue_id: &str, to: &str, body: &str) -> DeliverRequest {
    DeliverRequest {
        queue_id: queue_id.into(),
        sender: "jo@domini.com".into(),
        recipient: to.into(),
        content: format!("Subject: {queue_id}\r\n\r\n{body}\r\n").into_bytes(),
        received_at_unix_micros: 1_790_000_000_000_000,
        folder: String::new(),
    }
}

fn files(dir: &Path) -> usize {
    ["new", "cur"]
        .iter()
        .map(|s| {
            std::fs::read_dir(dir.join(s))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

async fn check(s: &mut Server, address: &str) -> CheckRecipientResponse {
    s.client
        .check_recipient(CheckRecipientRequest {
            address: address.into(),
            size: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn deliver_is_idempotent_and_aliases_fan_out() {
    let mut s = server().await;
    let first = s
        .client
        .deliver(deliver("Q1", "Pere@Example.org", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    assert_eq!(first.mailbox, "pere@example.org");
    let again = s
        .client
        .deliver(deliver("Q1", "pere@example.org", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(files(&s.root.join("example.org/pere")), 1);

    // An alias: one copy in each mailbox it names, each with its own
    // Delivered-To; delivering it again adds nothing.
    for _ in 0..2 {
        let team = s
            .client
            .deliver(deliver("Q2", "team@example.org", "to the team"))
            .await
            .unwrap()
            .into_inner();
        let boxes: Vec<&str> = team.copies.iter().map(|c| c.mailbox.as_str()).collect();
        assert_eq!(boxes, ["pere@example.org", "ana@example.org"]);
    }
    assert_eq!(files(&s.root.join("example.org/pere")), 2);
    assert_eq!(files(&s.root.join("example.org/ana")), 1);
    let ana_file = std::fs::read_dir(s.root.join("example.org/ana/new"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(ana_file).unwrap();
    assert!(
        text.starts_with("Return-Path: <jo@domini.com>\r\nDelivered-To: ana@example.org\r\n"),
        "{text}"
    );

    // The catch-all takes unknown local parts; other domains are unknown.
    let c = check(&mut s, "whoever@example.org").await;
    assert_eq!(c.status(), RcptStatus::Exists);
    assert_eq!(c.mailboxes, ["ana@example.org"]);
    assert_eq!(
        check(&mut s, "x@elsewhere.org").await.status(),
        RcptStatus::Unknown
    );
}

#[tokio::test]
async fn list_get_flags_delete_and_stats() {
    let mut s = server().await;
    for i in 0..5 {
        let mut r = deliver(&format!("L{i}"), "pere@example.org", &"x".repeat(100_000));
        r.received_at_unix_micros += i * 1_000_000;
        s.client.deliver(r).await.unwrap();
    }
    // Newest first, a page at a time.
    let page = s
        .client
        .list_messages(ListMessagesRequest {
            address: "pere@example.org".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 2);
    assert!(page.messages[0].id.contains(".L4_"), "{:?}", page.messages);
    assert!(page.messages[1].id.contains(".L3_"));
    let rest = s
        .client
        .list_messages(ListMessagesRequest {
            address: "pere@example.org".into(),
            page_size: 10,
            page_token: page.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.messages.len(), 3);
    assert!(rest.next_page_token.is_empty());

    // Streamed in chunks, byte for byte what is on disk.
    let id = page.messages[0].id.clone();
    let mut stream = s
        .client
        .get_message(GetMessageRequest {
            address: "pere@example.org".into(),
            id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (mut got, mut chunks) = (Vec::new(), 0);
    while let Some(c) = stream.message().await.unwrap() {
        got.extend_from_slice(&c.data);
        chunks += 1;
    }
    let on_disk = std::fs::read(s.root.join("example.org/pere/new").join(&id)).unwrap();
    assert_eq!(got, on_disk);
    assert!(chunks >= 2, "a 100 kB message comes in several chunks");
    assert_eq!(page.messages[0].size, on_disk.len() as u64);

    // Flags: the file moves to cur/ with Dovecot's suffix.
    let set = s
        .client
        .set_flags(SetFlagsRequest {
            address: "pere@example.org".into(),
            id: id.clone(),
            flags: "SF".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.flags, "FS");
    assert!(
        s.root
            .join("example.org/pere/cur")
            .join(format!("{id}:2,FS"))
            .exists()
    );
    let bad = s
        .client
        .set_flags(SetFlagsRequest {
            address: "pere@example.org".into(),
            id: id.clone(),
            flags: "Sx".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    let stats = s
        .client
        .mailbox_stats(MailboxStatsRequest {
            address: "pere@example.org".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.messages, 5);
    assert_eq!(stats.quota_bytes, 0);

    s.client
        .delete_message(DeleteMessageRequest {
            address: "pere@example.org".into(),
            id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(files(&s.root.join("example.org/pere")), 4);
    let gone = s
        .client
        .delete_message(DeleteMessageRequest {
            address: "pere@example.org".into(),
            id,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let after = s
        .client
        .mailbox_stats(MailboxStatsRequest {
            address: "pere@example.org".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.messages, 4);
    assert_eq!(after.bytes, stats.bytes - on_disk.len() as u64);
}

#[tokio::test]
async fn a_full_mailbox_says_so_and_gets_no_half_message() {
    let mut s = server().await;
    assert_eq!(
        check(&mut s, "small@example.org").await.status(),
        RcptStatus::Exists
    );
    // 600 bytes of quota: the first message fits, the second does not.
    s.client
        .deliver(deliver("F1", "small@example.org", &"a".repeat(300)))
        .await
        .unwrap();
    let full = s
        .client
        .deliver(deliver("F2", "small@example.org", &"b".repeat(300)))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    let dir = s.root.join("example.org/small");
    assert_eq!(files(&dir), 1);
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    // Maildir++: the quota, then one line per change.
    let maildirsize = std::fs::read_to_string(dir.join("maildirsize")).unwrap();
    let mut lines = maildirsize.lines();
    assert_eq!(lines.next(), Some("600S"));
    let used: i64 = lines
        .map(|l| l.split_whitespace().next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(
        used as u64,
        std::fs::metadata(
            dir.join("new")
                .read_dir()
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
        )
        .unwrap()
        .len()
    );
    // Filling it to the byte is allowed (380 + 220 = 600); then it is full.
    s.client
        .deliver(deliver("F3", "small@example.org", &"c".repeat(140)))
        .await
        .unwrap();
    let status = check(&mut s, "small@example.org").await.status();
    assert_eq!(status, RcptStatus::OverQuota);
    let stats = s
        .client
        .mailbox_stats(MailboxStatsRequest {
            address: "small@example.org".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.quota_bytes, 600);
    assert_eq!(stats.messages, 2);
}

#[tokio::test]
async fn authenticate_and_the_accounts_file_reread() {
    let mut s = server().await;
    let auth = |a: &str, p: &str| AuthenticateRequest {
        address: a.into(),
        password: p.into(),
    };
    let ok = s
        .client
        .authenticate(auth("PERE@example.org", PASSWORD))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.ok);
    assert_eq!(ok.account, "pere@example.org");
    for (a, p) in [
        ("pere@example.org", "wrong"),
        ("ana@example.org", ""),
        ("nobody@example.org", PASSWORD),
    ] {
        assert!(
            !s.client
                .authenticate(auth(a, p))
                .await
                .unwrap()
                .get_ref()
                .ok,
            "{a}"
        );
    }

    // A new account appears without a restart (the file is looked at
    // once a second; the broken line did not take the others down).
    assert_eq!(
        check(&mut s, "nou@example.org").await.mailboxes,
        ["ana@example.org"],
        "before: the catch-all"
    );
    let mut text = std::fs::read_to_string(&s.accounts).unwrap();
    text.push_str("nou@example.org:\n");
    std::fs::write(&s.accounts, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&s.accounts)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let c = check(&mut s, "nou@example.org").await;
        if c.mailboxes == ["nou@example.org"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reread: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bad_requests_get_the_right_codes() {
    let mut s = server().await;
    let cases: Vec<(Result<(), tonic::Status>, Code)> = vec![
        (
            s.client
                .deliver(deliver("Q1", "not-an-address", "x"))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            s.client
                .deliver(deliver("../../x", "pere@example.org", "x"))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            s.client
                .deliver(deliver("Q1", "pere@elsewhere.org", "x"))
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            // Only the inbox and Junk: no path reaches past the mailbox.
            s.client
                .deliver(DeliverRequest {
                    folder: "../../other/.Junk".into(),
                    ..deliver("Q2", "pere@example.org", "x")
                })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            s.client
                .get_message(GetMessageRequest {
                    address: "pere@example.org".into(),
                    id: "../../../etc/passwd".into(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            s.client
                .get_message(GetMessageRequest {
                    address: "pere@example.org".into(),
                    id: "123.nothing.here".into(),
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            s.client
                .list_messages(ListMessagesRequest {
                    address: "pere@example.org".into(),
                    page_size: 1,
                    page_token: "not a token".into(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            s.client
                .mailbox_stats(MailboxStatsRequest {
                    address: "team@example.org".into(),
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
    ];
    for (i, (result, want)) in cases.into_iter().enumerate() {
        let e = result.unwrap_err();
        assert_eq!(e.code(), want, "case {i}: {e:?}");
        assert!(!e.message().is_empty(), "case {i} explains itself");
    }
}

#[tokio::test]
async fn health_and_reflection() {
    let s = server().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "correu.v1.Storage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(s.channel.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures_util::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"correu.v1.Storage".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}
