//! What a run costs and what it saves, in dollars: a price table and pure arithmetic over a
//! run's request counts and bytes (issue 14, part 2). `gc` uses it for the bytes it deletes;
//! `du` can use it for the bytes it finds reclaimable.
//!
//! Request classes follow the providers' price lists: class A is PUT, COPY, POST and LIST;
//! class B is GET and HEAD; DELETE is free on both R2 and S3 (ocigc's batch deletes count as
//! deletes). A GB is 10^9 bytes; a month of storage is what the provider bills as a
//! GB-month. Free tiers are not modelled: the figures are the marginal price.

use std::fmt;

use serde::Serialize;

use crate::store::RequestCounts;

/// Bytes in a GB, as prices are quoted.
pub const BYTES_PER_GB: f64 = 1e9;

/// A named price list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pricing {
    /// Cloudflare R2, standard storage.
    R2,
    /// AWS S3 Standard (us-east-1).
    S3Standard,
    /// No prices: no cost is reported unless explicit prices are given.
    None,
}

impl Pricing {
    /// Every name, as the flag takes them.
    pub const NAMES: [&'static str; 3] = ["r2", "s3-standard", "none"];

    /// Parses a name of [`Pricing::NAMES`].
    pub fn parse(s: &str) -> Result<Pricing, String> {
        match s {
            "r2" => Ok(Pricing::R2),
            "s3-standard" => Ok(Pricing::S3Standard),
            "none" => Ok(Pricing::None),
            _ => Err(format!(
                "unknown pricing {s:?} (one of: {})",
                Pricing::NAMES.join(", ")
            )),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Pricing::R2 => "r2",
            Pricing::S3Standard => "s3-standard",
            Pricing::None => "none",
        }
    }

    /// Its prices; `None` for [`Pricing::None`].
    pub fn prices(self) -> Option<Prices> {
        match self {
            Pricing::R2 => Some(Prices {
                name: "r2".into(),
                gb_month: 0.015,
                class_a_per_million: 4.50,
                class_b_per_million: 0.36,
            }),
            Pricing::S3Standard => Some(Prices {
                name: "s3-standard".into(),
                gb_month: 0.023,
                class_a_per_million: 5.00,
                class_b_per_million: 0.40,
            }),
            Pricing::None => None,
        }
    }
}

impl fmt::Display for Pricing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Prices in dollars.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prices {
    /// Where they come from: a list's name, or `custom` for explicit prices.
    pub name: String,
    /// Storage, per GB-month.
    pub gb_month: f64,
    /// Class A requests (PUT, COPY, POST, LIST), per million.
    pub class_a_per_million: f64,
    /// Class B requests (GET, HEAD), per million.
    pub class_b_per_million: f64,
}

impl Prices {
    /// The prices of `pricing` with any of the explicit prices in place of its own
    /// (`Pricing::None` with explicit prices: the ones not given are 0). `None`: no prices at
    /// all.
    pub fn resolve(
        pricing: Pricing,
        gb_month: Option<f64>,
        class_a_per_million: Option<f64>,
        class_b_per_million: Option<f64>,
    ) -> Option<Prices> {
        let explicit =
            gb_month.is_some() || class_a_per_million.is_some() || class_b_per_million.is_some();
        let mut p = match (pricing.prices(), explicit) {
            (Some(p), _) => p,
            (None, false) => return None,
            (None, true) => Prices {
                name: String::new(),
                gb_month: 0.0,
                class_a_per_million: 0.0,
                class_b_per_million: 0.0,
            },
        };
        if explicit {
            p.name = if pricing == Pricing::None {
                "custom".into()
            } else {
                format!("{} (adjusted)", pricing.name())
            };
        }
        p.gb_month = gb_month.unwrap_or(p.gb_month);
        p.class_a_per_million = class_a_per_million.unwrap_or(p.class_a_per_million);
        p.class_b_per_million = class_b_per_million.unwrap_or(p.class_b_per_million);
        Some(p)
    }

    /// Dollars a month that storing `bytes` costs.
    pub fn storage_per_month(&self, bytes: u64) -> f64 {
        bytes as f64 / BYTES_PER_GB * self.gb_month
    }

