//! The gRPC face of the mailboxes. Blocking file work runs on the blocking
//! pool; errors become gRPC status codes here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;

use correu_proto::v1::check_recipient_response::Status as RcptStatus;
use correu_proto::v1::storage_server::Storage;
use correu_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CheckRecipientRequest, CheckRecipientResponse,
    DeleteMessageRequest, DeleteMessageResponse, DeliverRequest, DeliverResponse,
    GetMessageRequest, ListMessagesRequest, ListMessagesResponse, MailboxStatsRequest,
    MailboxStatsResponse, MessageChunk, MessageInfo, SetFlagsRequest, SetFlagsResponse, StoredCopy,
};
use futures_util::Stream;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::metrics::METRICS;

use crate::maildir::{Folder, MailboxError, Mailboxes, Standing};

/// Chunk size of `GetMessage` streams.
const CHUNK: usize = 64 * 1024;
/// Largest page of `ListMessages`.
const MAX_PAGE: u32 = 1000;

/// The one place mailbox errors become gRPC codes. Delivery reads
/// `NOT_FOUND` and `INVALID_ARGUMENT` as permanent, `RESOURCE_EXHAUSTED` as
/// a full mailbox (4.2.2), the rest as temporary.
fn status(e: MailboxError) -> Status {
    match e {
        MailboxError::OverQuota(m) => Status::resource_exhausted(format!("mailbox {m} is full")),
        MailboxError::UnknownRecipient(a) => Status::not_found(format!("no mailbox for {a}")),
        MailboxError::NoMessage(id) => Status::not_found(format!("no message {id}")),
        MailboxError::Invalid(m) => Status::invalid_argument(m),
        MailboxError::Io(e) => Status::unavailable(format!("mailbox I/O error: {e}")),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MailboxError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(status)
}

#[derive(Clone)]
pub struct StorageService {
    boxes: Arc<Mailboxes>,
}

impl StorageService {
    pub fn new(boxes: Arc<Mailboxes>) -> Self {
        StorageService { boxes }
    }
}

/// Whether any mailbox in a standing has a quota.
fn mailboxes_limited(boxes: &Mailboxes, s: &Standing) -> bool {
    let m = match s {
        Standing::Exists { mailboxes, .. } | Standing::OverQuota(mailboxes) => mailboxes,
        Standing::Unknown => return false,
    };
    m.iter().any(|b| boxes.directory().quota(b) > 0)
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<MessageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Storage for StorageService {
    async fn check_recipient(
        &self,
        req: Request<CheckRecipientRequest>,
    ) -> Result<Response<CheckRecipientResponse>, Status> {
        let CheckRecipientRequest { address, size } = req.into_inner();
        // Without quotas the answer is in memory: no trip to the blocking pool.
        let standing = match self.boxes.standing_in_memory(&address) {
            Some(s) => s.map_err(status)?,
            None => {
                let boxes = self.boxes.clone();
                blocking(move || boxes.standing(&address, size)).await?
            }
        };
        let limited = mailboxes_limited(&self.boxes, &standing);
        let (status, mailboxes, forward) = match standing {
            Standing::Exists { mailboxes, forward } => (RcptStatus::Exists, mailboxes, forward),
            Standing::OverQuota(m) => (RcptStatus::OverQuota, m, Vec::new()),
            Standing::Unknown => (RcptStatus::Unknown, Vec::new(), Vec::new()),
        };
        Ok(Response::new(CheckRecipientResponse {
            status: status as i32,
            mailbox: mailboxes.first().cloned().unwrap_or_default(),
            mailboxes,
            forward,
            limited,
        }))
    }

    async fn deliver(
        &self,
        req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let parent = correu_storage_client::trace_headers(&req);
        let r = req.into_inner();
        let boxes = self.boxes.clone();
        let span = tracing::info_span!(
            parent: None,
            "storage.deliver",
            queue_id = %r.queue_id,
            trace_id = tracing::field::Empty,
            "rpc.system" = "grpc",
            "rpc.service" = "correu.v1.Storage",
            "rpc.method" = "Deliver",
            "otel.kind" = "server",
            "storage.copies" = tracing::field::Empty,
            "otel.status_description" = tracing::field::Empty,
            "rpc.grpc.status_code" = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        correu_runtime::telemetry::extract_into(&span, &parent);
        if let Some(t) = correu_runtime::telemetry::trace_id(&span) {
            span.record("trace_id", t.as_str());
        }
        let queue_id = r.queue_id.clone();
        let recipient = r.recipient.clone();
        let size = r.content.len() as u64;
        let delivered = blocking(move || {
            boxes.deliver_in(
                Folder::parse(&r.folder)?,
                &r.queue_id,
                &r.sender,
                &r.recipient,
                &r.content,
                r.received_at_unix_micros,
            )
        })
        .instrument(span.clone())
        .await;
        let copies = match delivered {
            Ok(copies) => copies,
            Err(status) => {
                let outcome = match status.code() {
                    tonic::Code::NotFound => "no_mailbox",
                    tonic::Code::ResourceExhausted => "quota",
                    tonic::Code::InvalidArgument => "invalid",
                    _ => "error",
                };
                METRICS.delivered(outcome, started.elapsed().as_secs_f64());
                span.record("otel.status_description", status.message());
                span.record("rpc.grpc.status_code", status.code() as i64);
                // Every refusal is said here, where the disk is: the caller
                // only sees a status code, and a volume that went read-only
                // must not fail quietly message after message.
                let _in_span = span.enter();
                match status.code() {
                    tonic::Code::NotFound
                    | tonic::Code::InvalidArgument
                    | tonic::Code::ResourceExhausted => tracing::info!(
                        queue_id = %queue_id, recipient = %recipient, code = ?status.code(),
                        reason = %status.message(), "not stored"
                    ),
                    _ => tracing::error!(
                        queue_id = %queue_id, recipient = %recipient, code = ?status.code(),
                        reason = %status.message(), "not stored"
                    ),
                }
                return Err(status);
            }
        };
        span.record("storage.copies", copies.len() as i64);
        span.record("rpc.grpc.status_code", 0_i64);
        let written = copies.iter().filter(|d| !d.duplicate).count() as u64;
        METRICS.copies.add(written, &[]);
        METRICS.written.add(written * size, &[]);
        METRICS.delivered(
            if written == 0 { "duplicate" } else { "stored" },
            started.elapsed().as_secs_f64(),
        );
        let _in_span = span.enter();
        for d in &copies {
            // Delivery's line says it at info; this step is debug.
            tracing::debug!(queue_id = %queue_id, mailbox = %d.mailbox, message_id = %d.message_id, duplicate = d.duplicate, "stored");
        }
        let first = copies.first().cloned();
        Ok(Response::new(DeliverResponse {
            mailbox: first
                .as_ref()
                .map(|d| d.mailbox.clone())
                .unwrap_or_default(),
            message_id: first.map(|d| d.message_id).unwrap_or_default(),
            duplicate: copies.iter().all(|d| d.duplicate),
            copies: copies
                .into_iter()
                .map(|d| StoredCopy {
                    mailbox: d.mailbox,
                    message_id: d.message_id,
                    duplicate: d.duplicate,
                })
                .collect(),
        }))
    }

    async fn list_messages(
        &self,
        req: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let r = req.into_inner();
        let offset: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page_token"))?
        };
        let limit = match r.page_size {
            0 => 50,
            n => n.min(MAX_PAGE),
        } as usize;
        let boxes = self.boxes.clone();
        let (list, more) = blocking(move || boxes.list(&r.address, offset, limit)).await?;
        let next_page_token = if more {
            (offset + list.len()).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListMessagesResponse {
            messages: list
                .into_iter()
                .map(|l| MessageInfo {
                    id: l.id,
                    size: l.size,
                    received_at_unix_micros: l.received_at_unix_micros,
                    flags: l.flags,
                })
                .collect(),
            next_page_token,
        }))
    }

    type GetMessageStream = ChunkStream;

    async fn get_message(
        &self,
        req: Request<GetMessageRequest>,
    ) -> Result<Response<Self::GetMessageStream>, Status> {
        let r = req.into_inner();
        let boxes = self.boxes.clone();
        let path = blocking(move || boxes.find(&r.address, &r.id)).await?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| status(MailboxError::Io(e)))?;
        let stream = futures_util::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(MessageChunk { data: buf }), Some(file)))
                }
                Err(e) => Some((Err(status(MailboxError::Io(e))), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delete_message(
        &self,
        req: Request<DeleteMessageRequest>,
    ) -> Result<Response<DeleteMessageResponse>, Status> {
        let r = req.into_inner();
        let boxes = self.boxes.clone();
        blocking(move || boxes.delete(&r.address, &r.id)).await?;
        Ok(Response::new(DeleteMessageResponse {}))
    }

    async fn set_flags(
        &self,
        req: Request<SetFlagsRequest>,
    ) -> Result<Response<SetFlagsResponse>, Status> {
        let r = req.into_inner();
        let boxes = self.boxes.clone();
        let flags = blocking(move || boxes.set_flags(&r.address, &r.id, &r.flags)).await?;
        Ok(Response::new(SetFlagsResponse { flags }))
    }

    async fn mailbox_stats(
        &self,
        req: Request<MailboxStatsRequest>,
    ) -> Result<Response<MailboxStatsResponse>, Status> {
        let address = req.into_inner().address;
        let boxes = self.boxes.clone();
        let (usage, quota) = blocking(move || boxes.stats(&address)).await?;
        Ok(Response::new(MailboxStatsResponse {
            messages: usage.messages,
            bytes: usage.bytes,
            quota_bytes: quota,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let r = req.into_inner();
        let (account, hash) = match self.boxes.directory().credentials(&r.address) {
            Some((account, hash)) => (Some(account), hash),
            None => (None, None),
        };
        // Argon2, a few at a time, on the blocking pool; an unknown account
        // is checked against a dummy hash so the answer takes as long.
        let ok = correu_storage_client::accounts::check_password(hash, r.password).await
            && account.is_some();
        Ok(Response::new(AuthenticateResponse {
            ok,
            account: if ok {
                account.unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }
}
