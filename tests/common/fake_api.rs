//! A MOCKED Kubernetes API server (tower-test): no real API server can run on these machines.
//! Unlike a canned responder it keeps objects, so a reconcile reads what the previous one
//! wrote: GET answers the stored object (404 when absent) or a list, `watch=true` streams the
//! changes since a resourceVersion (answered after a short wait, as a real watch that times
//! out), metadata-only requests (`as=PartialObjectMetadata`) get metadata only, JSON patches
//! (finalizers) and server-side-apply status patches change objects, Events are accepted.
//! Every request is recorded for the tests to assert.

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub accept: String,
    pub body: Value,
}

/// One change, as a watch reports it.
struct Change {
    version: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    log: Vec<Recorded>,
    version: u64,
    changes: Vec<Change>,
}

impl State {
    /// Stores `obj` at `path` under a new resourceVersion and reports the change to watches.
    fn store(&mut self, path: &str, mut obj: Value, kind: &'static str) -> Value {
        self.version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.changes.push(Change {
            version: self.version,
            collection: collection_of(path),
            kind,
            object: obj.clone(),
        });
        if kind == "DELETED" {
            self.objects.remove(path);
        } else {
            self.objects.insert(path.to_string(), obj.clone());
        }
        obj
    }
}

/// The fake API server's handle: its objects and its request log.
#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

/// The API path of a namespaced object, e.g. `("v1", "secrets", "default", "ssh")`.
pub fn path(api_version: &str, plural: &str, ns: &str, name: &str) -> String {
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/{ns}/{plural}/{name}")
}

pub fn asset_path(name: &str) -> String {
    path("dagster-slurm.io/v1alpha1", "slurmassets", "default", name)
}

fn collection_of(path: &str) -> String {
    path.rsplit_once('/')
        .map(|(c, _)| c)
        .unwrap_or("")
        .to_string()
}

const COLLECTIONS: [&str; 5] = [
    "slurmassets",
    "slurmclusters",
    "secrets",
    "configmaps",
    "leases",
];

/// Whether an object's collection is `requested`, namespaced or across all namespaces.
fn in_collection(collection: &str, requested: &str) -> bool {
    if collection == requested {
        return true;
    }
    // ".../namespaces/<ns>/<plural>" is also in ".../<plural>".
    match collection.split_once("/namespaces/") {
        Some((prefix, rest)) => rest
            .split_once('/')
            .is_some_and(|(_, plural)| format!("{prefix}/{plural}") == requested),
        None => false,
    }
}

/// JSON merge patch (RFC 7386), which is also what a strategic merge or an apply of these
/// flat Lease specs amounts to.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// How a request is answered: at once, or (a watch) after a short wait.
enum Reply {
    Now(StatusCode, Value),
    Watch {
        collection: String,
        since: u64,
        meta_only: bool,
    },
}

