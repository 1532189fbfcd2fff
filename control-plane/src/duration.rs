//! Durations in policy documents, in the Gateway API format (GEP-2257): one to four
//! `<number><unit>` pairs with units `h`, `m`, `s`, `ms`, e.g. `250ms`, `10s`, `1h30m`.
//! The same string is accepted locally and by the CRD schema's pattern.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a Gateway API duration string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

/// The CRD schema pattern, from GEP-2257.
const PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

impl Duration {
    /// Parses `250ms`, `10s`, `1h30m`...
    ///
    /// # Errors
    /// A message naming the string and the accepted format.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid duration {s:?}: write 1 to 4 <number><unit> pairs with units h, m, s, ms (e.g. 250ms, 10s, 1h30m)"
            )
        };
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        let mut pairs = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 5 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (std::time::Duration::from_millis(1), 2)
            } else if rest.starts_with('h') {
                (std::time::Duration::from_secs(3600), 1)
            } else if rest.starts_with('m') {
                (std::time::Duration::from_secs(60), 1)
            } else if rest.starts_with('s') {
                (std::time::Duration::from_secs(1), 1)
            } else {
                return Err(bad());
            };
            rest = &rest[len..];
            total += unit * u32::try_from(n).map_err(|_| bad())?;
            pairs += 1;
        }
        if pairs == 0 || pairs > 4 {
            return Err(bad());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": PATTERN })
    }
}

impl From<Duration> for prost_types::Duration {
    fn from(d: Duration) -> Self {
        prost_types::Duration {
            seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.0.subsec_nanos()).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as D;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(Duration::parse("250ms").unwrap().0, D::from_millis(250));
        assert_eq!(Duration::parse("1h30m").unwrap().0, D::from_secs(5400));
        assert_eq!(Duration::parse("1m30s500ms").unwrap().0, D::from_millis(90_500));
        for bad in ["", "10", "1.5s", "10 s", "s", "1d", "123456s", "1h1h1h1h1h", "-1s"] {
            assert!(Duration::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn displays_round_trip() {
        for s in ["250ms", "10s", "1h30m", "1m30s500ms"] {
            assert_eq!(Duration::parse(s).unwrap().to_string(), s);
        }
    }
}
