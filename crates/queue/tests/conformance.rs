//! One suite, both backends: the embedded spool and the real RabbitMQ (in a
//! vhost of the test's own). Each promise is checked with exact counts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use correu_proto::v1::{QueuedMessage, Recipient};
use correu_queue::{Delivery, Queue, new_queue_id};
use correu_runtime::config::{Dur, QueueBackend, QueueConfig};
use correu_testkit::{RABBITMQ, Vhost};
use tokio_util::sync::CancellationToken;

struct Backend {
    queue: Queue,
    cfg: QueueConfig,
    vhost: Option<Vhost>,
    _dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path) -> QueueConfig {
    QueueConfig {
        spool: dir.join("spool"),
        retry_delays: vec![Dur(Duration::from_millis(500)), Dur::secs(60)],
        publish_timeout: Dur::secs(5),
        ..QueueConfig::default()
    }
}

async fn spool() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let queue = Queue::open(&cfg, QueueBackend::Embedded, &Default::default())
        .await
        .unwrap();
    Backend {
        queue,
        cfg,
        vhost: None,
        _dir: dir,
    }
}

async fn rabbitmq(tag: &str) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create(tag);
    let cfg = QueueConfig {
        url: vhost.url(RABBITMQ.parse().unwrap()),
        ..config(dir.path())
    };
    let queue = Queue::open(&cfg, QueueBackend::Rabbitmq, &Default::default())
        .await
        .unwrap();
    Backend {
        queue,
        cfg,
        vhost: Some(vhost),
        _dir: dir,
    }
}

fn message(n: usize) -> QueuedMessage {
    QueuedMessage {
        queue_id: new_queue_id(),
        sender: "jo@domini.com".into(),
        recipients: vec![
            Recipient {
                address: format!("a{n}@localhost"),
                ..Recipient::default()
            },
            Recipient {
                address: format!("b{n}@remote.test"),
                notify: "FAILURE,DELAY".into(),
                orcpt: "rfc822;b{n}@remote.test".into(),
                ..Recipient::default()
            },
        ],
        received_at_unix_micros: 1_700_000_000_000_000 + n as i64,
        content: format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes(),
        ..QueuedMessage::default()
    }
}

async fn next(c: &mut correu_queue::Consumer, within: Duration) -> Option<Delivery> {
    let stop = CancellationToken::new();
    tokio::time::timeout(within, c.next(&stop))
        .await
        .ok()
        .flatten()
}

async fn publish_consume_ack(b: Backend) {
    let sent: Vec<QueuedMessage> = (0..3).map(message).collect();
    for m in &sent {
        b.queue.publish(m).await.unwrap();
    }
    let mut c = b.queue.consumer();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c, Duration::from_secs(10))
            .await
            .expect("a message");
        got.push(d.message.clone().expect("decodes"));
        d.ack().await.unwrap();
    }
    got.sort_by(|a, b| a.queue_id.cmp(&b.queue_id));
    let mut want = sent.clone();
    want.sort_by(|a, b| a.queue_id.cmp(&b.queue_id));
    assert_eq!(got, want, "every published message, exactly as published");
    assert!(
        next(&mut c, Duration::from_millis(1500)).await.is_none(),
        "acked messages do not come back"
    );
}

async fn retry_comes_back_after_its_delay(b: Backend) {
    let m = message(7);
    b.queue.publish(&m).await.unwrap();
    let mut c = b.queue.consumer();
    let d = next(&mut c, Duration::from_secs(10)).await.unwrap();
    let updated = QueuedMessage {
        recipients: vec![m.recipients[1].clone()],
        attempt: 1,
        last_error: "451 4.3.0 later".into(),
        ..m.clone()
    };
    let started = std::time::Instant::now();
    d.retry(&updated, 0, b.cfg.retry_delays[0].get())
        .await
        .unwrap();
    let again = next(&mut c, Duration::from_secs(15))
        .await
        .expect("the retry comes back");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before its delay"
    );
    assert_eq!(
        again.message.clone().unwrap(),
        updated,
        "with only the pending recipient and the attempt"
    );
    again.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_millis(1500)).await.is_none());
}

async fn undecodable_is_parked(b: &Backend, raw: impl AsyncFnOnce(&Backend)) {
    raw(b).await;
    let mut c = b.queue.consumer();
    let d = next(&mut c, Duration::from_secs(10)).await.unwrap();
    assert!(d.message.is_none());
    d.park("does not decode").await.unwrap();
    assert!(
        next(&mut c, Duration::from_millis(1500)).await.is_none(),
        "a parked message is not redelivered"
    );
}

#[tokio::test]
async fn spool_publish_consume_ack() {
    publish_consume_ack(spool().await).await;
}

#[tokio::test]
async fn rabbitmq_publish_consume_ack() {
    publish_consume_ack(rabbitmq("q-ack").await).await;
}

#[tokio::test]
async fn spool_retry() {
    retry_comes_back_after_its_delay(spool().await).await;
}

