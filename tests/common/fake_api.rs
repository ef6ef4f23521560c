//! A MOCKED Kubernetes API server (tower-test): no real API server can run on these machines.
//! Unlike a canned responder it keeps objects, so a reconcile reads what the previous one
//! wrote: GET answers the stored object (404 when absent), JSON patches (finalizers) and
//! server-side-apply status patches change it, Events are accepted. Every request is recorded
//! for the tests to assert.

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    log: Vec<Recorded>,
    version: u64,
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

impl FakeApi {
    /// A client whose every request is answered by this fake.
    pub fn start() -> (FakeApi, Client) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi::default();
        let state = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let uri = req.uri().to_string();
                let content_type = req
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let rec = Recorded {
                    method,
                    uri,
                    content_type,
                    body,
                };
                let (code, answer) = state.answer(&rec);
                state.0.lock().unwrap().log.push(rec);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (api.clone(), Client::new(svc, "default"))
    }

    /// Stores an object (a copy of what `kubectl apply` would create).
    pub fn put(&self, mut obj: Value) {
        let md = &obj["metadata"];
        let p = path(
            obj["apiVersion"].as_str().unwrap(),
            &plural(obj["kind"].as_str().unwrap()),
            md["namespace"].as_str().unwrap_or("default"),
            md["name"].as_str().unwrap(),
        );
        let mut s = self.0.lock().unwrap();
        s.version += 1;
        obj["metadata"]["resourceVersion"] = json!(s.version.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        }
        // The real API server's JSON patch treats an absent field as null (kube's finalizer
        // helper tests for that); the json-patch crate needs it spelled out.
        if obj["metadata"]["finalizers"].is_null() {
            obj["metadata"]["finalizers"] = Value::Null;
        }
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        s.objects.insert(p, obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// What `kubectl delete` does: with finalizers, only a deletionTimestamp is set.
    pub fn delete(&self, path: &str) {
        let mut s = self.0.lock().unwrap();
        let Some(obj) = s.objects.get_mut(path) else {
            return;
        };
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            obj["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
        } else {
            s.objects.remove(path);
        }
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().log.clone()
    }

    fn answer(&self, r: &Recorded) -> (StatusCode, Value) {
        let mut s = self.0.lock().unwrap();
        let p = r.uri.split('?').next().unwrap().to_string();
        if p.ends_with("/events") && r.method == "POST" {
            return (StatusCode::CREATED, r.body.clone());
        }
        let (obj_path, subresource) = match p.strip_suffix("/status") {
            Some(base) => (base.to_string(), true),
            None => (p.clone(), false),
        };
        s.version += 1;
        let version = s.version.to_string();
        let Some(obj) = s.objects.get_mut(&obj_path) else {
            return not_found(&obj_path);
        };
        match r.method.as_str() {
            "GET" => (StatusCode::OK, obj.clone()),
            "PATCH" if subresource && r.content_type == "application/apply-patch+yaml" => {
                // Server-side apply of the status: this operator is the status's only manager.
                obj["status"] = r.body["status"].clone();
                obj["metadata"]["resourceVersion"] = json!(version);
                (StatusCode::OK, obj.clone())
            }
            "PATCH" if r.content_type == "application/json-patch+json" => {
                let patch: json_patch::Patch = serde_json::from_value(r.body.clone()).unwrap();
                if let Err(e) = json_patch::patch(obj, &patch) {
                    return (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "Invalid", "code": 422, "message": e.to_string()}),
                    );
                }
                obj["metadata"]["resourceVersion"] = json!(version);
                let answer = obj.clone();
                let released = answer["metadata"]["deletionTimestamp"].is_string()
                    && answer["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty());
                if released {
                    s.objects.remove(&obj_path);
                }
                (StatusCode::OK, answer)
            }
            other => panic!("the fake API does not serve {other} {}", r.uri),
        }
    }
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

fn plural(kind: &str) -> String {
    format!("{}s", kind.to_lowercase())
}
