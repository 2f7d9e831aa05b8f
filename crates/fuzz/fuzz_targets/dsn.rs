//! A bounce built from any envelope values (sender, recipients, NOTIFY,
//! ORCPT, ENVID) and any remote reply: the report's header block and its
//! machine-readable part (message/delivery-status) hold only the fields
//! Correu writes, each on its own lines, whatever the values were.
#![no_main]
use correu_delivery::dsn::{Action, build};
use correu_delivery::outcome::Failure;
use correu_proto::v1::{QueuedMessage, Recipient};
use libfuzzer_sys::fuzz_target;

const TOP: &[&str] = &[
    "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version", "Content-Type",
];
const STATUS: &[&str] = &[
    "Reporting-MTA", "X-Correu-Queue-ID", "Original-Envelope-Id", "Arrival-Date",
    "Final-Recipient", "Original-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
];

fn fields_only(block: &str, names: &[&str]) {
    for line in block.split("\r\n") {
        assert!(!line.contains(['\r', '\n']), "a bare line end: {line:?}");
        if line.is_empty() || line.starts_with('\t') {
            continue;
        }
        let name = line.split_once(": ").map(|(n, _)| n).unwrap_or(line);
        assert!(names.contains(&name), "an unexpected field line: {line:?}");
    }
}

fuzz_target!(|input: (String, Vec<(String, String, String)>, String, String, Option<String>, Option<String>, u8, Vec<u8>)| {
    let (sender, rcpts, envid, text, reply, remote, which, content) = input;
    if sender.is_empty() || rcpts.is_empty() {
        return;
    }
    let original = QueuedMessage {
        queue_id: "ORIGINAL".into(),
        sender,
        recipients: rcpts
            .iter()
            .map(|(address, notify, orcpt)| Recipient {
                address: address.clone(),
                notify: notify.clone(),
                orcpt: orcpt.clone(),
                ..Recipient::default()
            })
            .collect(),
        content,
        dsn_envid: envid,
        dsn_ret: ["", "HDRS", "FULL"][usize::from(which % 3)].into(),
        received_at_unix_micros: 1_700_000_000_000_000,
        ..QueuedMessage::default()
    };
    let failure = Failure {
        status: "5.1.1".into(),
        text,
        remote_mta: remote.clone(),
        smtp_reply: reply,
        suppressed: false,
    };
    let reports: Vec<(&Recipient, Action)> = original
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let a = match (usize::from(which) + i) % 4 {
                0 => Action::Failed(failure.clone()),
                1 => Action::Delayed(failure.clone()),
                2 => Action::Delivered,
                _ => Action::Relayed {
                    remote_mta: remote.clone().unwrap_or_default(),
                },
            };
            (r, a)
        })
        .collect();
    let Some(dsn) = build("mx.example", &original, &reports, "NEWID", 1_700_000_100_000_000) else {
        return;
    };
    let text = String::from_utf8(dsn.content).expect("the report is UTF-8");
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    fields_only(head, TOP);
    let marker = "Content-Type: message/delivery-status\r\n\r\n";
    let at = rest.find(marker).expect("a delivery-status part") + marker.len();
    let status = &rest[at..];
    let end = status.find("\r\n--NEWID/mx.example").expect("the part ends at the boundary");
    fields_only(&status[..end], STATUS);
});
