//! Reading a request: which collection its path names, and its list or watch parameters.

use std::time::Duration;

use super::resource::Kind;
use super::selectors::Filter;
use super::status::ApiError;
use super::store::Start;

/// How long a watch runs when the client sets no `timeoutSeconds`: the real server's
/// `--min-request-timeout` default (it picks a random time up to twice that).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A longer `timeoutSeconds` is cut to this, so that no value can overflow the watch's deadline.
const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(366 * 86_400);

/// What a path names.
#[derive(Debug, PartialEq)]
pub(crate) enum Route {
    Version,
    /// A kind's objects, in one namespace or in all of them.
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
}

/// The route of `path`, or `None` for paths this server does not serve.
pub(crate) fn route(path: &str) -> Option<Route> {
    if path == "/version" {
        return Some(Route::Version);
    }
    Kind::ALL.into_iter().find_map(|kind| {
        let rest = path.strip_prefix(kind.group_path())?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["", plural] if *plural == kind.plural() => Some(Route::Collection {
                kind,
                namespace: None,
            }),
            ["", "namespaces", namespace, plural]
                if kind.namespaced() && *plural == kind.plural() && !namespace.is_empty() =>
            {
                Some(Route::Collection {
                    kind,
                    namespace: Some((*namespace).to_owned()),
                })
            }
            _ => None,
        }
    })
}

pub(crate) enum Request {
    List(ListRequest),
    Watch(WatchRequest),
}

pub(crate) struct ListRequest {
    pub filter: Filter,
    /// At most this many items per page; `None` for all.
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    /// The resourceVersion a `resourceVersionMatch=Exact` list asks for.
    pub exact: Option<u64>,
}

pub(crate) struct WatchRequest {
    pub filter: Filter,
    pub start: Start,
    /// `sendInitialEvents=true`: after the synthetic ADDED events, a BOOKMARK annotated
    /// `k8s.io/initial-events-end` marks the end of the initial state.
    pub initial_events_end: bool,
    pub bookmarks: bool,
    pub timeout: Duration,
}

/// The list or watch that a request for a collection in `namespace` asks for.
pub(crate) fn parse(
    namespace: Option<String>,
    raw_query: Option<&str>,
) -> Result<Request, ApiError> {
    let query = Query::parse(raw_query.unwrap_or_default())?;
    let filter = Filter::new(
        namespace,
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )?;
    let resource_version = match query.get("resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    if query.flag("watch")? {
        let send_initial_events = query
            .get("sendInitialEvents")
            .map(|_| query.flag("sendInitialEvents"))
            .transpose()?;
        let bookmarks = query.flag("allowWatchBookmarks")?;
        if send_initial_events == Some(true) && !bookmarks {
            return Err(ApiError::bad_request(
                "sendInitialEvents=true requires allowWatchBookmarks=true",
            ));
        }
        // The real server's table: without sendInitialEvents, resourceVersion "" or "0" means
        // "the current state, then changes", and N means "changes after N".
        let start = match (send_initial_events, resource_version) {
            (Some(true), _) | (None, None) => Start::State,
            (Some(false), None) => Start::Now,
            (_, Some(rv)) => Start::After(rv),
        };
        let timeout = match query.number("timeoutSeconds")? {
            None | Some(0) => DEFAULT_WATCH_TIMEOUT,
            Some(secs) => Duration::from_secs(secs).min(MAX_WATCH_TIMEOUT),
        };
        return Ok(Request::Watch(WatchRequest {
            filter,
            start,
            initial_events_end: send_initial_events == Some(true),
            bookmarks,
            timeout,
        }));
    }
    let exact = match query.get("resourceVersionMatch") {
        None | Some("") => None,
        Some(_) if query.get("resourceVersion").is_none() => {
            return Err(ApiError::bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        Some("NotOlderThan") => None,
        Some("Exact") => Some(resource_version.unwrap_or_default()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unsupported resourceVersionMatch {other:?}"
            )));
        }
    };
    let limit = query
        .number("limit")?
        .filter(|&n| n > 0)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    Ok(Request::List(ListRequest {
        filter,
        limit,
        continue_token: query.get("continue").map(str::to_owned),
        exact,
    }))
}

/// A decoded query string (`application/x-www-form-urlencoded`, as kube and client-go send it).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Result<Self, ApiError> {
        raw.split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((decode(name)?, decode(value)?))
            })
            .collect::<Result<_, _>>()
            .map(Query)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    /// A boolean in the spellings Go's `strconv.ParseBool` accepts; absent is false.
    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean {other:?} for {name}"
            ))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|value| {
                value.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid number {value:?} for {name}"))
                })
            })
            .transpose()
    }
}

/// Percent-decoding, with `+` for space.
fn decode(text: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("malformed query string near {text:?}"));
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        bytes.push(match byte {
            b'+' => b' ',
            b'%' => {
                let hex = rest.get(..2).ok_or_else(bad)?;
                rest = &rest[2..];
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(bad)?
            }
            other => other,
        });
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_collections() {
        let collection = |kind, namespace: Option<&str>| {
            Some(Route::Collection {
                kind,
                namespace: namespace.map(str::to_owned),
            })
        };
        assert_eq!(route("/version"), Some(Route::Version));
        assert_eq!(route("/api/v1/services"), collection(Kind::Service, None));
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services"),
            collection(Kind::Service, Some("kube-system"))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"),
            collection(Kind::EndpointSlice, Some("a"))
        );
        assert_eq!(route("/api/v1/nodes"), collection(Kind::Node, None));
        for unknown in [
            "/api/v1/namespaces/a/nodes",
            "/api/v1/endpointslices",
            "/api/v1/services/",
            "/api/v1/namespaces//services",
            "/api/v1/pods",
            "/apis",
        ] {
            assert_eq!(route(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn decodes_query_strings() {
        assert_eq!(decode("a+in+%28x%2Cy%29").unwrap(), "a in (x,y)");
        assert_eq!(decode("%21k").unwrap(), "!k");
        for bad in ["%", "%4", "%zz", "%ff"] {
            assert_eq!(decode(bad).unwrap_err().code, 400, "{bad}");
        }
    }
}
