"""Where `SlurmAsset` objects live: the Kubernetes API, or a standalone operator's directory.

Both stores hand out objects in the Kubernetes shape (``metadata``, ``spec``, ``status`` as
plain dicts), so everything above them works the same in both modes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

GROUP = "dagster-slurm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SlurmAsset"
PLURAL = "slurmassets"
SESSION_KIND = "SlurmSession"
SESSION_PLURAL = "slurmsessions"

#: Annotation the standalone operator writes with the object's asset key.
ANN_ASSET_KEY = "dagster-slurm.io/asset-key"
#: Annotation the standalone operator writes with the manifest file an object came from.
ANN_SOURCE = "dagster-slurm.io/source"

SlurmAssetObject = dict[str, Any]

# Status files are the operator's own but live in a user's directory: read them with bounds.
_MAX_STATUS_FILE = 8 << 20
_MAX_MANIFEST_FILE = 1 << 20
_MAX_PLAIN_NAME = 200

try:  # libyaml when available: ~10x faster for a sensor reading thousands of status files
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - pure-Python PyYAML
    _Loader = yaml.SafeLoader


class StoreError(Exception):
    """A store could not be read or written."""


class SlurmAssetStore(ABC):
    """The few operations the Dagster integration needs on `SlurmAsset` objects."""

    namespace: str

    @abstractmethod
    def get(self, name: str) -> SlurmAssetObject | None:
        """The whole object (metadata, spec, status), or None when it does not exist."""

    @abstractmethod
    def create_session(self, manifest: SlurmAssetObject) -> bool:
        """Creates a `SlurmSession` unless one of that name exists; True when created."""

    @abstractmethod
    def get_session(self, name: str) -> SlurmAssetObject | None:
        """A `SlurmSession` (metadata, spec, status), or None."""

    @abstractmethod
    def delete_session(self, name: str) -> None:
        """Deletes a `SlurmSession`, which cancels its steps and its allocation."""

    @abstractmethod
    def list_sessions(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        """The `SlurmSession` objects, optionally those matching a label selector."""

    @abstractmethod
    def create(self, manifest: SlurmAssetObject) -> tuple[SlurmAssetObject, bool]:
        """Creates the object unless one of that name exists; returns it and whether it was
        created (False: an existing object was adopted, unchanged)."""

    @abstractmethod
    def replace_spec(
        self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None
    ) -> None:
        """Replaces the spec (and merges annotations) of an object this integration created."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Deletes the object (the operator cancels its job); absent objects are fine."""

    @abstractmethod
    def list(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        """Every object matching the label selector, with metadata and status; ``spec`` may be
        absent (use :meth:`get` for it)."""

    def with_spec(self, obj: SlurmAssetObject) -> SlurmAssetObject:
        """`obj` with its spec, when a listing left it out."""
        if "spec" in obj:
            return obj
        return self.get(obj["metadata"]["name"]) or obj

    def describe(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r})"


def asset_key_of(obj: SlurmAssetObject) -> str | None:
    """`spec.assetKey`, or what the standalone operator recorded of it."""
    spec = obj.get("spec") or {}
    key = spec.get("assetKey")
    if isinstance(key, str):
        return key
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    key = ann.get(ANN_ASSET_KEY)
    return key if isinstance(key, str) else None


# --- label selectors ---------------------------------------------------------------------


