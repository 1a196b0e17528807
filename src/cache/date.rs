//! HTTP-date (RFC 9110 section 5.6.7) as a recipient must take it: all three formats
//! (IMF-fixdate, the obsolete RFC 850 and asctime), day, month and zone names in any
//! case (RFC 9111 section 4.2), a weekday that does not match the date ignored, and a
//! zone other than GMT making the date invalid. An RFC 850 two-digit year more than 50
//! years ahead is the most recent past year with those digits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const LONG_DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

/// The time `text` names, judged against the present for a two-digit year.
pub fn parse(text: &str) -> Option<SystemTime> {
    parse_at(text, SystemTime::now())
}

/// [`parse`], with `now` the present.
pub fn parse_at(text: &str, now: SystemTime) -> Option<SystemTime> {
    let text = text.trim();
    if let Some((weekday, rest)) = text.split_once(',') {
        is_weekday(weekday.trim()).then_some(())?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        return match fields.as_slice() {
            // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
            [day, month, year, time, zone] if is_gmt(zone) => civil(four_digits(year)?, month_number(month)?, number(day, 2)?, time),
            // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
            [date, time, zone] if is_gmt(zone) => {
                let mut parts = date.split('-');
                let (day, month, year) = (parts.next()?, parts.next()?, parts.next()?);
                if parts.next().is_some() {
                    return None;
                }
                let (month, day) = (month_number(month)?, number(day, 2)?);
                match year.len() {
                    2 => two_digit_year(number(year, 2)?, month, day, time, now),
                    _ => civil(four_digits(year)?, month, day, time),
                }
            }
            _ => None,
        };
    }
    // asctime: Sun Nov  6 08:49:37 1994
    match text.split_whitespace().collect::<Vec<_>>().as_slice() {
        [weekday, month, day, time, year] if is_weekday(weekday) => civil(four_digits(year)?, month_number(month)?, number(day, 2)?, time),
        _ => None,
    }
}

fn is_weekday(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    DAYS.contains(&name.as_str()) || LONG_DAYS.contains(&name.as_str())
}

fn is_gmt(zone: &str) -> bool {
    zone.eq_ignore_ascii_case("GMT")
}

fn month_number(name: &str) -> Option<u32> {
    let name = name.to_ascii_lowercase();
    MONTHS.iter().position(|m| *m == name).map(|i| i as u32 + 1)
}

