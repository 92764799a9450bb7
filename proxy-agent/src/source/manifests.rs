//! A directory of YAML manifests -> a [`Store`].
//!
//! Data flow: [`load_dir`] lists the `*.yaml`/`*.yml` files of one directory (not recursive, in
//! name order), reads each (bounded), splits it into YAML documents, reads each document's
//! `apiVersion` and `kind`, and deserializes `v1` Services and `discovery.k8s.io/v1`
//! EndpointSlices into their k8s-openapi types. Other kinds are skipped (debug log). The store is
//! then compiled like one filled by API watchers.
//!
//! Invariants:
//! - A bad file or document never stops the load: it becomes one [`LoadError`] (file, document,
//!   reason) and the rest still loads. Only a directory that cannot be listed fails [`load_dir`].
//!   This function does not log the errors; its caller logs each one once.
//! - Deterministic: the same directory contents give the same store and the same errors in the
//!   same order. An object defined twice keeps its first definition; the second is an error.
//! - Bounded: a file over [`MAX_FILE_BYTES`] or a document over [`MAX_DOCUMENT_BYTES`] is refused
//!   before it is parsed; the YAML parser's budget caps a document's nodes and nesting (which also
//!   defeats alias bombs); at most [`MAX_ERRORS_PER_FILE`] errors are kept per file.
//! - Objects without a namespace get `default`, as `kubectl apply` would give them.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::model::{ObjectRef, Store};

/// Largest manifest file read. Far above any sane manifest, small enough to hold in memory.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Largest document parsed: the API server refuses request bodies over 3 MiB, so no real object
/// is larger.
pub const MAX_DOCUMENT_BYTES: usize = 3 << 20;
/// YAML nodes (scalars, sequences, mappings) in one document. A full EndpointSlice (1000
/// endpoints) is about 15 000.
const MAX_NODES_PER_DOCUMENT: usize = 250_000;
/// Nesting depth in one document. Kubernetes objects nest about a dozen levels.
const MAX_DEPTH: usize = 64;
/// Errors kept per file, so that a file of thousands of broken documents cannot flood the logs.
pub const MAX_ERRORS_PER_FILE: usize = 32;

/// What a directory held: the objects that loaded, and why the others did not.
#[derive(Debug, Default)]
pub struct Loaded {
    pub store: Store,
    pub errors: Vec<LoadError>,
}

/// A file, or a document in a file, that did not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// `None` when the error concerns the whole file.
    pub document: Option<DocumentPos>,
    pub reason: String,
}

/// Where a document is in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocumentPos {
    /// 1-based, counting every document of the file, empty ones included.
    pub number: usize,
    /// 1-based line of its `---` marker, or of its first content line.
    pub line: usize,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(pos) = self.document {
            write!(f, ": document {} (line {})", pos.number, pos.line)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Loads every manifest file of `dir` (see the module documentation). Fails only when `dir`
/// cannot be listed.
pub fn load_dir(dir: &Path) -> anyhow::Result<Loaded> {
    let listing = || format!("listing manifest directory {}", dir.display());
    let mut files = Vec::new();
    // A listing that fails halfway is a failure: a partial store would read as "these objects
    // were deleted".
    for entry in fs::read_dir(dir).with_context(listing)? {
        let path = entry.with_context(listing)?.path();
        if is_manifest(&path) {
            files.push(path);
        }
    }
    files.sort();

    let mut loader = Loader::default();
    for file in &files {
        loader.load_file(file);
    }
    Ok(loader.loaded)
}

/// `*.yaml` and `*.yml`, except hidden files: those are editors' lock and scratch files (such as
/// Emacs's `.#a.yaml`), not manifests.
fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_none_or(|name| name.as_encoded_bytes().starts_with(b"."));
    let yaml = path
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml");
    yaml && !hidden
}

