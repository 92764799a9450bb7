//! List responses: a page of a kind's matching objects, and the continue token for the next one.
//!
//! Pages after the first are not a snapshot at the list's resourceVersion, as they are on the
//! real server (the store keeps no old versions): they show objects as they are now. A client
//! that then watches from the list's resourceVersion still converges, because every change after
//! it is replayed to the watch.

use serde_json::{Map, Value, json};

use super::request::ListRequest;
use super::resource::Kind;
use super::status::ApiError;
use super::store::Store;

/// The answer to a list of `kind`.
pub(crate) fn list(store: &Store, kind: Kind, request: &ListRequest) -> Result<Value, ApiError> {
    if let Some(rv) = request.exact.filter(|&rv| rv != store.rv()) {
        // Only the present can be listed; an older version is as gone as after compaction.
        return Err(ApiError::expired(format!(
            "too old resource version: {rv} ({})",
            store.rv()
        )));
    }
    let (list_rv, after) = match &request.continue_token {
        Some(token) => {
            let (rv, namespace, name) = decode_token(token)?;
            if rv < store.compacted() {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((namespace, name)))
        }
        None => (store.rv(), None),
    };

    let mut matching = store
        .objects(kind, after)
        .filter(|(_, _, object)| request.filter.matches(object));
    let mut items = Vec::new();
    let mut last = None;
    for (namespace, name, object) in matching.by_ref().take(request.limit.unwrap_or(usize::MAX)) {
        items.push(item(object));
        last = Some((namespace, name));
    }

    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), list_rv.to_string().into());
    if let (Some(_), Some((namespace, name))) = (matching.next(), last) {
        metadata.insert(
            "continue".into(),
            format!("{list_rv}/{namespace}/{name}").into(),
        );
    }
    Ok(json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// An item as the real server lists it: without `kind` and `apiVersion`, which the list carries.
fn item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Value::Object(fields) = &mut item {
        fields.remove("kind");
        fields.remove("apiVersion");
    }
    item
}

/// A continue token, `<list rv>/<namespace>/<name of the last item sent>`, as its parts.
fn decode_token(token: &str) -> Result<(u64, &str, &str), ApiError> {
    let mut parts = token.splitn(3, '/');
    match (parts.next().map(str::parse), parts.next(), parts.next()) {
        (Some(Ok(rv)), Some(namespace), Some(name)) if !name.is_empty() => {
            Ok((rv, namespace, name))
        }
        _ => Err(ApiError::bad_request(format!(
            "invalid continue token {token:?}"
        ))),
    }
}