    /// Dollars that `requests` cost.
    pub fn requests(&self, requests: &RequestCounts) -> f64 {
        let (a, b) = classes(requests);
        a as f64 / 1e6 * self.class_a_per_million + b as f64 / 1e6 * self.class_b_per_million
    }
}

/// Class A and class B request counts; deletes are free and in neither.
pub fn classes(r: &RequestCounts) -> (u64, u64) {
    (r.list + r.put, r.get + r.head)
}

/// The `cost` object of a report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// The prices used.
    pub prices: Prices,
    /// Bytes the run deleted (a dry run: would delete).
    pub reclaimed_bytes: u64,
    /// What storing them cost a month: what the deletions save from now on.
    pub reclaimed_dollars_per_month: f64,
    /// Bytes found deletable but not deleted (`du`), if counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaimable_bytes: Option<u64>,
    /// What storing those costs a month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaimable_dollars_per_month: Option<f64>,
    /// Class A requests the run made (PUT, LIST).
    pub class_a_requests: u64,
    /// Class B requests the run made (GET, HEAD).
    pub class_b_requests: u64,
    /// Delete requests the run made (free).
    pub free_requests: u64,
    /// What the run's requests cost.
    pub request_dollars: f64,
}

impl Cost {
    /// The cost of a run that made `requests` and deleted `reclaimed` bytes (and, for `du`,
    /// found `reclaimable` more).
    pub fn of(
        prices: &Prices,
        requests: &RequestCounts,
        reclaimed: u64,
        reclaimable: Option<u64>,
    ) -> Cost {
        let (a, b) = classes(requests);
        Cost {
            prices: prices.clone(),
            reclaimed_bytes: reclaimed,
            reclaimed_dollars_per_month: prices.storage_per_month(reclaimed),
            reclaimable_bytes: reclaimable,
            reclaimable_dollars_per_month: reclaimable.map(|b| prices.storage_per_month(b)),
            class_a_requests: a,
            class_b_requests: b,
            free_requests: requests.delete,
            request_dollars: prices.requests(requests),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn counts(list: u64, get: u64, head: u64, put: u64, delete: u64) -> RequestCounts {
        RequestCounts {
            list,
            get,
            head,
            put,
            delete,
            throttled: 0,
        }
    }

    #[test]
    fn r2_prices_a_run() {
        let p = Pricing::R2.prices().expect("r2 has prices");
        // 1,000,000 LIST pages and PUTs (class A), 2,000,000 GET/HEAD (class B), deletes free.
        let c = Cost::of(
            &p,
            &counts(600_000, 1_500_000, 500_000, 400_000, 123_456),
            200_000_000_000,
            None,
        );
        assert_eq!(
            (c.class_a_requests, c.class_b_requests),
            (1_000_000, 2_000_000)
        );
        assert_eq!(c.free_requests, 123_456);
        assert!(close(c.request_dollars, 4.50 + 2.0 * 0.36), "{c:?}");
        // 200 GB at 0.015 $/GB-month.
        assert!(close(c.reclaimed_dollars_per_month, 3.0), "{c:?}");
        assert_eq!(c.reclaimable_dollars_per_month, None);
    }

    #[test]
    fn s3_standard_prices_a_run() {
        let p = Pricing::S3Standard.prices().expect("s3 has prices");
        let c = Cost::of(
            &p,
            &counts(1000, 0, 10_000, 0, 5),
            1_000_000_000,
            Some(3 * 1_000_000_000),
        );
        assert!(close(
            c.request_dollars,
            1000.0 / 1e6 * 5.0 + 10_000.0 / 1e6 * 0.40
        ));
        assert!(close(c.reclaimed_dollars_per_month, 0.023));
        assert!(close(
            c.reclaimable_dollars_per_month.expect("du counts it"),
            0.069
        ));
    }

    #[test]
    fn explicit_prices_override_or_stand_alone() {
        assert_eq!(Prices::resolve(Pricing::None, None, None, None), None);
        let custom = Prices::resolve(Pricing::None, Some(0.02), None, Some(1.0)).expect("prices");
        assert_eq!(custom.name, "custom");
        assert_eq!(
            (
                custom.gb_month,
                custom.class_a_per_million,
                custom.class_b_per_million
            ),
            (0.02, 0.0, 1.0)
        );
        let r2 = Prices::resolve(Pricing::R2, None, Some(9.0), None).expect("prices");
        assert_eq!(
            (r2.gb_month, r2.class_a_per_million, r2.class_b_per_million),
            (0.015, 9.0, 0.36)
        );
        assert_eq!(r2.name, "r2 (adjusted)");
        assert_eq!(
            Prices::resolve(Pricing::R2, None, None, None),
            Pricing::R2.prices()
        );
    }

    #[test]
    fn names_round_trip() {
        for n in Pricing::NAMES {
            assert_eq!(Pricing::parse(n).map(Pricing::name), Ok(n));
        }
        assert!(Pricing::parse("gcs").is_err());
    }
}