#[derive(Default)]
struct Loader {
    loaded: Loaded,
    /// Where each loaded object was defined, to name it when a later document redefines it.
    origins: BTreeMap<(&'static str, ObjectRef), String>,
}

impl Loader {
    fn load_file(&mut self, file: &Path) {
        let text = match read_bounded(file) {
            Ok(text) => text,
            Err(reason) => {
                self.loaded.errors.push(LoadError {
                    file: file.to_owned(),
                    document: None,
                    reason,
                });
                return;
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut failed = 0;
        for document in split_documents(text) {
            let Err(reason) = self.load_document(file, &document) else {
                continue;
            };
            failed += 1;
            if failed <= MAX_ERRORS_PER_FILE {
                self.loaded.errors.push(LoadError {
                    file: file.to_owned(),
                    document: Some(document.pos),
                    reason,
                });
            }
        }
        if let Some(unlisted) = failed.checked_sub(MAX_ERRORS_PER_FILE).filter(|&n| n > 0) {
            self.loaded.errors.push(LoadError {
                file: file.to_owned(),
                document: None,
                reason: format!("{unlisted} more documents did not load (not listed)"),
            });
        }
    }

    fn load_document(&mut self, file: &Path, document: &Document<'_>) -> Result<(), String> {
        if document.text.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "{} bytes, more than the {} MiB an API server accepts for one object",
                document.text.len(),
                MAX_DOCUMENT_BYTES >> 20
            ));
        }
        // A first pass reads only the type; the second deserializes into the type itself, so
        // that its errors carry line and column in the file.
        let Some(type_meta) = parse::<Option<TypeMeta>>(document)? else {
            return Ok(()); // an empty document
        };
        let (Some(api_version), Some(kind)) = (type_meta.api_version, type_meta.kind) else {
            return Err("not a Kubernetes object: apiVersion and kind are required".into());
        };
        match (api_version.as_str(), kind.as_str()) {
            (Service::API_VERSION, Service::KIND) => {
                self.add::<Service, _>(file, document, |store| &mut store.services)
            }
            (EndpointSlice::API_VERSION, EndpointSlice::KIND) => {
                self.add::<EndpointSlice, _>(file, document, |store| &mut store.endpoint_slices)
            }
            _ => {
                debug!(
                    file = %file.display(),
                    document = document.pos.number,
                    api_version,
                    kind,
                    "manifest object of an unhandled kind skipped"
                );
                Ok(())
            }
        }
    }

    /// Parses a `T` and keeps it in the store as a `V` (the object itself, or its record).
    fn add<T, V: From<T>>(
        &mut self,
        file: &Path,
        document: &Document<'_>,
        objects: fn(&mut Store) -> &mut BTreeMap<ObjectRef, V>,
    ) -> Result<(), String>
    where
        T: DeserializeOwned + Resource<Scope = NamespaceResourceScope> + Metadata<Ty = ObjectMeta>,
    {
        let mut object: T = parse(document)?;
        let metadata = object.metadata_mut();
        let Some(name) = metadata.name.clone().filter(|name| !name.is_empty()) else {
            return Err("metadata.name: missing".into());
        };
        let namespace = metadata.namespace.get_or_insert_with(String::new);
        if namespace.is_empty() {
            namespace.push_str("default");
        }
        let key = ObjectRef {
            namespace: namespace.clone(),
            name,
        };
        match self.origins.entry((T::KIND, key.clone())) {
            Entry::Occupied(first) => Err(format!(
                "{} {key} is already defined at {}",
                T::KIND,
                first.get()
            )),
            Entry::Vacant(slot) => {
                slot.insert(format!(
                    "{}: document {} (line {})",
                    file.display(),
                    document.pos.number,
                    document.pos.line
                ));
                objects(&mut self.loaded.store).insert(key, V::from(object));
                Ok(())
            }
        }
    }
}