def matches_selector(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based Kubernetes label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``,
    comma-separated (all must hold)."""
    if not selector:
        return True
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            k, v = (x.strip() for x in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


# --- standalone directory ----------------------------------------------------------------


class DirectoryStore(SlurmAssetStore):
    """The directory a standalone operator watches (``slurm-asset-operator standalone --dir``).

    Objects this integration creates are written as ``<dir>/<manifests_subdir>/<name>.yaml``
    (atomically, mode 0600: a spec can hold environment values); status is read from the
    operator's ``<dir>/.status/<namespace>/SlurmAsset/<name>.yaml``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        namespace: str = "default",
        manifests_subdir: str = "dagster",
    ) -> None:
        self.root = Path(path).resolve()
        self.namespace = namespace
        # Parsed status files by path, kept while their (mtime, size) holds: a sensor lists
        # thousands of them per tick, and those of ended runs do not change.
        self._parsed: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        self.manifests_dir = self.root / manifests_subdir
        if (
            self.manifests_dir.resolve().parent != self.root
            and self.manifests_dir.resolve() != self.root
        ):
            raise StoreError(f"manifests_subdir must be a folder directly in {self.root}")

    def describe(self) -> str:
        return f"DirectoryStore({str(self.root)!r}, namespace={self.namespace!r})"

    def status_dir(self) -> Path:
        return self.root / ".status" / self.namespace / KIND

    def status_path(self, name: str) -> Path:
        # As the operator names them: `<name>.yaml`, a long name cut and completed by a hash.
        if len(name) <= _MAX_PLAIN_NAME:
            return self.status_dir() / f"{name}.yaml"
        digest = hashlib.sha256(json.dumps(name, ensure_ascii=False).encode()).hexdigest()[:16]
        return self.status_dir() / f"{name[:_MAX_PLAIN_NAME]}-{digest}.yaml"

    def _own_manifest(self, name: str) -> Path:
        return self.manifests_dir / f"{name}.yaml"

    def get(self, name: str) -> SlurmAssetObject | None:
        stored = _read_yaml(self.status_path(name), _MAX_STATUS_FILE)
        manifest_path = self._own_manifest(name)
        if not manifest_path.exists() and stored:
            source = ((stored.get("metadata") or {}).get("annotations") or {}).get(ANN_SOURCE)
            manifest_path = self._confined(source) if isinstance(source, str) else manifest_path
        manifest = self._find_manifest(manifest_path, name) if manifest_path else None
        if manifest is None and stored is None:
            return None
        obj: SlurmAssetObject = {"apiVersion": API_VERSION, "kind": KIND}
        meta: dict[str, Any] = {}
        if manifest is not None:
            meta.update(manifest.get("metadata") or {})
            obj["spec"] = manifest.get("spec") or {}
        if stored is not None:
            smeta = stored.get("metadata") or {}
            for k in ("uid", "generation", "deletionTimestamp"):
                if k in smeta:
                    meta[k] = smeta[k]
            meta["annotations"] = {
                **(smeta.get("annotations") or {}),
                **(meta.get("annotations") or {}),
            }
            obj["status"] = stored.get("status") or {}
        if manifest is None:
            # The manifest is gone: the object is being (or was) deleted.
            meta.setdefault("deletionTimestamp", "unknown")
        meta.setdefault("name", name)
        meta.setdefault("namespace", self.namespace)
        obj["metadata"] = meta
        return obj

    def with_spec(self, obj: SlurmAssetObject) -> SlurmAssetObject:
        if "spec" in obj:
            return obj
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        path = self._own_manifest(name)
        if not path.exists():
            source = (meta.get("annotations") or {}).get(ANN_SOURCE)
            path = self._confined(source) if isinstance(source, str) else None
        manifest = self._find_manifest(path, name) if path else None
        if manifest is None:
            return obj
        merged_meta = {**(manifest.get("metadata") or {}), **meta}
        return {**obj, "metadata": merged_meta, "spec": manifest.get("spec") or {}}

    def _confined(self, source: str) -> Path | None:
        p = Path(source)
        p = (p if p.is_absolute() else self.root / p).resolve()
        return p if p.is_relative_to(self.root) else None

    def _find_manifest(self, path: Path, name: str) -> SlurmAssetObject | None:
        text = _read_text(path, _MAX_MANIFEST_FILE)
        if text is None:
            return None
        try:
            docs = list(yaml.load_all(text, Loader=_Loader))
        except yaml.YAMLError:
            return None
        for d in docs:
            if not isinstance(d, dict) or d.get("kind") != KIND:
                continue
            meta = d.get("metadata") or {}
            if meta.get("name") == name and (meta.get("namespace") or "default") == self.namespace:
                return d
        return None

    def create(self, manifest: SlurmAssetObject) -> tuple[SlurmAssetObject, bool]:
        name = manifest["metadata"]["name"]
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
        target = self._own_manifest(name)
        tmp = self._write_temp(manifest)
        try:
            os.link(tmp, target)  # fails if the name is taken: create-if-absent, atomically
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)
        obj = self.get(name)
        if obj is None:  # pragma: no cover - removed between link and read
            raise StoreError(f"{name}: the manifest vanished right after it was written")
        return obj, created

    def replace_spec(
        self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None
    ) -> None:
        target = self._own_manifest(name)
        current = self._find_manifest(target, name)
        if current is None:
            raise StoreError(
                f"{name}: not an object this integration created in {self.manifests_dir}"
            )
        meta = dict(current.get("metadata") or {})
        meta["annotations"] = {**(meta.get("annotations") or {}), **(annotations or {})}
        tmp = self._write_temp({**current, "metadata": meta, "spec": spec})
        os.replace(tmp, target)

    def delete(self, name: str) -> None:
        self._own_manifest(name).unlink(missing_ok=True)

    def list(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        out = []
        try:
            entries = list(os.scandir(self.status_dir()))
        except FileNotFoundError:
            return []
        parsed: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        for e in entries:
            if not e.name.endswith(".yaml") or not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._parsed.get(e.path)
            if cached and cached[0] == stamp:
                stored = cached[1]
            else:
                stored = _read_yaml(Path(e.path), _MAX_STATUS_FILE)
                if not stored:
                    continue
            parsed[e.path] = (stamp, stored)
            labels = (stored.get("metadata") or {}).get("labels") or {}
            if matches_selector(labels, label_selector):
                out.append(stored)
        self._parsed = parsed
        return out

    # --- sessions: `<manifests>/<name>.session.yaml`, status under `SlurmSession/` ----------

    def _session_manifest(self, name: str) -> Path:
        return self.manifests_dir / f"{name}.session.yaml"

    def _session_status(self, name: str) -> Path:
        return self.root / ".status" / self.namespace / SESSION_KIND / f"{name}.yaml"

    def create_session(self, manifest: SlurmAssetObject) -> bool:
        name = manifest["metadata"]["name"]
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(manifest)
        try:
            os.link(tmp, self._session_manifest(name))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_session(self, name: str) -> SlurmAssetObject | None:
        stored = _read_yaml(self._session_status(name), _MAX_STATUS_FILE)
        text = _read_text(self._session_manifest(name), _MAX_MANIFEST_FILE)
        manifest = yaml.load(text, Loader=_Loader) if text else None
        if stored is None and not isinstance(manifest, dict):
            return None
        obj: SlurmAssetObject = {"apiVersion": API_VERSION, "kind": SESSION_KIND}
        obj["metadata"] = {
            **((manifest or {}).get("metadata") or {}),
            **((stored or {}).get("metadata") or {}),
        }
        if isinstance(manifest, dict):
            obj["spec"] = manifest.get("spec") or {}
        else:
            obj["metadata"].setdefault("deletionTimestamp", "unknown")
        obj["status"] = (stored or {}).get("status") or {}
        return obj

    def delete_session(self, name: str) -> None:
        self._session_manifest(name).unlink(missing_ok=True)

    def list_sessions(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in sorted(self.manifests_dir.glob("*.session.yaml")):
                obj = self.get_session(p.name.removesuffix(".session.yaml"))
                labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
                if obj is not None and matches_selector(labels, label_selector):
                    out.append(obj)
        return out

    def _write_temp(self, manifest: SlurmAssetObject) -> Path:
        # Not `*.yaml`, so the operator never reads a half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.manifests_dir, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(manifest, f, sort_keys=False)
        return Path(tmp)


def _read_text(path: Path, limit: int) -> str | None:
    """A regular file's text, at most `limit` bytes; None for anything else (no symlinks,
    FIFOs or devices: the directory is shared with the users who write manifests)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = f.read(limit + 1)
    if len(data) > limit:
        return None
    return data.decode("utf-8", errors="replace")


def _read_yaml(path: Path, limit: int) -> dict[str, Any] | None:
    text = _read_text(path, limit)
    if text is None:
        return None
    with contextlib.suppress(yaml.YAMLError):
        v = yaml.load(text, Loader=_Loader)
        return v if isinstance(v, dict) else None
    return None


# --- Kubernetes API ----------------------------------------------------------------------


class KubernetesStore(SlurmAssetStore):
    """`SlurmAsset` custom resources through the Kubernetes API.

    Configuration: inside a pod, the pod's ServiceAccount (in-cluster); elsewhere a kubeconfig
    (``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``, optionally a ``context``). The
    namespace defaults to the pod's, else the context's, else ``default``.
    """

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: Any = None,
        request_timeout: float = 30.0,
    ) -> None:
        from kubernetes import client, config

        self._timeout = request_timeout
        if api_client is None:
            cfg = client.Configuration()
            in_cluster = (
                "KUBERNETES_SERVICE_HOST" in os.environ and kubeconfig is None and context is None
            )
            if in_cluster:
                config.load_incluster_config(client_configuration=cfg)
            else:
                config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=cfg
                )
            api_client = client.ApiClient(cfg)
            if namespace is None:
                namespace = _default_namespace(in_cluster, kubeconfig, context)
        self.namespace = namespace or "default"
        self._api = client.CustomObjectsApi(api_client)

    def describe(self) -> str:
        return f"KubernetesStore(namespace={self.namespace!r})"

    def get(self, name: str) -> SlurmAssetObject | None:
        return self._get(PLURAL, "SlurmAsset", name)

    def create(self, manifest: SlurmAssetObject) -> tuple[SlurmAssetObject, bool]:
        name = manifest["metadata"]["name"]
        created = self._create(PLURAL, "SlurmAsset", manifest)
        if created is not None:
            return created, True
        obj = self.get(name)
        if obj is None:
            raise StoreError(f"{name}: exists but cannot be read")
        return obj, False

    def replace_spec(
        self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        body: dict[str, Any] = {"spec": spec}
        if annotations:
            body["metadata"] = {"annotations": annotations}
        try:
            self._api.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, body, _request_timeout=self._timeout
            )
        except ApiException as e:
            raise StoreError(
                f"patch {self.namespace}/{name}: {e.status} {_api_message(e)}"
            ) from None

    def delete(self, name: str) -> None:
        self._delete(PLURAL, "SlurmAsset", name)

    def list(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        return list(self._pages(PLURAL, label_selector))

    def create_session(self, manifest: SlurmAssetObject) -> bool:
        return self._create(SESSION_PLURAL, "SlurmSession", manifest) is not None

    def get_session(self, name: str) -> SlurmAssetObject | None:
        return self._get(SESSION_PLURAL, "SlurmSession", name)

    def delete_session(self, name: str) -> None:
        self._delete(SESSION_PLURAL, "SlurmSession", name)

    def list_sessions(self, label_selector: str | None = None) -> list[SlurmAssetObject]:
        return list(self._pages(SESSION_PLURAL, label_selector))

    # One implementation per verb, for both kinds (``plural`` says which).

    def _get(self, plural: str, kind: str, name: str) -> SlurmAssetObject | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise StoreError(f"get {kind} {self.namespace}/{name}: {e.status} {e.reason}") from None

    def _create(
        self, plural: str, kind: str, manifest: SlurmAssetObject
    ) -> SlurmAssetObject | None:
        """Creates the object (returned); ``None`` when one of that name exists already."""
        from kubernetes.client.exceptions import ApiException

        try:
            created: SlurmAssetObject = self._api.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, manifest, _request_timeout=self._timeout
            )
            return created
        except ApiException as e:
            if e.status == 409:
                return None
            raise StoreError(
                f"create {kind} {self.namespace}/{manifest['metadata']['name']}: {e.status} "
                f"{_api_message(e)}"
            ) from None

    def _delete(self, plural: str, kind: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status != 404:
                raise StoreError(
                    f"delete {kind} {self.namespace}/{name}: {e.status} {e.reason}"
                ) from None

    def _pages(self, plural: str, label_selector: str | None) -> Iterator[SlurmAssetObject]:
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": 500, "_request_timeout": self._timeout}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if token:
                kwargs["_continue"] = token
            page = self._api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, **kwargs
            )
            yield from page.get("items", [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return


def _api_message(e: Any) -> str:
    with contextlib.suppress(Exception):
        return json.loads(e.body).get("message", e.reason)
    return str(e.reason)


def _default_namespace(in_cluster: bool, kubeconfig: str | None, context: str | None) -> str:
    if in_cluster:
        with contextlib.suppress(OSError):
            return (
                Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
            )
        return "default"
    from kubernetes import config

    with contextlib.suppress(Exception):
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        return (chosen or {}).get("context", {}).get("namespace") or "default"
    return "default"
