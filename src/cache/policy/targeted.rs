//! Targeted cache-control fields (RFC 9213): `CDN-Cache-Control` and the like, which
//! are Structured Field dictionaries (RFC 8941 section 3.2), and the legacy
//! `Surrogate-Control`, which reads like `Cache-Control`.
//!
//! A field that does not parse is ignored whole (RFC 9213 section 2.1), so the next
//! field on the route's list, or `Cache-Control`, decides.

use http::{HeaderMap, HeaderName, HeaderValue};

/// A dictionary member's value, as far as cache directives care.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Integer(i64),
    Boolean(bool),
    String(String),
    /// A token, decimal, byte sequence or inner list: no cache directive takes one.
    Other,
}

/// The first of `names` present in `headers` with a valid, non-empty value, turned into
/// the equivalent `Cache-Control` text (members whose values no directive takes are
/// dropped, as RFC 9213 says to ignore them).
pub fn select(headers: &HeaderMap, names: &[HeaderName]) -> Option<HeaderValue> {
    names.iter().find_map(|name| {
        let lines: Vec<&str> = headers.get_all(name).iter().map(|v| v.to_str()).collect::<Result<_, _>>().ok()?;
        let text = lines.join(", ");
        let cache_control = if name.as_str() == "surrogate-control" { surrogate(&text)? } else { as_cache_control(&parse_dictionary(&text)?) };
        HeaderValue::from_str(&cache_control).ok()
    })
}

/// `Surrogate-Control` (Edge Architecture 1.0): `Cache-Control` syntax; members aimed at
/// another device (`max-age=30;other-device`) are left out.
fn surrogate(text: &str) -> Option<String> {
    let kept: Vec<&str> = text.split(',').map(str::trim).filter(|m| !m.is_empty() && !m.contains(';')).collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

fn as_cache_control(members: &[(String, Value)]) -> String {
    let mut out = String::new();
    for (key, value) in members {
        let item = match value {
            Value::Integer(n) if *n >= 0 => format!("{key}={n}"),
            Value::Boolean(true) => key.clone(),
            Value::String(s) => format!("{key}=\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            _ => continue,
        };
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&item);
    }
    out
}

/// Parses an RFC 8941 dictionary; `None` when it is not one, or is empty. Later
/// duplicates replace earlier ones (section 3.2).
fn parse_dictionary(text: &str) -> Option<Vec<(String, Value)>> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    p.skip_sp();
    let mut members: Vec<(String, Value)> = Vec::new();
    while !p.done() {
        let key = p.key()?;
        let value = if p.eat(b'=') { if p.peek() == Some(b'(') { p.inner_list()? } else { p.bare_item()? } } else { Value::Boolean(true) };
        p.parameters()?;
        members.retain(|(k, _)| *k != key);
        members.push((key, value));
        p.skip_ows();
        if p.done() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        if p.done() {
            return None; // a trailing comma
        }
    }
    (!members.is_empty()).then_some(members)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &str {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i]).unwrap_or("")
    }

    fn key(&mut self) -> Option<String> {
        if !matches!(self.peek(), Some(b'a'..=b'z' | b'*')) {
            return None;
        }
        Some(self.take_while(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')).to_owned())
    }

    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip_sp();
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn inner_list(&mut self) -> Option<Value> {
        self.eat(b'(');
        loop {
            self.skip_sp();
            if self.eat(b')') {
                self.parameters()?;
                return Some(Value::Other);
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    fn bare_item(&mut self) -> Option<Value> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string(),
            b'?' => {
                self.i += 1;
                match self.peek()? {
                    b'0' => {
                        self.i += 1;
                        Some(Value::Boolean(false))
                    }
                    b'1' => {
                        self.i += 1;
                        Some(Value::Boolean(true))
                    }
                    _ => None,
                }
            }
            b':' => {
                self.i += 1;
                self.take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
                self.eat(b':').then_some(Value::Other)
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'*' => {
                self.take_while(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
                Some(Value::Other)
            }
            _ => None,
        }
    }

    fn number(&mut self) -> Option<Value> {
        let negative = self.eat(b'-');
        let int = self.take_while(|b| b.is_ascii_digit()).to_owned();
        if int.is_empty() || int.len() > 15 {
            return None;
        }
        if self.eat(b'.') {
            let frac = self.take_while(|b| b.is_ascii_digit());
            return (!frac.is_empty() && frac.len() <= 3 && int.len() <= 12).then_some(Value::Other);
        }
        let n: i64 = int.parse().ok()?;
        Some(Value::Integer(if negative { -n } else { n }))
    }

    fn string(&mut self) -> Option<Value> {
        self.i += 1;
        let mut out = String::new();
        loop {
            match self.peek()? {
                b'\\' => {
                    self.i += 1;
                    match self.peek()? {
                        c @ (b'"' | b'\\') => out.push(char::from(c)),
                        _ => return None,
                    }
                }
                b'"' => {
                    self.i += 1;
                    return Some(Value::String(out));
                }
                c @ 0x20..=0x7e => out.push(char::from(c)),
                _ => return None,
            }
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdn(value: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert("cdn-cache-control", HeaderValue::from_str(value).ok()?);
        select(&headers, &[HeaderName::from_static("cdn-cache-control")]).map(|v| v.to_str().unwrap_or("").to_owned())
    }

    #[test]
    fn dictionaries_become_cache_control() {
        assert_eq!(cdn("max-age=60").as_deref(), Some("max-age=60"));
        assert_eq!(cdn("no-store").as_deref(), Some("no-store"));
        assert_eq!(cdn("max-age=60, stale-if-error=600;x=1").as_deref(), Some("max-age=60, stale-if-error=600"));
        assert_eq!(cdn("no-store=?0, max-age=5").as_deref(), Some("max-age=5"));
        assert_eq!(cdn("private=\"set-cookie\"").as_deref(), Some("private=\"set-cookie\""));
        assert_eq!(cdn("max-age=1, max-age=9").as_deref(), Some("max-age=9"), "later duplicates win");
        assert_eq!(cdn("max-age=a, no-cache").as_deref(), Some("no-cache"), "a member of the wrong type is ignored");
    }

    #[test]
    fn invalid_fields_are_ignored_whole() {
        for bad in ["Max-Age=60", "max-age=60,", "max-age=\"60", "=1", ",", "max-age=60 no-store", "max-age=1.2345"] {
            assert_eq!(cdn(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_first_valid_field_on_the_list_wins() {
        let mut headers = HeaderMap::new();
        headers.insert("bulwark-cache-control", HeaderValue::from_static("max-age=oops,"));
        headers.insert("cdn-cache-control", HeaderValue::from_static("max-age=30"));
        headers.insert("surrogate-control", HeaderValue::from_static("max-age=90, content=\"ESI/1.0\""));
        let names = |list: &[&'static str]| list.iter().map(|n| HeaderName::from_static(n)).collect::<Vec<_>>();
        let pick = |list: &[&'static str]| select(&headers, &names(list)).map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(pick(&["bulwark-cache-control", "cdn-cache-control"]).as_deref(), Some("max-age=30"));
        assert_eq!(pick(&["surrogate-control", "cdn-cache-control"]).as_deref(), Some("max-age=90, content=\"ESI/1.0\""));
        assert_eq!(pick(&["x-absent"]), None);
    }
}
