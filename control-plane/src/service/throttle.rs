//! Per-account token buckets for calls that cost the control plane real
//! work (RSA key generation): a burst, then a steady rate. In memory, per
//! control-plane process: with several replicas an account gets each
//! replica's allowance, which still bounds the work per process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Throttle {
    burst: f64,
    per_second: f64,
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

impl Throttle {
    /// `burst` calls at once, then one every `every`.
    pub fn new(burst: u32, every: Duration) -> Throttle {
        Throttle { burst: f64::from(burst), per_second: 1.0 / every.as_secs_f64(), buckets: Arc::default() }
    }

    /// Takes a token for `key`; `Err(wait)` when none is left, with the time until one is.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Full buckets carry no information: forget them so the map stays small.
        let (burst, rate) = (self.burst, self.per_second);
        buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst);
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_steady_rate_per_key() {
        let t = Throttle::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.take_at("a", t0), Ok(()));
        }
        let wait = t.take_at("a", t0).unwrap_err();
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(10), "{wait:?}");
        assert_eq!(t.take_at("b", t0), Ok(()), "another key has its own bucket");
        assert!(t.take_at("a", t0 + Duration::from_secs(5)).is_err());
        assert_eq!(t.take_at("a", t0 + Duration::from_secs(11)), Ok(()), "one token back after 10 s");
        assert!(t.take_at("a", t0 + Duration::from_secs(11)).is_err());
    }
}