impl FakeApi {
    /// A client whose every request is answered by this fake.
    pub fn start() -> (FakeApi, Client) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi::default();
        let state = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()
                };
                let (content_type, accept) = (header("content-type"), header("accept"));
                let (method, uri) = (parts.method.to_string(), parts.uri.to_string());
                let bytes = body.collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let rec = Recorded {
                    method,
                    uri,
                    content_type,
                    accept,
                    body,
                };
                let reply = state.answer(&rec);
                state.0.lock().unwrap().log.push(rec);
                match reply {
                    Reply::Now(code, answer) => send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                            .unwrap(),
                    ),
                    Reply::Watch {
                        collection,
                        since,
                        meta_only,
                    } => {
                        let state = state.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let text = state.watch_events(&collection, since, meta_only);
                            send.send_response(
                                Response::builder()
                                    .body(Body::from(text.into_bytes()))
                                    .unwrap(),
                            );
                        });
                    }
                }
            }
        });
        (api.clone(), Client::new(svc, "default"))
    }

    /// Stores an object, as `kubectl apply` would create or replace it.
    pub fn put(&self, mut obj: Value) {
        let md = &obj["metadata"];
        let p = path(
            obj["apiVersion"].as_str().unwrap(),
            &plural(obj["kind"].as_str().unwrap()),
            md["namespace"].as_str().unwrap_or("default"),
            md["name"].as_str().unwrap(),
        );
        let mut s = self.0.lock().unwrap();
        let existing = s.objects.get(&p).cloned();
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = existing
                .as_ref()
                .map(|e| e["metadata"]["uid"].clone())
                .unwrap_or_else(|| json!(uuid::Uuid::new_v4().to_string()));
        }
        // The real API server's JSON patch treats an absent field as null (kube's finalizer
        // helper tests for that); the json-patch crate needs it spelled out.
        if obj["metadata"]["finalizers"].is_null() {
            obj["metadata"]["finalizers"] = existing
                .as_ref()
                .map(|e| e["metadata"]["finalizers"].clone())
                .unwrap_or(Value::Null);
        }
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        if let Some(e) = &existing
            && obj["status"].is_null()
        {
            obj["status"] = e["status"].clone();
        }
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.store(&p, obj, kind);
    }

    /// Serves this fake over HTTP on 127.0.0.1 (for the operator binary, through a
    /// kubeconfig); returns the port.
    pub async fn serve_http(&self) -> u16 {
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let api = self.clone();
        let handler = move |req: axum::extract::Request| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .map(|v| v.to_str().unwrap_or_default().to_string())
                        .unwrap_or_default()
                };
                let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let rec = Recorded {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    content_type: header("content-type"),
                    accept: header("accept"),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let reply = api.answer(&rec);
                api.0.lock().unwrap().log.push(rec);
                let json_type = [(http::header::CONTENT_TYPE, "application/json")];
                match reply {
                    Reply::Now(code, v) => (code, json_type, v.to_string()).into_response(),
                    Reply::Watch {
                        collection,
                        since,
                        meta_only,
                    } => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let text = api.watch_events(&collection, since, meta_only);
                        (StatusCode::OK, json_type, text).into_response()
                    }
                }
            }
        };
        let app = axum::Router::new().fallback(handler);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// What `kubectl delete` does: with finalizers, only a deletionTimestamp is set.
    pub fn delete(&self, path: &str) {
        let mut s = self.0.lock().unwrap();
        let Some(mut obj) = s.objects.get(path).cloned() else {
            return;
        };
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            obj["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
            s.store(path, obj, "MODIFIED");
        } else {
            s.store(path, obj, "DELETED");
        }
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().log.clone()
    }

    fn watch_events(&self, collection: &str, since: u64, meta_only: bool) -> String {
        let s = self.0.lock().unwrap();
        s.changes
            .iter()
            .filter(|c| c.version > since && in_collection(&c.collection, collection))
            .map(|c| {
                let object = if meta_only {
                    metadata_only(&c.object)
                } else {
                    c.object.clone()
                };
                format!("{}\n", json!({"type": c.kind, "object": object}))
            })
            .collect()
    }

    fn answer(&self, r: &Recorded) -> Reply {
        let mut s = self.0.lock().unwrap();
        let (p, query) = r.uri.split_once('?').unwrap_or((&r.uri, ""));
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        let meta_only = r.accept.contains("as=PartialObjectMetadata");
        if p.ends_with("/events") && r.method == "POST" {
            return Reply::Now(StatusCode::CREATED, r.body.clone());
        }
        let last = p.rsplit('/').next().unwrap_or("");
        if r.method == "GET" && COLLECTIONS.contains(&last) {
            if param("watch").as_deref() == Some("true") {
                let since = param("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return Reply::Watch {
                    collection: p.to_string(),
                    since,
                    meta_only,
                };
            }
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| in_collection(&collection_of(k), p))
                .map(|(_, o)| {
                    if meta_only {
                        metadata_only(o)
                    } else {
                        o.clone()
                    }
                })
                .collect();
            return Reply::Now(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "items": items,
                       "metadata": {"resourceVersion": s.version.to_string()}}),
            );
        }
        if r.method == "POST" && COLLECTIONS.contains(&last) {
            let mut obj = r.body.clone();
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let obj_path = format!("{p}/{name}");
            if s.objects.contains_key(&obj_path) {
                return Reply::Now(
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                );
            }
            obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            return Reply::Now(StatusCode::CREATED, s.store(&obj_path, obj, "ADDED"));
        }
        let (obj_path, subresource) = match p.strip_suffix("/status") {
            Some(base) => (base.to_string(), true),
            None => (p.to_string(), false),
        };
        let Some(mut obj) = s.objects.get(&obj_path).cloned() else {
            return not_found(&obj_path);
        };
        match r.method.as_str() {
            "GET" => Reply::Now(StatusCode::OK, obj),
            "PATCH" if subresource && r.content_type == "application/apply-patch+yaml" => {
                // As a real server would: a status that does not fit the CRD's schema is refused
                // (wrong types, nulls) or would lose fields to pruning (unknown keys).
                let kind = r.body["kind"].as_str().unwrap_or_default();
                let schema = &crd_schema(kind)["properties"]["status"];
                if let Err(e) = fits_schema(&r.body["status"], schema, "status") {
                    return Reply::Now(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "Invalid", "code": 422, "message": e}),
                    );
                }
                // Server-side apply of the status: this operator is the status's only manager.
                obj["status"] = r.body["status"].clone();
                Reply::Now(StatusCode::OK, s.store(&obj_path, obj, "MODIFIED"))
            }
            "PATCH" if r.content_type == "application/json-patch+json" => {
                let patch: json_patch::Patch = serde_json::from_value(r.body.clone()).unwrap();
                if let Err(e) = json_patch::patch(&mut obj, &patch) {
                    return Reply::Now(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "Invalid", "code": 422, "message": e.to_string()}),
                    );
                }
                let released = obj["metadata"]["deletionTimestamp"].is_string()
                    && obj["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty());
                let kind = if released { "DELETED" } else { "MODIFIED" };
                Reply::Now(StatusCode::OK, s.store(&obj_path, obj, kind))
            }
            "PATCH"
                if !subresource
                    && matches!(
                        r.content_type.as_str(),
                        "application/merge-patch+json"
                            | "application/strategic-merge-patch+json"
                            | "application/apply-patch+yaml"
                    ) =>
            {
                let mut patch = r.body.clone();
                if let Some(m) = patch.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                merge(&mut obj, &patch);
                Reply::Now(StatusCode::OK, s.store(&obj_path, obj, "MODIFIED"))
            }
            other => panic!("the fake API does not serve {other} {}", r.uri),
        }
    }
}