#[tokio::test]
async fn rabbitmq_retry_through_a_ttl_tier() {
    retry_comes_back_after_its_delay(rabbitmq("q-retry").await).await;
}

#[tokio::test]
async fn spool_parks_what_does_not_decode() {
    let b = spool().await;
    let dir = b.cfg.spool.clone();
    undecodable_is_parked(&b, async |_| {
        std::fs::write(
            dir.join("active").join(new_queue_id()),
            b"\xff\xff not protobuf",
        )
        .unwrap();
    })
    .await;
    let counts = correu_queue::spool::Spool::open_for_admin(&dir)
        .await
        .unwrap()
        .counts()
        .unwrap();
    assert_eq!((counts.active, counts.parked), (0, 1));
}

#[tokio::test]
async fn rabbitmq_parks_what_does_not_decode() {
    let b = rabbitmq("q-park").await;
    undecodable_is_parked(&b, async |b| {
        // A broken producer: raw bytes on the work exchange.
        let Queue::Amqp(q) = &b.queue else {
            unreachable!()
        };
        q.publish_raw(b"\xff\xff not protobuf").await.unwrap();
    })
    .await;
    let v = b.vhost.as_ref().unwrap();
    assert_eq!(
        v.wait_queue_len("correu.parked", 1, Duration::from_secs(10)),
        1
    );
    assert_eq!(v.queue_len("correu.delivery"), 0);
}

