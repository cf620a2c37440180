//! `kinvoke.v1.CommandService`: invoke, read, follow, cancel and list commands.

use std::sync::Arc;

use super::wire;
use crate::command::InvalidRequest;
use kinvoke_proto::v1 as pb;
use kinvoke_proto::v1::command_service_server::CommandService;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::access::authz::Action;
use crate::audit::AuditEvent;
use crate::command::{CommandSpec, Limits};
use crate::guard::{Guard, Use};
use crate::runner::{Follow, RunError, Runner};
use crate::store::{CommandRecord, ListQuery, millis};

/// Default and largest page of `ListCommands`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

/// `kinvoke.v1.CommandService`.
pub struct CommandApi {
    guard: Arc<Guard>,
    runner: Arc<Runner>,
    limits: Limits,
}

impl CommandApi {
    /// The service over a guard and a runner, validating requests against `limits`.
    pub fn new(guard: Arc<Guard>, runner: Arc<Runner>, limits: Limits) -> Self {
        Self {
            guard,
            runner,
            limits,
        }
    }

    /// The record a caller asked for, if they may use it that way.
    async fn record_for(
        &self,
        who: &crate::authn::Principal,
        cluster: &str,
        id: &str,
        use_: Use,
    ) -> Result<CommandRecord, Status> {
        self.guard.known_cluster(
            who,
            match use_ {
                Use::Read => Action::ReadResults.as_str(),
                Use::Cancel => Action::RunCommand.as_str(),
            },
            cluster,
        )?;
        let record = self.runner.result(cluster, id, false).await?;
        self.guard.may_use(who, &record, use_)?;
        let (command_id, cluster) = (record.id.to_string(), record.cluster.clone());
        self.guard.audit().record(match use_ {
            Use::Read => AuditEvent::ResultRead {
                command_id,
                cluster,
                principal: who.id.clone(),
            },
            Use::Cancel => AuditEvent::CommandCancelRequested {
                command_id,
                cluster,
                principal: who.id.clone(),
            },
        });
        Ok(record)
    }
}

type EventSender = mpsc::Sender<Result<pb::OutputEvent, Status>>;

fn event(e: pb::output_event::Event) -> Result<pb::OutputEvent, Status> {
    Ok(pb::OutputEvent { event: Some(e) })
}

fn chunk(offset: u64, data: Vec<u8>) -> Result<pb::OutputEvent, Status> {
    event(pb::output_event::Event::Chunk(pb::OutputChunk {
        offset,
        data,
    }))
}

fn gap(offset: u64, length: u64) -> Result<pb::OutputEvent, Status> {
    event(pb::output_event::Event::Gap(pb::OutputGap {
        offset,
        length,
    }))
}