fn metadata_only(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

fn not_found(path: &str) -> Reply {
    Reply::Now(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

fn plural(kind: &str) -> String {
    format!("{}s", kind.to_lowercase())
}

/// The openAPIV3Schema of a kind in `crds/crds.yaml`.
pub fn crd_schema(kind: &str) -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    docs.into_iter()
        .find(|d| d["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))["spec"]["versions"][0]["schema"]
        ["openAPIV3Schema"]
        .clone()
}

/// Whether `v` fits a structural schema as the API server applies it: types, enums, required
/// keys, nulls only where nullable, and no key the server would prune.
pub fn fits_schema(v: &Value, schema: &Value, at: &str) -> Result<(), String> {
    if v.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null where the schema does not allow it"))
        };
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {allowed:?}"));
    }
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match schema["type"].as_str() {
        Some("object") => {
            let map = v
                .as_object()
                .ok_or_else(|| format!("{at}: expected an object, got {v}"))?;
            for req in schema["required"].as_array().into_iter().flatten() {
                if !map.contains_key(req.as_str().unwrap()) {
                    return Err(format!("{at}: required field {req} missing"));
                }
            }
            for (k, item) in map {
                let path = format!("{at}.{k}");
                if let Some(s) = schema["properties"].get(k) {
                    fits_schema(item, s, &path)?;
                } else if schema["additionalProperties"].is_object() {
                    fits_schema(item, &schema["additionalProperties"], &path)?;
                } else if !preserve {
                    return Err(format!("{path}: unknown field (the server would prune it)"));
                }
            }
            Ok(())
        }
        Some("array") => {
            let items = v
                .as_array()
                .ok_or_else(|| format!("{at}: expected an array, got {v}"))?;
            for (i, item) in items.iter().enumerate() {
                fits_schema(item, &schema["items"], &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("string") => {
            let s = v
                .as_str()
                .ok_or_else(|| format!("{at}: expected a string, got {v}"))?;
            if schema["format"] == "date-time" && s.parse::<jiff::Timestamp>().is_err() {
                return Err(format!("{at}: {s:?} is not an RFC 3339 date-time"));
            }
            Ok(())
        }
        Some("integer") if !(v.is_i64() || v.is_u64()) => {
            Err(format!("{at}: expected an integer, got {v}"))
        }
        Some("number") if !v.is_number() => Err(format!("{at}: expected a number, got {v}")),
        Some("boolean") if !v.is_boolean() => Err(format!("{at}: expected a boolean, got {v}")),
        _ => Ok(()),
    }
}
