//! The org's event delivery allocation: every event a Subscribe stream delivers (change events
//! and platform events alike, every subscriber, every channel) counts org-wide over a rolling
//! 24 hours by the emulator's clock, as Salesforce counts `DailyDeliveredPlatformEvents`; a
//! 30-day window backs `MonthlyPlatformEventsUsageEntitlement`. With an allocation set, a
//! delivery takes its events from what is left, so no stream delivers past it.
//!
//! It owns the counting; refusing a Subscribe call or ending a stream is the Pub/Sub side's.

use super::Org;
use std::collections::VecDeque;

/// The daily delivery allocation Salesforce gives Performance and Unlimited Editions
/// (shared by change events and high-volume platform events), reported when no allocation
/// is enforced.
pub const DEFAULT_DAILY_DELIVERIES: u64 = 50_000;

/// The monthly entitlement of the platform events add-on, as `/limits` reports it.
pub const MONTHLY_ENTITLEMENT: u64 = 4_500_000;

const MINUTE_MS: i64 = 60_000;
pub(super) const DAY_MS: i64 = 86_400_000;
const MONTH_MS: i64 = 30 * DAY_MS;

/// Deliveries per minute of the emulator's clock, the last 30 days of them.
#[derive(Default)]
pub(super) struct Deliveries {
    buckets: VecDeque<(i64, u64)>,
    /// Enforced daily allocation; None: counted, never refused.
    allocation: Option<u64>,
}

impl Deliveries {
    fn forget_before(&mut self, now_ms: i64) {
        let cutoff = (now_ms - MONTH_MS).div_euclid(MINUTE_MS);
        while self.buckets.front().is_some_and(|(m, _)| *m <= cutoff) {
            self.buckets.pop_front();
        }
    }

    /// Events delivered in the `window_ms` before `now_ms`.
    fn used(&self, now_ms: i64, window_ms: i64) -> u64 {
        let cutoff = (now_ms - window_ms).div_euclid(MINUTE_MS);
        self.buckets
            .iter()
            .filter(|(m, _)| *m > cutoff)
            .map(|(_, n)| n)
            .sum()
    }

    fn add(&mut self, now_ms: i64, n: u64) {
        let minute = now_ms.div_euclid(MINUTE_MS);
        match self.buckets.back_mut() {
            Some((m, count)) if *m >= minute => *count += n,
            _ => self.buckets.push_back((minute, n)),
        }
    }
}

/// What `/limits` reports of deliveries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryUsage {
    pub daily_max: u64,
    pub daily_used: u64,
    pub monthly_max: u64,
    pub monthly_used: u64,
}

impl Org {
    fn deliveries(&self) -> std::sync::MutexGuard<'_, Deliveries> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or, with None, lifts) the enforced daily delivery allocation.
    pub fn set_delivery_allocation(&self, allocation: Option<u64>) {
        self.deliveries().allocation = allocation;
    }

    pub fn delivery_allocation(&self) -> Option<u64> {
        self.deliveries().allocation
    }

    /// Delivers what `read` returns when asked for at most `want` events, within what is
    /// left of the allocation, and counts it. The count and the read happen under one lock,
    /// so concurrent streams never deliver past the allocation together.
    pub fn deliver<T>(&self, want: u64, read: impl FnOnce(usize) -> Vec<T>) -> Vec<T> {
        let now = self.now_ms();
        let mut d = self.deliveries();
        let room = match d.allocation {
            Some(max) => want.min(max.saturating_sub(d.used(now, DAY_MS))),
            None => want,
        };
        if room == 0 {
            return Vec::new();
        }
        let delivered = read(usize::try_from(room).unwrap_or(usize::MAX));
        if !delivered.is_empty() {
            d.forget_before(now);
            d.add(now, delivered.len() as u64);
        }
        delivered
    }

    /// Whether the enforced allocation is spent for the rolling day.
    pub fn deliveries_exhausted(&self) -> bool {
        let now = self.now_ms();
        let d = self.deliveries();
        d.allocation.is_some_and(|max| d.used(now, DAY_MS) >= max)
    }

    pub fn delivery_usage(&self) -> DeliveryUsage {
        let now = self.now_ms();
        let d = self.deliveries();
        DeliveryUsage {
            daily_max: d.allocation.unwrap_or(DEFAULT_DAILY_DELIVERIES),
            daily_used: d.used(now, DAY_MS),
            monthly_max: MONTHLY_ENTITLEMENT,
            monthly_used: d.used(now, MONTH_MS),
        }
    }

    /// Forgets every delivery (control API reset); the allocation stays.
    pub(super) fn reset_deliveries(&self) {
        self.deliveries().buckets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org() -> Org {
        Org::new(crate::emulator::load_org(None).expect("built-in org")).expect("org")
    }

    #[test]
    fn deliveries_count_over_a_rolling_day_and_stop_at_the_allocation() {
        let org = org();
        // `read` hands back `n` events when asked for `asked`, as the bus does.
        let deliver = |want: u64, n: usize| org.deliver(want, |asked| vec![(); n.min(asked)]).len();
        assert_eq!(deliver(30, 30), 30, "no allocation: everything goes");
        org.set_delivery_allocation(Some(100));
        assert_eq!(deliver(60, 60), 60);
        assert_eq!(deliver(60, 60), 10, "only what is left of 100");
        assert!(org.deliveries_exhausted());
        assert_eq!(deliver(1, 1), 0);
        org.set_delivery_allocation(Some(106));
        assert_eq!(deliver(100, 2), 2, "what the bus had, not what was asked");
        assert!(!org.deliveries_exhausted());
        org.set_delivery_allocation(Some(100));
        let u = org.delivery_usage();
        assert_eq!((u.daily_max, u.daily_used), (100, 102));
        // Half a day later the count is the same; a day later the window has rolled.
        org.advance_clock(DAY_MS / 2);
        assert_eq!(org.delivery_usage().daily_used, 102);
        org.advance_clock(DAY_MS / 2 + MINUTE_MS);
        let u = org.delivery_usage();
        assert_eq!(u.daily_used, 0);
        assert_eq!(u.monthly_used, 102, "the month still holds them");
        assert_eq!(deliver(100, 100), 100);
        org.set_delivery_allocation(None);
        assert_eq!(org.delivery_usage().daily_max, DEFAULT_DAILY_DELIVERIES);
        assert!(!org.deliveries_exhausted());
    }
}
