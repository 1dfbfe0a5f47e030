//! btfs metrics (`metrics=IP:PORT`): the instruments that count where
//! nothing else counts yet, and the endpoint that serves them as
//! OpenMetrics text.
//!
//! Most of what a node exports is already counted for `btfs status`; the
//! node reads those counters at scrape time through a
//! [`Collector`](prometheus_client::collector::Collector) of its own
//! (`btfs_node::metrics`), so nothing is counted twice. What is here:
//!
//! * [`FsMetrics`]: FUSE operation latency, by operation;
//! * [`EngineMetrics`]: fetch latency (first byte, whole file), read
//!   errors and timeouts, cache evictions;
//! * [`Metrics`]: the one registry of a node, and [`server`], the HTTP
//!   endpoint (`GET /metrics`, nothing else).
//!
//! The instruments count from the start whether or not they are served
//! (each is a few atomics): the endpoint only registers them.

pub mod server;

use std::{sync::Arc, time::Instant};

pub use prometheus_client::{self, registry::Registry};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Unit,
};

/// The buckets of FUSE operation latency: 10 µs to about 42 s, ×4 a
/// bucket (metadata operations answer in microseconds; a read of content
/// held elsewhere waits for the network).
const FS_BUCKETS: (f64, f64, u16) = (10e-6, 4.0, 12);
/// The buckets of fetch latency: 1 ms to about 65 s, ×3 a bucket (a cold
/// read over a LAN takes milliseconds; a whole large file, minutes).
const FETCH_BUCKETS: (f64, f64, u16) = (1e-3, 3.0, 11);

fn histogram((start, factor, count): (f64, f64, u16)) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

fn fs_histogram() -> Histogram {
    histogram(FS_BUCKETS)
}

/// The label of a FUSE operation's latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The operation, as fuser names its handler (`lookup`, `read`, ...).
    pub op: &'static str,
}

/// FUSE operation latency, by operation: from the kernel's request
/// reaching the handler to its answer (a read served by the network is
/// timed until its data is answered).
#[derive(Debug, Clone)]
pub struct FsMetrics {
    ops: Family<OpLabel, Histogram, fn() -> Histogram>,
}

impl Default for FsMetrics {
    fn default() -> Self {
        Self {
            ops: Family::new_with_constructor(fs_histogram),
        }
    }
}

impl FsMetrics {
    /// Starts timing one `op`; the time is recorded when the timer is
    /// dropped (or [`OpTimer::done`]).
    pub fn time(&self, op: &'static str) -> OpTimer {
        OpTimer {
            histogram: self.ops.get_or_create(&OpLabel { op }).clone(),
            started: Instant::now(),
        }
    }

    /// Registers the instruments in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "btfs_fuse_op",
            "FUSE operation latency, from the request to its answer, by operation",
            Unit::Seconds,
            self.ops.clone(),
        );
    }
}

/// One FUSE operation being timed (see [`FsMetrics::time`]).
#[derive(Debug)]
pub struct OpTimer {
    histogram: Histogram,
    started: Instant,
}

impl OpTimer {
    /// Records the time now (the same as dropping it).
    pub fn done(self) {}
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// What the BitTorrent engine counts for metrics alone.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// Reads of content held elsewhere: from the read to its bytes (the
    /// first byte a reader of such a file waits for).
    pub first_byte: Histogram,
    /// Whole-file fetches (open for writing, prefetch, pins): from the
    /// fetch to the content installed.
    pub whole_file: Histogram,
    /// Reads of content held elsewhere that failed, or that timed out
    /// (`read_timeout=`).
    pub read_errors: Counter,
    pub read_timeouts: Counter,
    /// Content evicted from the cache (`cache_size=`), and its bytes.
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    /// Bytes of fetched content the cache held at its last pass (measured
    /// with `cache_size=` only).
    pub cache_bytes: Gauge,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            first_byte: histogram(FETCH_BUCKETS),
            whole_file: histogram(FETCH_BUCKETS),
            read_errors: Counter::default(),
            read_timeouts: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
        }
    }
}

impl EngineMetrics {
    /// Registers the instruments in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "btfs_fetch_first_byte",
            "Reads of content held elsewhere: from the read to its bytes",
            Unit::Seconds,
            self.first_byte.clone(),
        );
        registry.register_with_unit(
            "btfs_fetch_whole_file",
            "Whole-file fetches: from the fetch to the content installed",
            Unit::Seconds,
            self.whole_file.clone(),
        );
        registry.register(
            "btfs_read_errors",
            "Reads of content held elsewhere that failed",
            self.read_errors.clone(),
        );
        registry.register(
            "btfs_read_timeouts",
            "Reads of content held elsewhere that timed out (read_timeout=)",
            self.read_timeouts.clone(),
        );
        registry.register(
            "btfs_cache_evictions",
            "Contents evicted from the cache (cache_size=)",
            self.evictions.clone(),
        );
        registry.register_with_unit(
            "btfs_cache_evicted",
            "Bytes evicted from the cache (cache_size=)",
            Unit::Bytes,
            self.evicted_bytes.clone(),
        );
        registry.register_with_unit(
            "btfs_cache",
            "Bytes of fetched content held at the cache's last pass (cache_size= only)",
            Unit::Bytes,
            self.cache_bytes.clone(),
        );
    }
}

/// A node's registry: everything `GET /metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    pub registry: Registry,
    /// Registries that other layers fill as they go (libp2p's own, built
    /// with the mesh): shown after `registry`.
    pub extra: Vec<Arc<Registry>>,
}

impl Metrics {
    /// The registries as one OpenMetrics text (one `# EOF`, at the end).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)?;
        for r in &self.extra {
            prometheus_client::encoding::text::encode_registry(&mut out, r)?;
        }
        prometheus_client::encoding::text::encode_eof(&mut out)?;
        Ok(out)
    }

    /// Frozen for serving.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// Helpers for collectors that read existing counters at scrape time.
pub mod collect {
    use prometheus_client::{
        encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
        metrics::{counter::ConstCounter, gauge::ConstGauge},
        registry::Unit,
    };

    /// Encodes one counter (`name` gets `_total`).
    pub fn counter(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: u64,
    ) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(value);
        c.encode(enc.encode_descriptor(name, help, unit, c.metric_type())?)
    }

    /// Encodes one gauge.
    pub fn gauge(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: i64,
    ) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(value);
        g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
    }

    /// Encodes a counter family: one value per label set.
    pub fn counters<L: EncodeLabelSet>(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        values: &[(L, u64)],
    ) -> Result<(), std::fmt::Error> {
        let mut family = enc.encode_descriptor(
            name,
            help,
            unit,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (labels, v) in values {
            ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruments_show_in_the_text_with_their_names() {
        let fs = FsMetrics::default();
        let engine = EngineMetrics::default();
        let mut m = Metrics::default();
        fs.register(&mut m.registry);
        engine.register(&mut m.registry);
        fs.time("lookup").done();
        drop(fs.time("read"));
        engine.first_byte.observe(0.02);
        engine.read_timeouts.inc();
        let text = m.encode().unwrap();
        assert!(
            text.contains("btfs_fuse_op_seconds_count{op=\"lookup\"} 1"),
            "{text}"
        );
        assert!(text.contains("btfs_fuse_op_seconds_count{op=\"read\"} 1"));
        assert!(text.contains("btfs_fetch_first_byte_seconds_count 1"));
        assert!(text.contains("btfs_read_timeouts_total 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
