//! `${NAME}` in string values: replaced by the environment variable `NAME` before the
//! file is parsed (a Redis password from a Secret, say), anywhere inside a string, never
//! in comments or keys. `$${` writes a literal `${`. An unset variable is an error that
//! names it and its place; a value is escaped for the string it lands in, so it can
//! never end the string or add a key.

use std::ops::Range;

/// Text with its references replaced, and how to map an offset in it back to the file.
pub struct Expanded {
    pub text: String,
    /// Each replacement: its range in `text`, and the range of the reference in the file.
    anchors: Vec<(Range<usize>, Range<usize>)>,
}

impl Expanded {
    /// The file offset of an offset in the expanded text (inside a replaced value: the
    /// start of its reference).
    pub fn original(&self, offset: usize) -> usize {
        let mut delta: isize = 0;
        for (new, file) in &self.anchors {
            if offset < new.start {
                break;
            }
            if offset < new.end {
                return file.start;
            }
            delta = file.end as isize - new.end as isize;
        }
        usize::try_from(offset as isize + delta).unwrap_or(0)
    }
}

/// Why a reference could not be expanded: where it is and what is wrong.
pub struct EnvError {
    pub span: Range<usize>,
    pub message: String,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Code,
    Comment,
    Basic,
    Literal,
    MultiBasic,
    MultiLiteral,
}

/// Expands `${NAME}` with `lookup` inside the strings of TOML `text`.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Expanded, EnvError> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut anchors = Vec::new();
    let mut state = State::Code;
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        match state {
            State::Code => {
                if rest.starts_with("\"\"\"") {
                    state = State::MultiBasic;
                    i += 3;
                    continue;
                }
                if rest.starts_with("'''") {
                    state = State::MultiLiteral;
                    i += 3;
                    continue;
                }
                match bytes[i] {
                    b'#' => state = State::Comment,
                    b'"' => state = State::Basic,
                    b'\'' => state = State::Literal,
                    _ => {}
                }
            }
            State::Comment => {
                if bytes[i] == b'\n' {
                    state = State::Code;
                }
            }
            State::Basic | State::MultiBasic if bytes[i] == b'\\' => {
                i += 2;
                continue;
            }
            State::Basic if bytes[i] == b'"' => state = State::Code,
            State::Literal if bytes[i] == b'\'' => state = State::Code,
            State::MultiBasic if rest.starts_with("\"\"\"") => {
                state = State::Code;
                i += 3;
                continue;
            }
            State::MultiLiteral if rest.starts_with("'''") => {
                state = State::Code;
                i += 3;
                continue;
            }
            State::Basic | State::Literal | State::MultiBasic | State::MultiLiteral => {
                if rest.starts_with("$${") {
                    out.push_str(&text[copied..i]);
                    let start = out.len();
                    out.push_str("${");
                    anchors.push((start..out.len(), i..i + 3));
                    i += 3;
                    copied = i;
                    continue;
                }
                if rest.starts_with("${") {
                    let Some(close) = rest.find('}') else {
                        return Err(EnvError { span: i..i + 2, message: "`${` without a closing `}` (write `$${` for a literal `${`)".into() });
                    };
                    let name = &rest[2..close];
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.as_bytes()[0].is_ascii_digit() {
                        return Err(EnvError { span: i..i + close + 1, message: format!("`${{{name}}}` is not an environment variable name") });
                    }
                    let Some(value) = lookup(name) else {
                        return Err(EnvError { span: i..i + close + 1, message: format!("environment variable {name} is not set (used as ${{{name}}})") });
                    };
                    let value = match state {
                        State::Basic | State::MultiBasic => escape_basic(&value),
                        _ if value.contains('\'') || value.contains('\n') => {
                            return Err(EnvError {
                                span: i..i + close + 1,
                                message: format!("environment variable {name} holds a quote or a newline, which a '...' string cannot: use \"...\""),
                            });
                        }
                        _ => value,
                    };
                    out.push_str(&text[copied..i]);
                    let start = out.len();
                    out.push_str(&value);
                    anchors.push((start..out.len(), i..i + close + 1));
                    i += close + 1;
                    copied = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied.min(text.len())..]);
    Ok(Expanded { text: out, anchors })
}

/// `value` written inside a TOML basic string.
fn escape_basic(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "REDIS_PASSWORD" => Some("p\"ss\\w".into()),
            "HOST" => Some("redis-pdp".into()),
            "QUOTED" => Some("it's".into()),
            _ => None,
        }
    }

    #[test]
    fn references_in_strings_are_replaced_and_escaped_for_them() {
        let text = "url = \"redis://:${REDIS_PASSWORD}@${HOST}:6379\" # ${UNSET} in a comment\nplain = 'x-${HOST}'\nlit = \"$${HOST}\"\n";
        let out = expand(text, env).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(out.text, "url = \"redis://:p\\\"ss\\\\w@redis-pdp:6379\" # ${UNSET} in a comment\nplain = 'x-redis-pdp'\nlit = \"${HOST}\"\n");
        let parsed: toml::Table = out.text.parse().expect("still TOML");
        assert_eq!(parsed["url"].as_str(), Some("redis://:p\"ss\\w@redis-pdp:6379"), "a quote in the value cannot end the string");
        // Offsets after a replacement map back to the file.
        let at = out.text.find("plain").expect("plain");
        assert_eq!(out.original(at), text.find("plain").expect("plain"));
        assert_eq!(out.original(out.text.find("redis-pdp").expect("value")), text.find("${HOST}").expect("reference"));
    }

    #[test]
    fn an_unset_or_malformed_reference_is_an_error_at_its_place() {
        let text = "a = 1\nurl = \"${NOPE}\"\n";
        let Err(err) = expand(text, env) else { panic!("unset") };
        assert!(err.message.contains("NOPE is not set"), "{}", err.message);
        assert_eq!(&text[err.span.clone()], "${NOPE}");
        assert!(expand("x = \"${bad-name}\"", env).is_err());
        assert!(expand("x = \"${OPEN\"", env).is_err());
        assert!(expand("x = '${QUOTED}'", env).is_err(), "a quote cannot go into a literal string");
    }
}
