//! Watches the org's allocations: reads `/limits` every `sync.limits_poll_secs` and sets the
//! usage gauges (`sfmirror_event_delivery_usage_ratio{window}`,
//! `sfmirror_salesforce_api_usage_ratio`).
//!
//! The event delivery allocation is org-wide: every subscriber's change event and
//! high-volume platform event deliveries count against it, over a rolling 24 hours
//! (`DailyDeliveredPlatformEvents`) and, with an add-on licence, a month
//! (`MonthlyPlatformEventsUsageEntitlement`). When it is spent Salesforce refuses Subscribe;
//! the gauge is what lets an operator see that coming. Reading it costs one API call per poll.

use crate::salesforce::rest::{Limits, RestClient};
use crate::telemetry;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `/limits` names and the `window` label each sets.
const DELIVERY_WINDOWS: &[(&str, &str)] = &[
    ("DailyDeliveredPlatformEvents", "daily"),
    ("MonthlyPlatformEventsUsageEntitlement", "monthly"),
];

/// Sets the gauges from one `/limits` answer.
pub fn record(limits: &Limits) {
    for (name, window) in DELIVERY_WINDOWS {
        if let Some(l) = limits.get(name) {
            telemetry::record_delivery_usage(window, l.used(), l.max);
        }
    }
    if let Some(l) = limits.get("DailyApiRequests") {
        telemetry::record_api_usage(l.used(), l.max);
    }
}

/// Reads `/limits` now and then every `every`, until `shutdown`. A failed read is logged and
/// tried again at the next poll: the gauges keep their last value.
pub async fn watch(rest: RestClient, every: Duration, shutdown: CancellationToken) {
    loop {
        match rest.limits().await {
            Ok(limits) => {
                record(&limits);
                if let Some(l) = limits.get("DailyDeliveredPlatformEvents")
                    && l.max > 0
                    && l.used() * 10 >= l.max * 9
                {
                    tracing::warn!(
                        used = l.used(),
                        max = l.max,
                        "the org has used 90% of its daily event delivery allocation; when it \
                         is spent Salesforce refuses to deliver change events"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading /limits failed; trying again later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
