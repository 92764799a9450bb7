//! Which objects a list or watch wants: the namespace from its path, its label selector and its
//! field selector, parsed with the real server's grammar and matched against stored objects.
//!
//! Label selectors: comma-separated `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
//! `k notin (a,b)`; `k!=v` and `notin` also match objects without the label, as on the real
//! server. Not supported (answered 400): the numeric `k>n` and `k<n`.
//!
//! Field selectors: comma-separated `f=v`, `f==v`, `f!=v` on `metadata.name` and
//! `metadata.namespace`, the fields every kind supports. Not supported (answered 400): other
//! fields, and backslash escapes in values.

use serde_json::{Map, Value};

use super::status::ApiError;

/// The objects a request selects; every part must match.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    /// A filter for objects in `namespace` (all namespaces if `None`) that match both selectors;
    /// an absent or empty selector matches everything.
    pub fn new(
        namespace: Option<String>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, ApiError> {
        let labels = parse_labels(label_selector.unwrap_or_default())
            .map_err(|err| ApiError::bad_request(format!("unable to parse requirement: {err}")))?;
        let fields = parse_fields(field_selector.unwrap_or_default())
            .map_err(|err| ApiError::bad_request(format!("invalid field selector: {err}")))?;
        Ok(Self {
            namespace,
            labels,
            fields,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let metadata = object.get("metadata");
        let field = |name| {
            metadata
                .and_then(|m| m.get(name))
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let labels = metadata
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.namespace
            .as_deref()
            .is_none_or(|ns| field("namespace") == ns)
            && self.labels.iter().all(|req| req.matches(labels))
            && self.fields.iter().all(|req| {
                let actual = match req.field {
                    Field::Name => field("name"),
                    Field::Namespace => field("namespace"),
                };
                (actual == req.value) == req.equal
            })
    }
}

#[derive(Debug, PartialEq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

#[derive(Debug, PartialEq)]
enum LabelOp {
    Exists,
    NotExists,
    /// Also `=` and `==`, with one value.
    In(Vec<String>),
    /// Also `!=`, with one value.
    NotIn(Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|labels| labels.get(&self.key))
            .and_then(Value::as_str);
        match &self.op {
            LabelOp::Exists => value.is_some(),
            LabelOp::NotExists => value.is_none(),
            LabelOp::In(values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
            LabelOp::NotIn(values) => value.is_none_or(|v| values.iter().all(|x| x != v)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token<'a> {
    /// A key, a value, or the words `in` and `notin`.
    Word(&'a str),
    Not,
    Equals,
    NotEquals,
    Open,
    Close,
    Comma,
}

/// Characters that end a word, as in the real server's lexer.
const SPECIAL: &[char] = &['!', '=', '(', ')', ',', '<', '>'];

fn lex(selector: &str) -> Result<Vec<Token<'_>>, String> {
    let mut tokens = Vec::new();
    let mut rest = selector;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            c if c.is_whitespace() => {
                rest = &rest[c.len_utf8()..];
                continue;
            }
            '!' if rest.starts_with("!=") => (Token::NotEquals, 2),
            '!' => (Token::Not, 1),
            '=' if rest.starts_with("==") => (Token::Equals, 2),
            '=' => (Token::Equals, 1),
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            '<' | '>' => return Err(format!("operator {c:?} is not supported")),
            _ => {
                let len = rest
                    .find(|c: char| c.is_whitespace() || SPECIAL.contains(&c))
                    .unwrap_or(rest.len());
                (Token::Word(&rest[..len]), len)
            }
        };
        tokens.push(token);
        rest = &rest[len..];
    }
    Ok(tokens)
}

fn parse_labels(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut tokens = lex(selector)?.into_iter().peekable();
    let mut requirements = Vec::new();
    if tokens.peek().is_none() {
        return Ok(requirements);
    }
    loop {
        let requirement = match tokens.next() {
            Some(Token::Not) => match tokens.next() {
                Some(Token::Word(key)) => LabelRequirement {
                    key: label_key(key)?,
                    op: LabelOp::NotExists,
                },
                other => return Err(format!("expected a key after '!', found {other:?}")),
            },
            Some(Token::Word(key)) => {
                let key = label_key(key)?;
                let op = match tokens.peek().copied() {
                    None | Some(Token::Comma) => LabelOp::Exists,
                    Some(op @ (Token::Equals | Token::NotEquals)) => {
                        tokens.next();
                        // An empty value is allowed: `k=` selects the label with value "".
                        let value = match tokens.peek().copied() {
                            Some(Token::Word(value)) => {
                                tokens.next();
                                label_value(value)?
                            }
                            _ => String::new(),
                        };
                        if op == Token::Equals {
                            LabelOp::In(vec![value])
                        } else {
                            LabelOp::NotIn(vec![value])
                        }
                    }
                    Some(Token::Word("in")) => {
                        tokens.next();
                        LabelOp::In(value_set(&mut tokens)?)
                    }
                    Some(Token::Word("notin")) => {
                        tokens.next();
                        LabelOp::NotIn(value_set(&mut tokens)?)
                    }
                    Some(other) => return Err(format!("unexpected {other:?} after key {key:?}")),
                };
                LabelRequirement { key, op }
            }
            other => return Err(format!("expected a key, found {other:?}")),
        };
        requirements.push(requirement);
        match tokens.next() {
            None => return Ok(requirements),
            Some(Token::Comma) => {}
            Some(other) => return Err(format!("expected ',' found {other:?}")),
        }
    }
}

/// `(a,b,...)`: at least one value, as the real server requires.
fn value_set<'a>(tokens: &mut impl Iterator<Item = Token<'a>>) -> Result<Vec<String>, String> {
    if tokens.next() != Some(Token::Open) {
        return Err("expected '(' after 'in' or 'notin'".into());
    }
    let mut values = Vec::new();
    loop {
        match tokens.next() {
            Some(Token::Word(value)) => values.push(label_value(value)?),
            other => return Err(format!("expected a value in a set, found {other:?}")),
        }
        match tokens.next() {
            Some(Token::Comma) => {}
            Some(Token::Close) => return Ok(values),
            other => return Err(format!("expected ',' or ')' in a set, found {other:?}")),
        }
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name as in [`label_value`].
fn label_key(key: &str) -> Result<String, String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    });
    if !prefix_ok || name.is_empty() || !is_label_name(name) {
        return Err(format!("invalid label key {key:?}"));
    }
    Ok(key.to_owned())
}

fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// At most 63 of `[A-Za-z0-9_.-]`, beginning and ending with a letter or digit.
fn is_label_name(s: &str) -> bool {
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.bytes().next())
        && alnum(s.bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    field: Field,
    /// `=`/`==` when true, `!=` when false.
    equal: bool,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    Name,
    Namespace,
}

fn parse_fields(selector: &str) -> Result<Vec<FieldRequirement>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|part| {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("{part:?} has no operator"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            if value.contains('\\') {
                return Err(format!("escapes are not supported in {part:?}"));
            }
            Ok(FieldRequirement {
                field,
                equal,
                value: value.trim().to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(selector: &str) -> Vec<LabelRequirement> {
        parse_labels(selector).unwrap_or_else(|err| panic!("{selector:?}: {err}"))
    }

    fn req(key: &str, op: LabelOp) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            op,
        }
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|&v| v.to_owned()).collect()
    }

    #[test]
    fn parses_every_label_operator() {
        assert_eq!(labels(""), vec![]);
        assert_eq!(
            labels("a, !b.io/x,c=1,d==2,e!=3, f in (x, y),g notin (z),h="),
            vec![
                req("a", LabelOp::Exists),
                req("b.io/x", LabelOp::NotExists),
                req("c", LabelOp::In(strings(&["1"]))),
                req("d", LabelOp::In(strings(&["2"]))),
                req("e", LabelOp::NotIn(strings(&["3"]))),
                req("f", LabelOp::In(strings(&["x", "y"]))),
                req("g", LabelOp::NotIn(strings(&["z"]))),
                req("h", LabelOp::In(strings(&[""]))),
            ]
        );
    }

    #[test]
    fn rejects_bad_label_selectors() {
        for bad in [
            "a>1", "a<1", "a in ()", "a in (x", "a in x", "a b", "!", "a=b=c", ",", "a,", "-a",
            "A/b", "a=(b)",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn negative_label_operators_match_missing_labels() {
        let filter = |s| Filter::new(None, Some(s), None).unwrap();
        let with = json!({"metadata": {"name": "a", "labels": {"app": "web"}}});
        let without = json!({"metadata": {"name": "b"}});
        for (selector, matches_with, matches_without) in [
            ("app", true, false),
            ("!app", false, true),
            ("app=web", true, false),
            ("app!=web", false, true),
            ("app!=db", true, true),
            ("app in (db,web)", true, false),
            ("app notin (web)", false, true),
        ] {
            assert_eq!(filter(selector).matches(&with), matches_with, "{selector}");
            assert_eq!(
                filter(selector).matches(&without),
                matches_without,
                "{selector}"
            );
        }
    }

    #[test]
    fn parses_and_matches_field_selectors() {
        let object = json!({"metadata": {"name": "web", "namespace": "prod"}});
        let filter = |s| Filter::new(None, None, Some(s));
        assert!(filter("metadata.name=web").unwrap().matches(&object));
        assert!(
            filter("metadata.name==web,metadata.namespace=prod")
                .unwrap()
                .matches(&object)
        );
        assert!(!filter("metadata.namespace!=prod").unwrap().matches(&object));
        assert!(filter("").unwrap().matches(&object));
        for bad in [
            "spec.clusterIP=1.2.3.4",
            "metadata.name",
            "metadata.name=a\\,b",
        ] {
            assert_eq!(filter(bad).unwrap_err().code, 400, "{bad:?}");
        }
    }
}
