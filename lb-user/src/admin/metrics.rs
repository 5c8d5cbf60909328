//! Prometheus metrics (prometheus-client): request counts and latency by backend
//! and status, upstream errors, in-flight requests, and the kernel counters read
//! from the dataplane at scrape time.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{controller::Controller, dataplane::Dataplane};

/// `{backend, status}` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Backend name (`none` when no backend was chosen).
    pub backend: String,
    /// HTTP status returned to the client.
    pub status: u16,
}

/// `{backend}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// Backend name.
    pub backend: String,
}

/// All metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_errors: Family<BackendLabel, Counter>,
    latency: Family<BackendLabel, Histogram>,
}

impl Metrics {
    /// Registers everything, including the collectors that read the controller
    /// and the dataplane on each scrape.
    pub fn new(dataplane: Arc<Dataplane>, controller: Arc<Controller>) -> Self {
        let mut registry = Registry::with_prefix("agentlb");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by backend and status",
            requests.clone(),
        );
        let upstream_errors = Family::<BackendLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream attempts (connect errors, resets)",
            upstream_errors.clone(),
        );
        let latency = Family::<BackendLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 18,
            ))
        });
        registry.register(
            "response_headers_seconds",
            "Time from request received to response headers sent",
            latency.clone(),
        );
        registry.register_collector(Box::new(KernelCollector(dataplane)));
        registry.register_collector(Box::new(BackendCollector(controller)));
        Self {
            registry,
            requests,
            upstream_errors,
            latency,
        }
    }

    /// Records an answered request.
    pub fn observe(&self, backend: &str, status: u16, started: Instant) {
        self.requests
            .get_or_create(&RequestLabels {
                backend: backend.to_owned(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&BackendLabel {
                backend: backend.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records a failed upstream attempt.
    pub fn upstream_error(&self, backend: &str) {
        self.upstream_errors
            .get_or_create(&BackendLabel {
                backend: backend.to_owned(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Kernel counters and dataplane mode.
#[derive(Debug)]
struct KernelCollector(Arc<Dataplane>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mode = ConstGauge::new(i64::from(self.0.is_kernel()));
        mode.encode(encoder.encode_descriptor(
            "kernel_dataplane_active",
            "1 when the kernel programs are attached, 0 in userspace-only mode",
            None,
            mode.metric_type(),
        )?)?;
        let counters = self.0.counters();
        if counters.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "kernel_events",
            "Kernel program counters, summed over CPUs",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(family.encode_family(&CounterLabel { counter: name })?)?;
        }
        Ok(())
    }
}

/// Per-backend in-flight gauges.
#[derive(Debug)]
struct BackendCollector(Arc<Controller>);

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "backend_inflight",
            "Requests in flight per backend",
            None,
            MetricType::Gauge,
        )?;
        for b in self.0.backends().iter() {
            let g = ConstGauge::new(i64::try_from(b.load()).unwrap_or(i64::MAX));
            g.encode(family.encode_family(&BackendLabel {
                backend: b.name.clone(),
            })?)?;
        }
        Ok(())
    }
}
