//! The IO loop of a subscription: one ADS stream at a time, Delta first, State of the World
//! when the server answers `UNIMPLEMENTED`, reconnecting with jittered back-off and resuming
//! from what the [`Subscription`] holds.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

use super::{
    Backoff, Resource,
    protocol::{Reply, Subscription, Update},
};

/// Which ADS variant a subscription speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Incremental xDS (the default).
    Delta,
    /// State of the World.
    Sotw,
}

/// How a stream ended.
enum Ended {
    /// The consumer dropped the update stream, or the client is gone: stop.
    Stop,
    /// The stream failed; `delivered` says whether it got as far as a response.
    Failed { status: Status, delivered: bool },
}

pub(super) struct Driver<T> {
    pub(super) channel: super::Transport,
    pub(super) subscription: Subscription<T>,
    pub(super) variant: Variant,
    pub(super) backoff: Backoff,
    pub(super) max_message_bytes: usize,
    pub(super) updates: mpsc::Sender<Update<T>>,
    /// Set when the server refuses for good; the stream then ends.
    pub(super) refusal: Arc<OnceLock<Status>>,
    pub(super) shutdown: CancellationToken,
}

/// Whether a stream that failed with `code` is worth opening again: not when the server
/// refused what it was asked (the same request gets the same answer).
fn retried(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
    )
}

impl<T: Resource> Driver<T> {
    pub(super) async fn run(mut self) {
        let mut attempt: u32 = 0;
        loop {
            let ended = match self.variant {
                Variant::Delta => self.delta().await,
                Variant::Sotw => self.sotw().await,
            };
            match ended {
                Ended::Stop => return,
                Ended::Failed { status, .. }
                    if status.code() == Code::Unimplemented && self.variant == Variant::Delta =>
                {
                    debug!(
                        "the server does not speak Delta ADS; falling back to State of the World"
                    );
                    self.variant = Variant::Sotw;
                    continue;
                }
                Ended::Failed { status, .. } if !retried(status.code()) => {
                    warn!(code = ?status.code(), message = status.message(), "ADS subscription refused; not retrying");
                    let _ = self.refusal.set(status);
                    return;
                }
                Ended::Failed { status, delivered } => {
                    if delivered {
                        attempt = 0;
                    }
                    let delay = self.backoff.delay(attempt, fastrand::f64());
                    attempt = attempt.saturating_add(1);
                    warn!(code = ?status.code(), message = status.message(), ?delay, "ADS stream ended; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.updates.closed() => return,
                        () = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    fn client(&self) -> AggregatedDiscoveryServiceClient<super::Transport> {
        AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    async fn delta(&mut self) -> Ended {
        let first = self.subscription.delta_request();
        self.stream(
            first,
            |mut client, requests| async move { client.delta_aggregated_resources(requests).await },
            Subscription::on_delta,
            |response: &DeltaDiscoveryResponse| &response.nonce,
        )
        .await
    }

    async fn sotw(&mut self) -> Ended {
        let first = self.subscription.sotw_request();
        self.stream(
            first,
            |mut client, requests| async move { client.stream_aggregated_resources(requests).await },
            Subscription::on_sotw,
            |response: &DiscoveryResponse| &response.nonce,
        )
        .await
    }

    /// One stream of either variant: `open` starts it with the requests to send, `on` reads
    /// a response into the subscription, `nonce` names a response in the log.
    async fn stream<Req, Resp, Fut>(
        &mut self,
        first: Req,
        open: impl FnOnce(
            AggregatedDiscoveryServiceClient<super::Transport>,
            ReceiverStream<Req>,
        ) -> Fut,
        on: fn(&mut Subscription<T>, &Resp) -> Reply<Req, T>,
        nonce: fn(&Resp) -> &str,
    ) -> Ended
    where
        Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, Status>>,
    {
        let (tx, rx) = mpsc::channel(4);
        if tx.send(first).await.is_err() {
            return Ended::Stop;
        }
        let opened = tokio::select! {
            opened = open(self.client(), ReceiverStream::new(rx)) => opened,
            () = self.shutdown.cancelled() => return Ended::Stop,
        };
        let mut responses = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return Ended::Failed {
                    status,
                    delivered: false,
                };
            }
        };
        let mut delivered = false;
        loop {
            let message = tokio::select! {
                message = responses.message() => message,
                () = self.updates.closed() => return Ended::Stop,
                () = self.shutdown.cancelled() => return Ended::Stop,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return Ended::Failed {
                        status: Status::unavailable("the server ended the stream"),
                        delivered,
                    };
                }
                Err(status) => return Ended::Failed { status, delivered },
            };
            delivered = true;
            let reply = on(&mut self.subscription, &response);
            if let Some(error) = &reply.rejected {
                warn!(nonce = nonce(&response), error, "NACK");
            }
            for update in reply.updates {
                if self.updates.send(update).await.is_err() {
                    return Ended::Stop;
                }
            }
            if let Some(request) = reply.request
                && tx.send(request).await.is_err()
            {
                return Ended::Stop;
            }
        }
    }
}

/// How long to wait for a first connection before giving up in [`super::Client::connect`].
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
