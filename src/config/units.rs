//! Durations (`"50ms"`, `"5s"`, `"10m"`) and sizes (`"256MiB"`) as written in the config file.
//!
//! Both are deserialized straight from their TOML strings so that a bad value is reported
//! by the TOML deserializer with the value's own line and column.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// A duration read from a string such as `"50ms"`, `"5s"`, `"10m"`, `"1h"`, `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

/// A byte size read from a string such as `"512"`, `"64KiB"`, `"256MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Parses a duration: a non-negative integer followed by one of `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let expected = "expected a duration such as \"50ms\", \"5s\", \"10m\", \"1h\"";
    let amount: u64 = digits.parse().map_err(|_| format!("invalid duration {text:?}: {expected}"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("duration {text:?} has no unit: {expected}")),
        _ => return Err(format!("unknown duration unit {unit:?} in {text:?}: {expected}")),
    };
    amount.checked_mul(millis_per_unit).map(Duration::from_millis).ok_or_else(|| format!("duration {text:?} is too large"))
}

/// A rate read from a string such as `"20/s"`, `"600/m"` or `"1000/h"`: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// Requests per second.
    pub fn per_second(self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

/// Parses a rate: a positive integer, `/`, and `s`, `m` or `h` (or a duration: `"5/10s"`).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let expected = "expected a rate such as \"20/s\", \"600/m\" or \"1000/h\"";
    let (count, per) = text.trim().split_once('/').ok_or_else(|| format!("invalid rate {text:?}: {expected}"))?;
    let count: u64 = count.trim().parse().map_err(|_| format!("invalid rate {text:?}: {expected}"))?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|_| format!("invalid rate {text:?}: {expected}"))?,
    };
    if count == 0 || per.is_zero() {
        return Err(format!("rate {text:?} must be more than zero per a non-zero time"));
    }
    if count > 10_000_000 || (Rate { count, per }).per_second() > 1_000_000.0 {
        return Err(format!("rate {text:?} is too large (at most 1,000,000/s)"));
    }
    Ok(Rate { count, per })
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(UnitVisitor("a rate string such as \"20/s\"", parse_rate))
    }
}

/// Parses a size: a non-negative integer, optionally followed by `B`, `KiB`, `MiB`, `GiB`,
/// `KB`, `MB` or `GB` (binary units are powers of 1024, decimal ones powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let expected = "expected a size such as \"8MiB\", \"256MiB\", \"1GiB\"";
    let amount: u64 = digits.parse().map_err(|_| format!("invalid size {text:?}: {expected}"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {text:?}: {expected}")),
    };
    amount.checked_mul(multiplier).ok_or_else(|| format!("size {text:?} is too large"))
}

struct UnitVisitor<F>(&'static str, F);

impl<'de, T, F: Fn(&str) -> Result<T, String>> de::Visitor<'de> for UnitVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.1)(value).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(UnitVisitor("a duration string such as \"5s\"", parse_duration)).map(ConfigDuration)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor).map(ByteSize)
    }
}

struct SizeVisitor;

impl<'de> de::Visitor<'de> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"256MiB\" or a number of bytes")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        parse_size(value).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom("a size cannot be negative"))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20/s"), Ok(Rate { count: 20, per: Duration::from_secs(1) }));
        assert_eq!(parse_rate("600/m").map(Rate::per_second), Ok(10.0));
        assert_eq!(parse_rate("5/10s").map(Rate::per_second), Ok(0.5));
        for bad in ["20", "0/s", "20/x", "/s", "-1/s", "20/0s", "99999999999/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("8KB"), Ok(8000));
        assert_eq!(parse_size("12"), Ok(12));
        assert!(parse_size("12 furlongs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