/// Sends a command's output to one follower, then its final result. Returns early when
/// the follower goes away (a send fails).
async fn stream_output(
    runner: Arc<Runner>,
    cluster: String,
    id: String,
    follow: Follow,
    tx: EventSender,
) {
    let mut sent: u64 = 0;
    let record = match follow {
        Follow::Finished(record) => *record,
        Follow::Live(log) => {
            let mut sub = log.subscribe();
            if !sub.retained.is_empty() {
                sent = sub.retained.len() as u64;
                if tx
                    .send(chunk(0, std::mem::take(&mut sub.retained)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if sub.total > sent {
                if tx.send(gap(sent, sub.total - sent)).await.is_err() {
                    return;
                }
                sent = sub.total;
            }
            loop {
                // a client that went away ends its follower at once, even while the
                // command is silent: otherwise every abandoned stream is held until the
                // command prints again or ends
                let received = tokio::select! {
                    biased;
                    () = tx.closed() => return,
                    received = sub.live.recv() => received,
                };
                match received {
                    Ok(c) => {
                        let end = c.offset + c.data.len() as u64;
                        if end <= sent {
                            continue;
                        }
                        if c.offset > sent && tx.send(gap(sent, c.offset - sent)).await.is_err() {
                            return;
                        }
                        let skip = usize::try_from(sent.saturating_sub(c.offset)).unwrap_or(0);
                        let from = c.offset.max(sent);
                        if tx.send(chunk(from, c.data[skip..].to_vec())).await.is_err() {
                            return;
                        }
                        sent = end;
                    }
                    // the gap shows up in the next chunk's offset
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            // the live feed closes once the result is stored
            let result = tokio::select! {
                biased;
                () = tx.closed() => return,
                result = runner.result(&cluster, &id, true) => result,
            };
            match result {
                Ok(record) => record,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            }
        }
    };
    if sent == 0 && !record.output.is_empty() {
        // a cut output carries its own marker line where bytes were left out
        sent = if record.output_truncated {
            record.output_size
        } else {
            record.output.len() as u64
        };
        if tx.send(chunk(0, record.output.clone())).await.is_err() {
            return;
        }
    }
    if record.output_size > sent && tx.send(gap(sent, record.output_size - sent)).await.is_err() {
        return;
    }
    let _ = tx
        .send(event(pb::output_event::Event::Finished(
            wire::command_result(record, false),
        )))
        .await;
}

#[tonic::async_trait]
impl CommandService for CommandApi {
    async fn invoke_command(
        &self,
        request: Request<pb::InvokeCommandRequest>,
    ) -> Result<Response<pb::InvokeCommandResponse>, Status> {
        let principal = self.guard.caller(&request).await?;
        let req = request.into_inner();
        self.guard
            .known_cluster(&principal, Action::RunCommand.as_str(), &req.cluster)?;
        let break_glass = self
            .guard
            .authorize(&principal, Action::RunCommand, &req.cluster)?;
        let no_wait = req.no_wait;
        let cluster = req.cluster.clone();
        let started = match wire::command_request(req)
            .and_then(|req| CommandSpec::validate(req, &self.limits))
        {
            Ok(spec) => self.runner.start(&principal, spec, break_glass).await,
            Err(invalid) => Err(RunError::from(invalid)),
        };
        let record = match started {
            Ok(record) => record,
            Err(err) => {
                // every refusal leaves its trace, not only the "allow" that preceded it
                let status = Status::from(err);
                self.guard.audit().record(AuditEvent::CommandRefused {
                    principal: principal.id.clone(),
                    source: principal.source.to_string(),
                    cluster,
                    code: format!("{:?}", status.code()),
                    reason: status.message().to_owned(),
                });
                // Debug-escaped: the reason holds the caller's own text (a program name), which
                // must not be able to forge log lines
                tracing::info!(principal = ?principal.id, code = ?status.code(), reason = ?status.message(), "command refused");
                return Err(status);
            }
        };
        let record = if no_wait {
            record
        } else {
            // the command runs in its own task: if this caller disconnects, this future is
            // dropped and the command carries on to its result
            self.runner
                .result(&record.cluster, record.id.as_str(), true)
                .await?
        };
        Ok(Response::new(pb::InvokeCommandResponse {
            result: Some(wire::command_result(record, true)),
        }))
    }

    async fn get_command_result(
        &self,
        request: Request<pb::GetCommandResultRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        let principal = self.guard.caller(&request).await?;
        let req = request.into_inner();
        let record = self
            .record_for(&principal, &req.cluster, &req.command_id, Use::Read)
            .await?;
        let record = if req.wait {
            self.runner
                .result(&req.cluster, &req.command_id, true)
                .await?
        } else {
            record
        };
        Ok(Response::new(wire::command_result(record, true)))
    }

    type StreamCommandOutputStream = ReceiverStream<Result<pb::OutputEvent, Status>>;

    async fn stream_command_output(
        &self,
        request: Request<pb::StreamCommandOutputRequest>,
    ) -> Result<Response<Self::StreamCommandOutputStream>, Status> {
        let principal = self.guard.caller(&request).await?;
        let req = request.into_inner();
        self.record_for(&principal, &req.cluster, &req.command_id, Use::Read)
            .await?;
        let follow = self.runner.follow(&req.cluster, &req.command_id).await?;
        // a small channel: a slow follower back-pressures its own task only
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_output(
            self.runner.clone(),
            req.cluster,
            req.command_id,
            follow,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_command(
        &self,
        request: Request<pb::CancelCommandRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        let principal = self.guard.caller(&request).await?;
        let req = request.into_inner();
        self.record_for(&principal, &req.cluster, &req.command_id, Use::Cancel)
            .await?;
        tracing::info!(principal = %principal.id, command_id = %req.command_id, "cancel requested");
        let record = self
            .runner
            .cancel(
                &req.cluster,
                &req.command_id,
                format!("canceled by {}", principal.id),
            )
            .await?;
        Ok(Response::new(wire::command_result(record, true)))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let principal = self.guard.caller(&request).await?;
        let req = request.into_inner();
        let only = (!req.cluster.is_empty()).then_some(req.cluster.as_str());
        if let Some(cluster) = only {
            self.guard
                .known_cluster(&principal, "commands/list", cluster)?;
        }
        let visible = self.guard.visibility(&principal, only);
        let limit = match req.page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                parse_page_token(&req.page_token).ok_or_else(|| InvalidRequest::Malformed {
                    field: "page_token",
                    message: "not a token this gateway issued; pass next_page_token from the previous page".to_owned(),
                })?,
            )
        };
        let records = self
            .runner
            .list(ListQuery {
                visible,
                limit: limit + 1,
                after,
            })
            .await?;
        let more = records.len() > limit;
        let records: Vec<CommandRecord> = records.into_iter().take(limit).collect();
        let next_page_token = match (more, records.last()) {
            (true, Some(last)) => format!("{}.{}", millis(last.started_at), last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListCommandsResponse {
            commands: records
                .into_iter()
                .map(|r| wire::command_result(r, false))
                .collect(),
            next_page_token,
        }))
    }
}

fn parse_page_token(token: &str) -> Option<(i64, String)> {
    let (ms, id) = token.split_once('.')?;
    let id = crate::command::CommandId::parse(id)?;
    Some((ms.parse().ok()?, id.to_string()))
}