/// The two fields every Kubernetes object starts with; the rest of the document is skipped.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// Reads at most [`MAX_FILE_BYTES`] (plus one, to tell a file at the limit from a larger one):
/// the size on disk is not trusted, since the file can grow while it is read.
fn read_bounded(file: &Path) -> Result<String, String> {
    let opened = fs::File::open(file).map_err(|err| format!("cannot open: {err}"))?;
    let limit = u64::try_from(MAX_FILE_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut bytes = Vec::new();
    opened
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot read: {err}"))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!(
            "larger than the {} MiB limit for a manifest file",
            MAX_FILE_BYTES >> 20
        ));
    }
    String::from_utf8(bytes)
        .map_err(|err| format!("not UTF-8 (byte {})", err.utf8_error().valid_up_to()))
}

fn parse<T: DeserializeOwned>(document: &Document<'_>) -> Result<T, String> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: MAX_NODES_PER_DOCUMENT,
            max_depth: MAX_DEPTH,
            max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
        },
        // One-line messages: each error is one log line. Its location is still given.
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(document.text, options).map_err(|err| {
        // Lines counted from the top of the file, not of the document.
        let line_offset = u64::try_from(document.first_line.saturating_sub(1)).unwrap_or(0);
        err.render_with_options(serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
            line_offset: line_offset,
        })
    })
}

/// One YAML document of a file.
#[derive(Debug, PartialEq, Eq)]
struct Document<'a> {
    pos: DocumentPos,
    /// The line `text` starts on (comments before the document's marker included).
    first_line: usize,
    text: &'a str,
}

/// Splits a file into YAML documents by lines, as kubectl's YAML reader does, so that a syntax
/// error only costs its own document (a YAML stream parser cannot resume after one). Splitting
/// on lines is exact: a line that starts with `---` or `...` followed by a blank or its end is a
/// document marker wherever it is, since YAML forbids those lines inside scalars.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut chunk = Chunk::starting(0, 1);
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let number = index + 1;
        let kind = classify(line);
        let starts_document = match kind {
            // A marker after a body (or after `...`) starts the next document; before, it starts
            // the current one (comments and directives above it belong to it).
            Line::DocumentStart => chunk.body_line.is_some() || chunk.ended,
            // After `...`, a directive or content opens a new document without a `---`.
            Line::Directive | Line::Content => chunk.ended,
            Line::DocumentEnd | Line::Blank => false,
        };
        if starts_document {
            chunk.finish(text, offset, &mut documents);
            chunk = Chunk::starting(offset, number);
        }
        match kind {
            Line::DocumentStart | Line::Content => {
                chunk.body_line.get_or_insert(number);
            }
            Line::DocumentEnd => chunk.ended = true,
            // A `%` line before the body is a directive of the coming document; inside a body it
            // is content that happens to start with `%`, and the body is already marked.
            Line::Directive | Line::Blank => {}
        }
        offset += line.len();
    }
    chunk.finish(text, offset, &mut documents);
    documents
}

/// The document being cut out of the file by [`split_documents`].
struct Chunk {
    start: usize,
    first_line: usize,
    /// The line of the `---` marker or first content line; `None` while only comments,
    /// directives or blank lines were seen (which make no document on their own).
    body_line: Option<usize>,
    /// A `...` marker ended the document.
    ended: bool,
}

impl Chunk {
    fn starting(start: usize, first_line: usize) -> Chunk {
        Chunk {
            start,
            first_line,
            body_line: None,
            ended: false,
        }
    }

    fn finish<'a>(&self, text: &'a str, end: usize, documents: &mut Vec<Document<'a>>) {
        let (Some(line), Some(body)) = (self.body_line, text.get(self.start..end)) else {
            return;
        };
        documents.push(Document {
            pos: DocumentPos {
                number: documents.len() + 1,
                line,
            },
            first_line: self.first_line,
            text: body,
        });
    }
}

#[derive(Clone, Copy)]
enum Line {
    DocumentStart,
    DocumentEnd,
    Directive,
    /// Blank or a comment.
    Blank,
    Content,
}