/// One or two digits (`max_len`), or exactly four for a year.
fn number(text: &str, max_len: usize) -> Option<u32> {
    (!text.is_empty() && text.len() <= max_len && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
}

fn four_digits(text: &str) -> Option<i64> {
    (text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
}

/// RFC 9110 section 5.6.7: a two-digit year names the time with those digits within 50
/// years of now; one more than 50 years in the future is the most recent past year
/// with the same last two digits.
fn two_digit_year(yy: u32, month: u32, day: u32, time: &str, now: SystemTime) -> Option<SystemTime> {
    // 50 years of 365.2425 days.
    const FIFTY_YEARS: Duration = Duration::from_secs(50 * 31_556_952);
    let this_year = year_of(now);
    let mut year = this_year - this_year.rem_euclid(100) + i64::from(yy);
    let at = civil(year, month, day, time)?;
    if now.checked_add(FIFTY_YEARS).is_some_and(|limit| at > limit) {
        year -= 100;
    } else if at.checked_add(FIFTY_YEARS).is_some_and(|end| end <= now) {
        year += 100;
    }
    civil(year, month, day, time)
}

fn year_of(time: SystemTime) -> i64 {
    let days = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => (since.as_secs() / 86_400) as i64,
        Err(before) => -(before.duration().as_secs().div_ceil(86_400) as i64),
    };
    civil_from_days(days).0
}

/// `HH:MM:SS` on a calendar date, as a time; `None` for a date or time that does not exist.
fn civil(year: i64, month: u32, day: u32, time: &str) -> Option<SystemTime> {
    let mut parts = time.split(':');
    let (hour, minute, second) = (number(parts.next()?, 2)?, number(parts.next()?, 2)?, number(parts.next()?, 2)?);
    if parts.next().is_some() || hour > 23 || minute > 59 || second > 60 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    match u64::try_from(seconds) {
        Ok(after) => UNIX_EPOCH.checked_add(Duration::from_secs(after)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(seconds.unsigned_abs())),
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1994-11-06 08:49:37 UTC, the RFC's example.
    fn example() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn in_year(year: i64) -> SystemTime {
        civil(year, 6, 1, "00:00:00").expect("a date")
    }

    #[test]
    fn the_three_formats_name_the_same_time() {
        let now = in_year(2026);
        assert_eq!(parse_at("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(example()));
        assert_eq!(parse_at("Sunday, 06-Nov-94 08:49:37 GMT", in_year(1995)), Some(example()));
        assert_eq!(parse_at("Sun Nov  6 08:49:37 1994", now), Some(example()));
    }

    #[test]
    fn names_are_matched_in_any_case_and_a_wrong_weekday_is_ignored() {
        let now = in_year(2026);
        assert_eq!(parse_at("SUN, 06 NOV 1994 08:49:37 gmt", now), Some(example()));
        assert_eq!(parse_at("Wed, 06 Nov 1994 08:49:37 GMT", now), Some(example()), "the weekday is not checked against the date");
        assert_eq!(parse_at("sun nov  6 08:49:37 1994", now), Some(example()));
    }

    #[test]
    fn a_zone_other_than_gmt_or_a_date_that_does_not_exist_is_invalid() {
        let now = in_year(2026);
        for invalid in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 1994 08:49:37 +0000",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1995 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "0",
            "",
        ] {
            assert_eq!(parse_at(invalid, now), None, "{invalid}");
        }
        assert!(parse_at("Thu, 29 Feb 1996 00:00:00 GMT", now).is_some(), "a leap day");
        assert!(parse_at("Tue, 29 Feb 2000 00:00:00 GMT", now).is_some(), "divisible by 400: a leap year");
        assert_eq!(parse_at("Thu, 29 Feb 1900 00:00:00 GMT", now), None, "divisible by 100 only: not a leap year");
    }

    #[test]
    fn a_two_digit_year_more_than_50_years_ahead_is_in_the_past() {
        let now = in_year(2026);
        let year = |text: &str| parse_at(text, now).map(year_of);
        assert_eq!(year("Sunday, 06-Nov-94 08:49:37 GMT"), Some(1994));
        assert_eq!(year("Sunday, 01-Jan-76 00:00:00 GMT"), Some(2076), "less than 50 years ahead stays ahead");
        assert_eq!(year("Sunday, 06-Nov-76 08:49:37 GMT"), Some(1976), "more than 50 years ahead, by the date, is the past");
        assert_eq!(year("Sunday, 06-Nov-77 08:49:37 GMT"), Some(1977));
        assert_eq!(year("Sunday, 06-Nov-26 08:49:37 GMT"), Some(2026));
        let later = in_year(2060);
        assert_eq!(parse_at("Sunday, 06-Nov-05 08:49:37 GMT", later).map(year_of), Some(2105), "the window moves with the present");
        assert_eq!(parse_at("Sunday, 06-Nov-30 08:49:37 GMT", later).map(year_of), Some(2030));
        assert_eq!(year("Sunday, 06-Nov-1994 08:49:37 GMT"), Some(1994), "a four-digit year is taken as it is");
    }

    #[test]
    fn dates_before_1970_are_in_the_past() {
        let before = parse_at("Thu, 01 Jan 1960 00:00:00 GMT", in_year(2026)).expect("valid");
        assert!(before < UNIX_EPOCH);
        assert_eq!(year_of(before), 1960);
    }

    #[test]
    fn agrees_with_httpdate_on_imf_fixdate() {
        for secs in [0u64, 951_782_400, 1_700_000_000, 4_102_444_800, 253_402_300_799] {
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse(&httpdate::fmt_http_date(time)), Some(time), "{secs}");
        }
    }
}