#[tokio::test]
async fn spool_keeps_unsettled_messages_across_a_restart() {
    let b = spool().await;
    let m = message(1);
    b.queue.publish(&m).await.unwrap();
    let mut c = b.queue.consumer();
    let d = next(&mut c, Duration::from_secs(5)).await.unwrap();
    drop(d); // the process dies before settling it
    drop(c);
    let Backend {
        queue, cfg, _dir, ..
    } = b;
    assert!(
        Queue::open(&cfg, QueueBackend::Embedded, &Default::default())
            .await
            .is_err(),
        "a second server cannot take the spool"
    );
    drop(queue);
    let reopened = Queue::open(&cfg, QueueBackend::Embedded, &Default::default())
        .await
        .unwrap();
    let mut c = reopened.consumer();
    let d = next(&mut c, Duration::from_secs(5))
        .await
        .expect("handed out again");
    assert_eq!(d.message.clone().unwrap(), m);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn rabbitmq_unreachable_publish_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let closed = correu_testkit::ClosedPort::new();
    let cfg = QueueConfig {
        // Nothing listens here.
        url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed.port),
        connect_timeout: Dur::secs(2),
        ..config(dir.path())
    };
    let q = Queue::open(&cfg, QueueBackend::Rabbitmq, &Default::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = q.publish(&message(1)).await.unwrap_err();
    assert!(
        matches!(e, correu_queue::PublishError::Unavailable(_)),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The operator's actions: a message deferred for a minute is tried now,
/// another is deleted, a parked one is requeued.
async fn admin_actions(b: Backend) {
    use correu_queue::admin::Which;
    let (a, d) = (message(1), message(2));
    b.queue.publish(&a).await.unwrap();
    b.queue.publish(&d).await.unwrap();
    let mut c = b.queue.consumer();
    for _ in 0..2 {
        let got = next(&mut c, Duration::from_secs(10)).await.unwrap();
        let m = got.message.clone().unwrap();
        // Tier 1 waits a minute.
        got.retry(
            &QueuedMessage { attempt: 1, ..m },
            1,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    assert!(
        next(&mut c, Duration::from_millis(1500)).await.is_none(),
        "both wait their minute"
    );
    let counts = b.queue.counts().await.unwrap();
    let deferred: u64 = counts
        .iter()
        .filter(|c| c.name.contains("retry") || c.name == "deferred")
        .map(|c| c.messages)
        .sum();
    assert_eq!(deferred, 2, "{counts:?}");

    let deleted = b.queue.delete(&d.queue_id, None).await.unwrap();
    assert_eq!(
        deleted,
        1,
        "deleting {}; before {counts:?}; after {:?}",
        d.queue_id,
        b.queue.counts().await
    );
    assert_eq!(b.queue.retry_now(Which::Id(&a.queue_id)).await.unwrap(), 1);
    let back = next(&mut c, Duration::from_secs(10))
        .await
        .expect("retried now");
    assert_eq!(back.message.as_ref().unwrap().queue_id, a.queue_id);
    back.park("operator test").await.unwrap();
    assert!(
        next(&mut c, Duration::from_millis(1500)).await.is_none(),
        "the deleted one is gone"
    );

    assert_eq!(b.queue.requeue_parked(Which::All).await.unwrap(), 1);
    let again = next(&mut c, Duration::from_secs(10))
        .await
        .expect("requeued from parking");
    assert_eq!(again.message.as_ref().unwrap().queue_id, a.queue_id);
    again.ack().await.unwrap();
    let left: u64 = b
        .queue
        .counts()
        .await
        .unwrap()
        .iter()
        .map(|c| c.messages)
        .sum();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn spool_admin_actions() {
    admin_actions(spool().await).await;
}

#[tokio::test]
async fn rabbitmq_admin_actions() {
    admin_actions(rabbitmq("q-admin").await).await;
}

/// A retry of a message that is still in flight (a copy of the same id
/// waiting in `deferred/`, as a crash between writing a retry and settling
/// can leave) is not moved over it: it waits until the one in flight is
/// settled, then comes back itself.
#[tokio::test]
async fn spool_never_moves_a_retry_over_a_message_in_flight() {
    let b = spool().await;
    let m = message(1);
    b.queue.publish(&m).await.unwrap();
    let mut c = b.queue.consumer();
    let first = next(&mut c, Duration::from_secs(5)).await.unwrap();
    let due_copy = QueuedMessage {
        attempt: 1,
        ..m.clone()
    };
    let deferred = b
        .cfg
        .spool
        .join("deferred")
        .join(format!("000000000000001-{}", m.queue_id));
    std::fs::write(&deferred, prost::Message::encode_to_vec(&due_copy)).unwrap();
    // Scans run meanwhile: the copy stays where it is.
    assert!(next(&mut c, Duration::from_millis(1200)).await.is_none());
    assert!(
        deferred.exists(),
        "not moved while the same id is in flight"
    );
    first.ack().await.unwrap();
    let again = next(&mut c, Duration::from_secs(5))
        .await
        .expect("the retry comes back once the first is settled");
    assert_eq!(again.message.as_ref().unwrap().attempt, 1);
    again.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_millis(1200)).await.is_none());
}

/// The other way round: a file in `active/` is in flight when a journal
/// message with the same id arrives; that one waits (it is not dropped)
/// and is handed out once the file's copy is settled.
#[tokio::test]
async fn spool_keeps_a_journal_message_whose_id_is_busy() {
    let b = spool().await;
    let m = message(1);
    let file_copy = QueuedMessage {
        attempt: 2,
        ..m.clone()
    };
    std::fs::write(
        b.cfg.spool.join("active").join(&m.queue_id),
        prost::Message::encode_to_vec(&file_copy),
    )
    .unwrap();
    let mut c = b.queue.consumer();
    let first = next(&mut c, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        first.message.as_ref().unwrap().attempt,
        2,
        "the file's copy"
    );
    b.queue.publish(&m).await.unwrap();
    assert!(
        next(&mut c, Duration::from_millis(1200)).await.is_none(),
        "not handed out while the same id is in flight"
    );
    first.ack().await.unwrap();
    let second = next(&mut c, Duration::from_secs(5))
        .await
        .expect("the journal's copy, once the file's is settled");
    assert_eq!(second.message.as_ref().unwrap().attempt, 0);
    second.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_millis(1200)).await.is_none());
}

/// Whoever decides first decides a message's fate, once: a withdrawal
/// before delivery takes it means it is dropped; delivery first means
/// ingress's late withdrawal finds it delivering (and answers 250). The
/// keys expire: a claim after ingress's longest wait, a withdrawal after
/// the message's longest life.
#[tokio::test]
async fn the_first_to_decide_a_messages_fate_decides_it() {
    use correu_queue::fate::{Fate, Fates};
    use correu_runtime::config::RedisConfig;
    let prefix = format!("correu-test-fate-{}", std::process::id());
    let redis = RedisConfig {
        url: Some("redis://127.0.0.1:6379".into()),
        prefix: prefix.clone(),
        ..RedisConfig::default()
    };
    let cfg = QueueConfig {
        confirm_timeout: Dur::secs(30),
        ..QueueConfig::default()
    };
    let fates = Fates::new(&cfg, &redis).unwrap().expect("redis.url is set");

    let (a, b) = (new_queue_id(), new_queue_id());
    assert_eq!(fates.withdraw(&a).await.unwrap(), Fate::Withdrawn);
    assert_eq!(fates.claim(&a).await.unwrap(), Fate::Withdrawn);
    assert_eq!(fates.claim(&b).await.unwrap(), Fate::Delivering);
    assert_eq!(
        fates.claim(&b).await.unwrap(),
        Fate::Delivering,
        "a redelivery"
    );
    assert_eq!(fates.withdraw(&b).await.unwrap(), Fate::Delivering);

    let mut c = deadpool_redis::redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl = |id: String| {
        let key = format!("{prefix}:fate:{id}");
        deadpool_redis::redis::cmd("TTL").arg(key).to_owned()
    };
    let claim_ttl: i64 = ttl(b.clone()).query_async(&mut c).await.unwrap();
    assert!((60..=90).contains(&claim_ttl), "{claim_ttl}");
    let withdrawal_ttl: i64 = ttl(a.clone()).query_async(&mut c).await.unwrap();
    assert!(withdrawal_ttl > 5 * 24 * 3600, "{withdrawal_ttl}");
    for id in [a, b] {
        let _: i64 = deadpool_redis::redis::cmd("DEL")
            .arg(format!("{prefix}:fate:{id}"))
            .query_async(&mut c)
            .await
            .unwrap();
    }
}
