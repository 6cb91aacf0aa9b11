//! Scrape-time gauges of the workers: computed from the registry, the
//! breakers and the last GPU report each time Prometheus scrapes, never
//! incremented per scrape.

use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Workers;

/// Scrape-time gauges from the registry and the breakers.
pub(super) struct Collector(pub(super) Workers);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkersCollector")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0.inner;
        let stats = inner.registry.stats();
        {
            let mut family = encoder.encode_descriptor(
                "rbee_hive_workers_total",
                "Workers by registry state",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [
                ("loading", stats.loading),
                ("idle", stats.idle),
                ("busy", stats.busy),
                ("draining", stats.draining),
                ("failed", stats.failed),
            ] {
                let labels = vec![("state".to_owned(), state.to_owned())];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        ConstGauge::new(stats.failed_health_checks as i64).encode(encoder.encode_descriptor(
            "rbee_hive_workers_failed_health_checks",
            "Consecutive failed health checks, summed over live workers",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(stats.restart_count as i64).encode(encoder.encode_descriptor(
            "rbee_hive_workers_restart_count",
            "Restart counts, summed over live workers",
            None,
            MetricType::Gauge,
        )?)?;
        {
            let breakers = inner.breakers.open_at(Instant::now());
            let mut family = encoder.encode_descriptor(
                "rbee_hive_circuit_breaker_open",
                "1 while the breaker of a (model, device) pair is open",
                None,
                MetricType::Gauge,
            )?;
            for ((model, device), open) in breakers {
                let open = i64::from(open);
                let labels = vec![
                    ("model".to_owned(), model.clone()),
                    ("device".to_owned(), device.to_string()),
                ];
                ConstGauge::new(open).encode(family.encode_family(&labels)?)?;
            }
        }
        let gpus = inner.gpus.lock().clone();
        {
            let mut family = encoder.encode_descriptor(
                "rbee_hive_vram_used_bytes",
                "GPU memory used, by device",
                None,
                MetricType::Gauge,
            )?;
            for g in &gpus {
                let labels = vec![("device".to_owned(), g.index.to_string())];
                let used = g.vram_total_bytes.saturating_sub(g.vram_free_bytes);
                ConstGauge::new(used as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "rbee_hive_vram_total_bytes",
            "GPU memory, by device",
            None,
            MetricType::Gauge,
        )?;
        for g in &gpus {
            let labels = vec![("device".to_owned(), g.index.to_string())];
            ConstGauge::new(g.vram_total_bytes as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
