//! The agent's Prometheus metrics, served as text on `GET /metrics` at `--metrics-address`.
//!
//! Control-plane metrics: what the agent knows, what it refused, how its syncs go, how its
//! watches fare. Everything here is updated by the one task that syncs (and the watch source),
//! so the values are consistent with the last sync the logs report. The datapath's own counters
//! and map fill levels are read at each scrape ([`crate::stats`]).
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::stats::DatapathMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// "Service", "EndpointSlice", "Node", or "manifest" for a file that could not be read.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// "ok" or "failed".
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub services: Gauge,
    pub endpoint_slices: Gauge,
    pub backend_sets: Gauge,
    /// Objects (or parts of them) skipped right now, by kind.
    pub rejected: Family<KindLabel, Gauge>,
    /// Problems reported (logged) since the start, by kind: each counts once, when it appears.
    pub rejections: Family<KindLabel, Counter>,
    pub syncs: Family<OutcomeLabel, Counter>,
    pub sync_seconds: Histogram,
    pub map_writes: Counter,
    /// Watch requests that failed and were retried, by kind.
    pub watch_failures: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    /// The control-plane metrics alone.
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    /// The control-plane metrics, and the datapath's if given.
    pub fn new(datapath: Option<Arc<DatapathMetrics>>) -> Metrics {
        let mut registry = Registry::with_prefix("proxy");
        let metrics = Metrics {
            services: Gauge::default(),
            endpoint_slices: Gauge::default(),
            backend_sets: Gauge::default(),
            rejected: Family::default(),
            rejections: Family::default(),
            syncs: Family::default(),
            // 100 µs to ~6.5 s.
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 3.0, 11)),
            map_writes: Counter::default(),
            watch_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "services",
            "Services the agent knows",
            metrics.services.clone(),
        );
        registry.register(
            "endpoint_slices",
            "EndpointSlices the agent knows",
            metrics.endpoint_slices.clone(),
        );
        registry.register(
            "backend_sets",
            "Service ports programmed into the datapath",
            metrics.backend_sets.clone(),
        );
        registry.register(
            "rejected_objects",
            "Objects or parts of objects skipped now, with a logged reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "rejections",
            "Problems found in objects, each counted when first reported",
            metrics.rejections.clone(),
        );
        registry.register("syncs", "Syncs of the datapath maps", metrics.syncs.clone());
        registry.register(
            "sync_duration_seconds",
            "Time to compile and write one sync",
            metrics.sync_seconds.clone(),
        );
        registry.register(
            "map_writes",
            "Entries written to or deleted from the datapath maps",
            metrics.map_writes.clone(),
        );
        registry.register(
            "watch_failures",
            "Failed watch or list requests to the Kubernetes API, retried",
            metrics.watch_failures.clone(),
        );
        if let Some(datapath) = datapath {
            registry.register_collector(Box::new(datapath));
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn kind(kind: &str) -> KindLabel {
        KindLabel {
            kind: kind.to_string(),
        }
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Binds `--metrics-address`, so that a bad one fails at start, naming the flag.
pub async fn listen(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics-address {address}: cannot listen"))
}

/// Serves `metrics` on `listener` forever.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!("metrics: accepting a connection: {error}");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move {
                    // A scrape reads the datapath's maps with system calls: off the workers.
                    let path = request.uri().path().to_owned();
                    let response = tokio::task::spawn_blocking(move || respond(&metrics, &path))
                        .await
                        .unwrap_or_else(|_| {
                            text_response(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "scrape failed\n".into(),
                            )
                        });
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A client that goes away mid-answer is its own business.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => text_response(StatusCode::OK, metrics.encode()),
        _ => text_response(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".to_string(),
        ),
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_every_metric_with_the_prefix() {
        let metrics = Metrics::default();
        metrics
            .rejected
            .get_or_create(&Metrics::kind("Service"))
            .set(3);
        metrics
            .rejections
            .get_or_create(&Metrics::kind("EndpointSlice"))
            .inc();
        metrics
            .syncs
            .get_or_create(&OutcomeLabel { outcome: "ok" })
            .inc();
        let text = metrics.encode();
        for line in [
            "proxy_rejected_objects{kind=\"Service\"} 3",
            "proxy_rejections_total{kind=\"EndpointSlice\"} 1",
            "proxy_syncs_total{outcome=\"ok\"} 1",
            "# TYPE proxy_sync_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