fn classify(line: &str) -> Line {
    let line = line.trim_end_matches(['\n', '\r']);
    let is_marker = |marker: &str| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    };
    let trimmed = line.trim_start();
    if is_marker("---") {
        Line::DocumentStart
    } else if is_marker("...") {
        Line::DocumentEnd
    } else if trimmed.is_empty() || trimmed.starts_with('#') {
        Line::Blank
    } else if line.starts_with('%') {
        Line::Directive
    } else {
        Line::Content
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::model::{BackendSet, EndpointInfo, Frontend, Protocol, ServicePortName, compile};

    /// A scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "proxy-agent-manifests-{}-{test}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create a scratch directory");
            TempDir(path)
        }

        fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, contents).expect("write a scratch file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service_yaml(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: \
             {cluster_ip}\n  ports:\n  - port: 80\n"
        )
    }

    fn default_ref(name: &str) -> ObjectRef {
        ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn names<T>(objects: &BTreeMap<ObjectRef, T>) -> Vec<String> {
        objects.keys().map(ToString::to_string).collect()
    }

    fn load_one(test: &str, name: &str, contents: &str) -> (TempDir, Loaded) {
        let dir = TempDir::new(test);
        dir.write(name, contents);
        let loaded = load_dir(&dir.0).expect("the directory is readable");
        (dir, loaded)
    }

    #[test]
    fn seed_compiles_to_the_articles_state() {
        // The file alone, not `load_dir(examples/)`: the directory may hold other examples.
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed.yaml");
        let mut loader = Loader::default();
        loader.load_file(&seed);
        let loaded = loader.loaded;
        assert_eq!(
            loaded.errors,
            vec![],
            "the Ingress is skipped, the rest loads"
        );
        assert_eq!(
            names(&loaded.store.services),
            [
                "default/bar",
                "default/kubia",
                "default/kubia-loadbalancer",
                "default/kubia-nodeport"
            ]
        );
        assert_eq!(
            names(&loaded.store.endpoint_slices),
            [
                "default/bar-xyz34",
                "default/kubia-abc12",
                "default/kubia-loadbalancer-ghi78",
                "default/kubia-nodeport-def56"
            ]
        );

        let compiled = compile(&loaded.store, "node-1");
        assert_eq!(compiled.rejected, vec![]);
        let local = EndpointInfo {
            terminating: false,
            local: true,
        };
        let remote = EndpointInfo::default();
        let set = |service: &str,
                   port_name: &str,
                   frontend: &str,
                   endpoints: &[(&str, EndpointInfo)],
                   affinity_timeout_s| {
            let frontend: SocketAddrV4 = frontend.parse().expect("a frontend");
            let name = ServicePortName {
                service: default_ref(service),
                port_name: port_name.into(),
                protocol: Protocol::Tcp,
            };
            let set = BackendSet {
                frontends: [Frontend {
                    addr: *frontend.ip(),
                    port: frontend.port(),
                    protocol: Protocol::Tcp,
                }]
                .into(),
                endpoints: endpoints
                    .iter()
                    .map(|(addr, info)| (addr.parse().expect("an endpoint"), *info))
                    .collect(),
                affinity_timeout_s,
            };
            (name, set)
        };
        let kubia_http = [
            ("10.244.1.11:8080", local),
            ("10.244.1.12:8080", local),
            ("10.244.2.11:8080", remote),
        ];
        let want: BTreeMap<_, _> = [
            set(
                "bar",
                "",
                "10.96.0.13:80",
                &[("10.244.2.21:8080", remote)],
                None,
            ),
            // sessionAffinity: ClientIP without a config: the default timeout.
            set("kubia", "http", "10.96.0.10:80", &kubia_http, Some(10_800)),
            set(
                "kubia",
                "https",
                "10.96.0.10:443",
                &[
                    ("10.244.1.11:8443", local),
                    ("10.244.1.12:8443", local),
                    ("10.244.2.11:8443", remote),
                ],
                Some(10_800),
            ),
            // Their own slices (the project's seed adds what the controller would write) list
            // kubia's pods.
            set("kubia-loadbalancer", "", "10.96.0.12:80", &kubia_http, None),
            set("kubia-nodeport", "", "10.96.0.11:80", &kubia_http, None),
        ]
        .into_iter()
        .collect();
        assert_eq!(compiled.desired.backend_sets, want);
    }

    #[test]
    fn load_dir_reads_yaml_files_in_name_order() {
        let dir = TempDir::new("order");
        dir.write("b.yaml", service_yaml("b", "10.96.0.2"));
        // Defines `a` again: the file that sorts first wins, whatever the listing order.
        dir.write("c.yml", service_yaml("a", "10.96.0.99"));
        dir.write("a.yml", service_yaml("a", "10.96.0.1"));
        dir.write("notes.txt", service_yaml("txt", "10.96.0.3"));
        dir.write(".a.yaml.swp", service_yaml("swap", "10.96.0.4"));
        fs::create_dir(dir.0.join("nested")).expect("mkdir");
        dir.write("nested/d.yaml", service_yaml("nested", "10.96.0.5"));

        let loaded = load_dir(&dir.0).expect("readable");
        assert_eq!(names(&loaded.store.services), ["default/a", "default/b"]);
        let a = &loaded.store.services[&default_ref("a")];
        let cluster_ip = a.spec.as_ref().and_then(|spec| spec.cluster_ip.as_deref());
        assert_eq!(cluster_ip, Some("10.96.0.1"));
        assert_eq!(
            loaded.errors,
            vec![LoadError {
                file: dir.0.join("c.yml"),
                document: Some(DocumentPos { number: 1, line: 1 }),
                reason: format!(
                    "Service default/a is already defined at {}: document 1 (line 1)",
                    dir.0.join("a.yml").display()
                ),
            }]
        );
    }

    #[test]
    fn a_broken_document_does_not_stop_the_file() {
        let yaml = [
            service_yaml("first", "10.96.0.1").as_str(),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: broken\nspec: {}\n",
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n\
             addressType: IPv4\nendpoints: []\n",
            "--- # a comment after the marker\n",
            &service_yaml("last", "10.96.0.2"),
        ]
        .concat();
        let (dir, loaded) = load_one("broken", "mixed.yaml", &yaml);
        assert_eq!(
            names(&loaded.store.services),
            ["default/first", "default/last"]
        );
        assert_eq!(names(&loaded.store.endpoint_slices), ["default/s"]);
        let [error] = loaded.errors.as_slice() else {
            panic!("one error expected: {:?}", loaded.errors);
        };
        assert_eq!(error.file, dir.0.join("mixed.yaml"));
        assert_eq!(error.document, Some(DocumentPos { number: 2, line: 9 }));
        // The parser's own words, with a line counted from the top of the file.
        assert!(error.reason.contains("line 1"), "{error}");
        let shown = error.to_string();
        assert!(
            shown.contains("mixed.yaml: document 2 (line 9): "),
            "{shown}"
        );
    }

    #[test]
    fn a_wrong_typed_field_is_an_error_with_its_line() {
        let yaml = format!(
            "{}---\n{}",
            service_yaml("ok", "10.96.0.1"),
            service_yaml("typo", "10.96.0.2").replace("port: 80", "port: \"eighty\"")
        );
        let (_dir, loaded) = load_one("typed", "typed.yaml", &yaml);
        assert_eq!(names(&loaded.store.services), ["default/ok"]);
        let [error] = loaded.errors.as_slice() else {
            panic!("one error expected: {:?}", loaded.errors);
        };
        assert_eq!(error.document, Some(DocumentPos { number: 2, line: 9 }));
        // `port: "eighty"` is on line 17 of the file.
        assert!(error.reason.contains("line 17"), "{error}");
    }

    #[test]
    fn other_kinds_are_skipped_and_non_objects_are_errors() {
        let yaml = "\
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: config}
data: {port: \"80\"}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
---
---
# only a comment
---
just a string
---
metadata: {name: no-kind}
";
        let (_dir, loaded) = load_one("kinds", "kinds.yaml", yaml);
        assert!(loaded.store.services.is_empty());
        assert!(loaded.store.endpoint_slices.is_empty());
        let positions: Vec<_> = loaded.errors.iter().map(|e| e.document).collect();
        assert_eq!(
            positions,
            [
                Some(DocumentPos {
                    number: 6,
                    line: 16
                }),
                Some(DocumentPos {
                    number: 7,
                    line: 18
                }),
            ],
            "{:?}",
            loaded.errors
        );
        assert_eq!(
            loaded.errors[1].reason,
            "not a Kubernetes object: apiVersion and kind are required"
        );
    }

    #[test]
    fn namespace_defaults_and_name_is_required() {
        let yaml = [
            service_yaml("plain", "10.96.0.1").as_str(),
            "---\n",
            &service_yaml("empty-ns", "10.96.0.2").replace("  name:", "  namespace: \"\"\n  name:"),
            "---\n",
            &service_yaml("other", "10.96.0.3").replace("  name:", "  namespace: team\n  name:"),
            "---\napiVersion: v1\nkind: Service\nmetadata: {namespace: team}\n",
        ]
        .concat();
        let (_dir, loaded) = load_one("namespaces", "ns.yaml", &yaml);
        assert_eq!(
            names(&loaded.store.services),
            ["default/empty-ns", "default/plain", "team/other"]
        );
        let namespace = loaded.store.services[&default_ref("plain")]
            .metadata
            .namespace
            .as_deref();
        assert_eq!(namespace, Some("default"), "the object agrees with its key");
        let reasons: Vec<_> = loaded.errors.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["metadata.name: missing"]);
    }

    #[test]
    fn oversized_files_and_documents_are_refused_unparsed() {
        let dir = TempDir::new("oversized");
        let big_annotation = |bytes: usize| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: big\n  annotations:\n    \
                 note: \"{}\"\n",
                "x".repeat(bytes)
            )
        };
        dir.write("a-huge.yaml", big_annotation(MAX_FILE_BYTES));
        // A 5 MiB document, then a good one in the same file.
        dir.write(
            "b-big-document.yaml",
            format!(
                "{}---\n{}",
                big_annotation(5 << 20),
                service_yaml("after", "10.96.0.1")
            ),
        );
        let loaded = load_dir(&dir.0).expect("readable");
        assert_eq!(names(&loaded.store.services), ["default/after"]);
        let shown: Vec<_> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                format!(
                    "{}: larger than the 16 MiB limit for a manifest file",
                    dir.0.join("a-huge.yaml").display()
                ),
                format!(
                    "{}: document 1 (line 1): {} bytes, more than the 3 MiB an API server accepts \
                     for one object",
                    dir.0.join("b-big-document.yaml").display(),
                    big_annotation(5 << 20).len()
                ),
            ]
        );
    }

    #[test]
    fn the_parser_budget_refuses_dense_deep_and_aliased_documents() {
        // Under the byte limit, but 500 000 nodes.
        let dense = format!("items:\n{}", "- 1\n".repeat(500_000));
        let deep = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        // Each line multiplies the one before by ten: 10^7 nodes from a few hundred bytes.
        let mut bomb = String::from("a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n");
        for level in 1..8 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let yaml = [
            dense.as_str(),
            "---\n",
            &deep,
            "---\n",
            &bomb,
            "---\n",
            &service_yaml("ok", "10.96.0.1"),
        ]
        .concat();
        let (_dir, loaded) = load_one("budget", "budget.yaml", &yaml);
        assert_eq!(names(&loaded.store.services), ["default/ok"]);
        let numbers: Vec<_> = loaded
            .errors
            .iter()
            .filter_map(|e| e.document)
            .map(|p| p.number)
            .collect();
        assert_eq!(numbers, [1, 2, 3], "{:?}", loaded.errors);
        for error in &loaded.errors {
            assert!(error.reason.starts_with("budget breached"), "{error}");
        }
    }

    #[test]
    fn errors_per_file_are_capped() {
        let broken = "---\n{not: [yaml\n".repeat(MAX_ERRORS_PER_FILE + 8);
        let yaml = format!("{broken}---\n{}", service_yaml("still-loaded", "10.96.0.1"));
        let (dir, loaded) = load_one("capped", "noisy.yaml", &yaml);
        assert_eq!(names(&loaded.store.services), ["default/still-loaded"]);
        assert_eq!(loaded.errors.len(), MAX_ERRORS_PER_FILE + 1);
        assert_eq!(
            loaded.errors.last(),
            Some(&LoadError {
                file: dir.0.join("noisy.yaml"),
                document: None,
                reason: "8 more documents did not load (not listed)".into(),
            })
        );
    }

    #[test]
    fn unreadable_files_are_errors_and_a_missing_directory_fails() {
        let dir = TempDir::new("unreadable");
        dir.write(
            "latin1.yaml",
            b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n",
        );
        fs::create_dir(dir.0.join("dir.yaml")).expect("mkdir");
        dir.write("ok.yaml", service_yaml("ok", "10.96.0.1"));
        let loaded = load_dir(&dir.0).expect("readable");
        assert_eq!(names(&loaded.store.services), ["default/ok"]);
        let files: Vec<_> = loaded
            .errors
            .iter()
            .map(|e| (e.file.clone(), e.document))
            .collect();
        assert_eq!(
            files,
            [
                (dir.0.join("dir.yaml"), None),
                (dir.0.join("latin1.yaml"), None)
            ]
        );
        assert_eq!(loaded.errors[1].reason, "not UTF-8 (byte 49)");

        let missing = dir.0.join("missing");
        let err = load_dir(&missing).expect_err("a missing directory fails the load");
        assert!(err.to_string().contains("missing"), "{err:#}");
    }

    #[test]
    fn documents_are_split_on_marker_lines() {
        // (number, line, first_line, text) of each document.
        type Expected = (usize, usize, usize, &'static str);
        let cases: &[(&str, &[Expected])] = &[
            ("", &[]),
            ("# only comments\n\n", &[]),
            ("a: 1\n", &[(1, 1, 1, "a: 1\n")]),
            // Comments above the first marker belong to the first document.
            (
                "# header\n---\na: 1\n",
                &[(1, 2, 1, "# header\n---\na: 1\n")],
            ),
            (
                "a: 1\n---\nb: 2\n--- # c\nc: 3",
                &[
                    (1, 1, 1, "a: 1\n"),
                    (2, 2, 2, "---\nb: 2\n"),
                    (3, 4, 4, "--- # c\nc: 3"),
                ],
            ),
            // Empty documents count.
            (
                "---\n---\na: 1\n",
                &[(1, 1, 1, "---\n"), (2, 2, 2, "---\na: 1\n")],
            ),
            // Content on the marker line stays with its marker.
            (
                "--- |\n  text\n--- {a: 1}\n",
                &[(1, 1, 1, "--- |\n  text\n"), (2, 3, 3, "--- {a: 1}\n")],
            ),
            // `---x` and indented `---` are content, not markers.
            (
                "a: |\n  ---\nb: ---x\n",
                &[(1, 1, 1, "a: |\n  ---\nb: ---x\n")],
            ),
            // `...` ends a document; what follows starts the next one, directives included.
            (
                "a: 1\n...\n%YAML 1.2\n---\nb: 2\n...\nc: 3\n",
                &[
                    (1, 1, 1, "a: 1\n...\n"),
                    (2, 4, 3, "%YAML 1.2\n---\nb: 2\n...\n"),
                    (3, 7, 7, "c: 3\n"),
                ],
            ),
            (
                "a: 1\r\n---\r\nb: 2\r\n",
                &[(1, 1, 1, "a: 1\r\n"), (2, 2, 2, "---\r\nb: 2\r\n")],
            ),
        ];
        for (file, want) in cases {
            let want: Vec<_> = want
                .iter()
                .map(|&(number, line, first_line, text)| Document {
                    pos: DocumentPos { number, line },
                    first_line,
                    text,
                })
                .collect();
            assert_eq!(split_documents(file), want, "{file:?}");
        }
    }
}
