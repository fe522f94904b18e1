#!/usr/bin/env python3
"""A stateful Kubernetes API emulator on loopback, with a Job runner.

No real API server can be installed on the build machines, so the operator's
end-to-end test (tests/tests/operator_emulated.rs) runs the real
`eventplane-operator` binary against this server instead. It is plain HTTP
on 127.0.0.1, written directly on aiohttp: kmock's `KubernetesEmulator` was
the starting point, but its writes are plain dict merges inside a private
handler (no resourceVersion, no label selectors, no subresources, no patch
types), so nearly all of it would have had to be replaced.

What it does
  * Serves discovery (/api, /apis, /version) for the built-in kinds below
    and every CustomResourceDefinition loaded with --crd or created through
    the API (CRDs get Established/NamesAccepted at once).
  * Built-in kinds: namespaces, secrets, configmaps, pods (+ /log), events,
    services, serviceaccounts (core/v1); deployments (apps/v1, /status,
    /scale); jobs (batch/v1, /status); leases (coordination.k8s.io/v1);
    events (events.k8s.io/v1); customresourcedefinitions.
  * get, list (label and field selectors, limit/continue), watch (from a
    resourceVersion, or with synthetic ADDED events for rv 0/absent and for
    sendInitialEvents, with the initial-events-end bookmark; timeoutSeconds;
    objects leaving or entering a label selector become DELETED/ADDED),
    create (generateName, dryRun), replace (resourceVersion precondition:
    409 on mismatch), delete and deletecollection (preconditions,
    propagationPolicy), and PATCH as merge patch, strategic merge patch
    (treated as a merge patch), JSON patch (RFC 6902, where a `test` of an
    absent path compares against null, as the real server does) and
    server-side apply (application/apply-patch+yaml, fieldManager, force).
  * Metadata: one resourceVersion counter for all kinds, bumped by every
    write and carried by watch events; uid, creationTimestamp; generation
    starts at 1 and is bumped when anything outside metadata and status
    changes; writes that change nothing bump nothing and notify no one.
  * managedFields per (manager, operation, subresource). Server-side apply
    merges the applied object, removes fields its manager applied before
    and left out (unless another manager also owns them), and answers 409
    with the real server's message when a non-forced apply changes a field
    another manager owns; forced applies and updates take fields over.
  * Subresources: a write to /status changes only status, a write to the
    main resource never changes status (for kinds with a status
    subresource); /scale maps to the CRD's specReplicasPath (or a
    Deployment's spec.replicas).
  * Deletion: an object with finalizers gets deletionTimestamp and stays
    until its finalizers are emptied; then it is removed. Removing an object
    deletes its dependents (ownerReferences) unless other owners remain;
    Orphan propagation strips the references instead. Namespaces exist
    (default, kube-system, kube-public, kube-node-lease), creating in a
    missing one is a 404, deleting one deletes its contents.
  * Secrets: stringData is folded into base64 data, as the server does.
  * Jobs: backoffLimit defaults to 6, template labels get job-name and
    controller-uid (so a Job name over 63 characters is refused, as for
    real), spec.template and spec.selector are immutable. The Job runner
    runs each new Job's first container as a local process: the image is
    mapped to a local binary (--image NAME=PATH; NAME matches the whole
    image or its repository's last path component, tag dropped),
    `command`/`args` as the kubelet would combine them, `env` with value,
    secretKeyRef/configMapKeyRef (optional honoured) and fieldRef
    (metadata.name/namespace) resolved from the emulator's objects. Each
    attempt is a Pod object (Pending, Running, Succeeded/Failed with the
    exit code; its output at /log and on this server's stderr). The Job's
    status follows the real controller's: startTime, active, succeeded or
    failed counts, SuccessCriteriaMet + Complete, or FailureTarget + Failed
    (BackoffLimitExceeded after backoffLimit retries, DeadlineExceeded
    after activeDeadlineSeconds), completionTime; ttlSecondsAfterFinished
    deletes it. A deleted Job's process is killed.
  * Names and label keys/values are checked for the real length and
    character rules.

What it does NOT check or do (a real cluster still matters for these)
  * No authentication, authorization or RBAC: any token, or none, may do
    anything. No admission (webhooks, quotas, limit ranges, pod security).
  * No validation against a CRD's OpenAPI schema, no CEL
    x-kubernetes-validations (so immutability rules such as a
    Projection's spec.table are not enforced), no schema defaulting, no
    pruning of unknown fields, no version conversion; built-in kinds are
    not validated beyond names and labels.
  * Server-side apply treats every list as atomic (listType=map/set merging
    by key, e.g. conditions by type or containers by name, is not
    emulated), and strategic merge patch is a plain JSON merge patch.
  * resourceVersionMatch and list resourceVersion semantics: lists always
    answer the latest state. Watch history is never compacted, so a watch
    never gets 410 Gone. No watch bookmarks other than the initial-events
    one. No field selectors beyond dotted-path equality.
  * Core/v1 and events.k8s.io/v1 Events are separate stores (the real
    server shows one object through both). No Event aggregation.
  * Garbage collection is immediate: Foreground deletion deletes the
    dependents first but does not wait on their finalizers, and
    blockOwnerDeletion is ignored.
  * No controllers other than the Job runner: Deployments get no
    ReplicaSets, Pods or status; Services no endpoints; nothing schedules.
  * The Job runner runs one pod to one completion (parallelism, completions,
    indexed Jobs, pod failure policies, suspend toggling and init or sidecar
    containers are not emulated), retries after --job-retry-delay seconds
    instead of the exponential back-off, runs as this server's user in its
    working directory with no image, filesystem, securityContext, resource
    limits, volumes or network isolation, and passes the container only its
    declared environment plus PATH, HOME, HOSTNAME and the --pass-env names. A secretKeyRef that
    cannot be resolved keeps the pod Pending (CreateContainerConfigError),
    an unmapped image keeps it Pending (ErrImagePull), as on a real node.
"""

import argparse
import asyncio
import base64
import copy
import datetime
import json
import os
import random
import re
import signal
import string
import sys
import threading
import time
import traceback
import uuid

try:
    import yaml
    from aiohttp import web
except ImportError as err:  # pragma: no cover - reported to the test
    sys.stderr.write(
        f"emulator: missing Python package ({err}); install with: pip install aiohttp pyyaml\n"
    )
    sys.exit(3)


# libyaml's loader when present: the CRDs take seconds with the pure one.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Set by the emulator's own unit tests.
QUIET = False


def log(message):
    if QUIET:
        return
    sys.stderr.write(f"emulator: {message}\n")
    sys.stderr.flush()


def now_time():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def body(self):
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(res, name):
    return ApiError(
        404,
        "NotFound",
        f'{res.plural}{"." + res.group if res.group else ""} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def invalid(res, name, message):
    return ApiError(
        422,
        "Invalid",
        f'{res.kind} "{name}" is invalid: {message}',
        {"name": name, "group": res.group, "kind": res.kind},
    )


# ---------------------------------------------------------------- resources


class Resource:
    def __init__(
        self,
        group,
        version,
        plural,
        kind,
        namespaced,
        singular=None,
        short_names=(),
        categories=(),
        subresources=(),
        scale=None,
    ):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.namespaced = namespaced
        self.singular = singular or kind.lower()
        self.short_names = list(short_names)
        self.categories = list(categories)
        self.subresources = set(subresources)
        # specReplicasPath, statusReplicasPath, labelSelectorPath
        self.scale = scale

    @property
    def key(self):
        # Every served version of a kind shares one store.
        return (self.group, self.plural)

    @property
    def api_version(self):
        return self.version if self.group == "" else f"{self.group}/{self.version}"

    @property
    def has_status(self):
        return "status" in self.subresources

    def discovery(self):
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        entries = [
            {
                "name": self.plural,
                "singularName": self.singular,
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": verbs,
                "shortNames": self.short_names,
                "categories": self.categories,
            }
        ]
        for sub in sorted(self.subresources):
            kind = "Scale" if sub == "scale" else self.kind
            entry = {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "verbs": ["get"] if sub == "log" else ["get", "patch", "update"],
            }
            if sub == "scale":
                entry["group"] = "autoscaling"
                entry["version"] = "v1"
            entries.append(entry)
        return entries


BUILTIN = [
    Resource("", "v1", "namespaces", "Namespace", False, short_names=["ns"], subresources=["status"]),
    Resource("", "v1", "secrets", "Secret", True),
    Resource("", "v1", "configmaps", "ConfigMap", True, short_names=["cm"]),
    Resource("", "v1", "pods", "Pod", True, short_names=["po"], subresources=["status", "log"]),
    Resource("", "v1", "events", "Event", True, short_names=["ev"]),
    Resource("", "v1", "services", "Service", True, short_names=["svc"], subresources=["status"]),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=["sa"]),
    Resource(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        short_names=["deploy"],
        subresources=["status", "scale"],
        scale={
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": None,
        },
    ),
    Resource("batch", "v1", "jobs", "Job", True, subresources=["status"]),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource("events.k8s.io", "v1", "events", "Event", True, short_names=["ev"]),
    Resource(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        short_names=["crd", "crds"],
        subresources=["status"],
    ),
]

NAMESPACES = ("", "namespaces")
PODS = ("", "pods")
JOBS = ("batch", "jobs")
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")

# ---------------------------------------------------------------- helpers

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def validate_meta(res, obj):
    meta = obj["metadata"]
    name = meta.get("name", "")
    if not name:
        raise invalid(res, name, "metadata.name: Required value: name or generateName is required")
    if len(name) > 253 or not NAME_RE.match(name):
        raise invalid(
            res,
            name,
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of'
            " lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    check_labels(res, name, meta.get("labels"), "metadata.labels")
    if res.key == JOBS:
        template = (obj.get("spec") or {}).get("template") or {}
        check_labels(res, name, (template.get("metadata") or {}).get("labels"), "spec.template.labels")


def check_labels(res, name, labels, where):
    for key, value in (labels or {}).items():
        prefix, _, local = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not NAME_RE.match(prefix)):
            raise invalid(res, name, f'{where}: Invalid value: "{key}": prefix part must be a DNS-1123 subdomain')
        if len(local) > 63 or not LABEL_NAME_RE.match(local):
            raise invalid(res, name, f'{where}: Invalid value: "{key}": name part must be no more than 63 characters')
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE_RE.match(value):
            raise invalid(res, name, f'{where}: Invalid value: "{value}": must be no more than 63 characters')


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def deep_merge(target, applied):
    """Server-side apply's merge: maps recursively, everything else replaced."""
    for key, value in applied.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def pointer_get(doc, tokens):
    for token in tokens:
        if isinstance(doc, dict):
            doc = doc[token]
        elif isinstance(doc, list):
            if not token.isdigit():
                raise KeyError(token)
            doc = doc[int(token)]
        else:
            raise KeyError(token)
    return doc


def json_patch(doc, ops):
    """RFC 6902, on a copy of doc."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")

    def fail(op, why):
        return ApiError(422, "Invalid", f"the server rejected our request: {op.get('op')} {op.get('path')}: {why}")

    def add(tokens, value, op):
        if not tokens:
            return value
        try:
            parent = pointer_get(doc, tokens[:-1])
        except (KeyError, IndexError):
            raise fail(op, "doc is missing path")
        key = tokens[-1]
        if isinstance(parent, dict):
            parent[key] = value
        elif isinstance(parent, list):
            if key == "-":
                parent.append(value)
            elif key.isdigit() and int(key) <= len(parent):
                parent.insert(int(key), value)
            else:
                raise fail(op, "index out of range")
        else:
            raise fail(op, "parent is not a container")
        return doc

    def remove(tokens, op):
        try:
            parent = pointer_get(doc, tokens[:-1])
            key = tokens[-1]
            if isinstance(parent, dict):
                return parent.pop(key)
            if isinstance(parent, list) and key.isdigit():
                return parent.pop(int(key))
        except (KeyError, IndexError):
            pass
        raise fail(op, "doc is missing path")

    for op in ops:
        kind = op.get("op")
        tokens = pointer(op.get("path", ""))
        if kind == "test":
            try:
                current = pointer_get(doc, tokens)
            except (KeyError, IndexError):
                # The real server compares an absent path as null.
                current = None
            if current != op.get("value"):
                raise fail(op, "test failed")
        elif kind == "add":
            doc = add(tokens, copy.deepcopy(op.get("value")), op)
        elif kind == "remove":
            remove(tokens, op)
        elif kind == "replace":
            try:
                pointer_get(doc, tokens)
            except (KeyError, IndexError):
                raise fail(op, "doc is missing path")
            if tokens:
                remove(tokens, op)
            doc = add(tokens, copy.deepcopy(op.get("value")), op)
        elif kind in ("move", "copy"):
            source = pointer(op.get("from", ""))
            try:
                value = copy.deepcopy(pointer_get(doc, source))
            except (KeyError, IndexError):
                raise fail(op, "from path missing")
            if kind == "move":
                remove(source, op)
            doc = add(tokens, value, op)
        else:
            raise ApiError(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    return doc


def dotted_get(obj, path):
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def dotted_set(obj, path, value):
    parts = path.strip(".").split(".")
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


# ---------------------------------------------------------------- selectors


def split_top(text):
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text):
    requirements = []
    for part in split_top(text or ""):
        m = re.match(r"^(\S+)\s+(in|notin)\s+\((.*)\)$", part)
        if m:
            values = {v.strip() for v in m.group(3).split(",") if v.strip()}
            requirements.append((m.group(1), m.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", value.strip()))
        elif "==" in part:
            key, value = part.split("==", 1)
            requirements.append((key.strip(), "=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            requirements.append((key.strip(), "=", value.strip()))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", None))
        else:
            requirements.append((part, "exists", None))
    return requirements


def labels_match(requirements, labels):
    labels = labels or {}
    for key, op, value in requirements:
        present = key in labels
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and present and labels[key] == value:
            return False
        if op == "in" and labels.get(key) not in value:
            return False
        if op == "notin" and present and labels[key] in value:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


def parse_field_selector(text):
    requirements = []
    for part in split_top(text or ""):
        if "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), False, value.strip()))
        elif "==" in part:
            key, value = part.split("==", 1)
            requirements.append((key.strip(), True, value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            requirements.append((key.strip(), True, value.strip()))
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector {part!r}")
    return requirements


def fields_match(requirements, obj):
    for path, equal, value in requirements:
        actual = dotted_get(obj, path)
        actual = "" if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
        if (actual == value) != equal:
            return False
    return True


class Selector:
    def __init__(self, namespace, label_selector, field_selector):
        self.namespace = namespace
        self.labels = parse_label_selector(label_selector)
        self.fields = parse_field_selector(field_selector)

    def matches(self, obj):
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return labels_match(self.labels, meta.get("labels")) and fields_match(self.fields, obj)


# ---------------------------------------------------------------- field ownership


def leaves(value, prefix=()):
    if isinstance(value, dict) and value:
        out = set()
        for key, item in value.items():
            out |= leaves(item, prefix + (key,))
        return out
    return {prefix} if prefix else set()


def path_get(obj, path):
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return KeyError
        obj = obj[part]
    return obj


def path_remove(obj, path):
    """Removes path and then every map on the way that it left empty."""
    chain = [obj]
    for part in path[:-1]:
        nxt = chain[-1].get(part) if isinstance(chain[-1], dict) else None
        if not isinstance(nxt, dict):
            return
        chain.append(nxt)
    chain[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if chain[depth] == {}:
            chain[depth - 1].pop(path[depth - 1], None)
        else:
            break


def overlaps(a, b):
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def owned_view(res, obj, subresource):
    """The part of an object that field managers can own."""
    if subresource == "status":
        return {"status": copy.deepcopy(obj.get("status"))} if obj.get("status") is not None else {}
    view = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    if res.has_status:
        view.pop("status", None)
    meta = {k: copy.deepcopy(v) for k, v in obj.get("metadata", {}).items() if k in ("labels", "annotations", "finalizers", "ownerReferences")}
    if meta:
        view["metadata"] = meta
    return view


def fields_v1(paths):
    tree = {}
    for path in sorted(paths):
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def from_fields_v1(tree, prefix=()):
    paths = set()
    for key, sub in (tree or {}).items():
        if key == ".":
            continue
        if not key.startswith("f:"):
            # k:/v:/i: entries belong to lists, which are atomic here.
            paths.add(prefix)
            continue
        path = prefix + (key[2:],)
        if isinstance(sub, dict) and any(k != "." for k in sub):
            paths |= from_fields_v1(sub, path)
        else:
            paths.add(path)
    return {p for p in paths if p}


class Ownership:
    """metadata.managedFields as sets of paths."""

    def __init__(self, meta, api_version):
        self.api_version = api_version
        self.entries = []  # [manager, operation, subresource, paths, time]
        for entry in meta.get("managedFields") or []:
            self.entries.append(
                [
                    entry.get("manager", ""),
                    entry.get("operation", "Update"),
                    entry.get("subresource"),
                    from_fields_v1(entry.get("fieldsV1")),
                    entry.get("time"),
                ]
            )

    def entry(self, manager, operation, subresource):
        for e in self.entries:
            if e[0] == manager and e[1] == operation and e[2] == subresource:
                return e
        e = [manager, operation, subresource, set(), None]
        self.entries.append(e)
        return e

    def release(self, paths, keep=None):
        for e in self.entries:
            if e is keep:
                continue
            e[3] = {q for q in e[3] if not any(overlaps(q, p) for p in paths)}

    def owned_by_others(self, path, me):
        return any(e is not me and any(overlaps(q, path) for q in e[3]) for e in self.entries)

    def render(self):
        out = []
        for manager, operation, subresource, paths, at in self.entries:
            if not paths:
                continue
            entry = {
                "manager": manager,
                "operation": operation,
                "apiVersion": self.api_version,
                "time": at or now_time(),
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(paths),
            }
            if subresource:
                entry["subresource"] = subresource
            out.append(entry)
        return out


def record_update(res, old, new, manager, subresource):
    """Ownership after a non-apply write: changed fields go to the writer."""
    own = Ownership(old["metadata"] if old else {}, res.api_version)
    before = owned_view(res, old, subresource) if old else {}
    after = owned_view(res, new, subresource)
    changed = {p for p in leaves(after) if path_get(before, p) != path_get(after, p)}
    removed = {p for p in leaves(before) if path_get(after, p) is KeyError}
    own.release(removed)
    if changed:
        mine = own.entry(manager, "Update", subresource)
        own.release(changed, keep=mine)
        mine[3] = {q for q in mine[3] if not any(overlaps(q, p) for p in removed)} | changed
        mine[4] = now_time()
    new["metadata"]["managedFields"] = own.render()


def server_side_apply(res, current, applied, manager, subresource, force):
    """Returns the object after applying `applied` (already reduced to what
    the manager may set) on `current` (None: creation)."""
    base = copy.deepcopy(current) if current else {"metadata": {}}
    own = Ownership(base["metadata"], res.api_version)
    mine = own.entry(manager, "Apply", subresource)
    new_paths = leaves(applied)
    conflicts = []
    for e in own.entries:
        if e is mine:
            continue
        for q in e[3]:
            for p in new_paths:
                if overlaps(p, q) and path_get(base, p) != path_get(applied, p):
                    conflicts.append((e[0], p))
    if conflicts and not force:
        described = "\n".join(f'- conflict with "{m}" using {res.api_version}: .{".".join(p)}' for m, p in conflicts)
        if len(conflicts) == 1:
            m, p = conflicts[0]
            message = f'Apply failed with 1 conflict: conflict with "{m}" using {res.api_version}: .{".".join(p)}'
        else:
            message = f"Apply failed with {len(conflicts)} conflicts: {described}"
        raise ApiError(409, "Conflict", message, {"causes": [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": "." + ".".join(p)} for m, p in conflicts]})
    if conflicts:
        own.release({p for _, p in conflicts}, keep=mine)
    # Fields this manager applied before and left out now are released, and
    # removed when no one else owns them.
    for path in mine[3] - new_paths:
        if any(overlaps(path, p) for p in new_paths):
            continue
        if not own.owned_by_others(path, mine):
            path_remove(base, path)
    if mine[3] != new_paths or any(path_get(base, p) != path_get(applied, p) for p in new_paths):
        mine[4] = now_time()
    mine[3] = new_paths
    deep_merge(base, applied)
    base.setdefault("metadata", {})["managedFields"] = own.render()
    return base


# ---------------------------------------------------------------- the store


class Watcher:
    def __init__(self, selector):
        self.selector = selector
        self.queue = asyncio.Queue()

    def translate(self, event):
        rv, etype, obj, old = event
        now_in = self.selector.matches(obj)
        if etype == "ADDED":
            return ("ADDED", obj) if now_in else None
        if etype == "DELETED":
            return ("DELETED", obj) if now_in or (old is not None and self.selector.matches(old)) else None
        was_in = old is not None and self.selector.matches(old)
        if was_in and now_in:
            return ("MODIFIED", obj)
        if now_in:
            return ("ADDED", obj)
        if was_in:
            return ("DELETED", obj)
        return None

    def offer(self, event):
        translated = self.translate(event)
        if translated:
            self.queue.put_nowait(translated)


class Store:
    def __init__(self):
        self.rv = 0
        self.resources = {}  # (group, version, plural) -> Resource
        self.objects = {}  # (group, plural) -> {(namespace, name): obj}
        self.history = {}  # (group, plural) -> [(rv, type, obj, old)]
        self.watchers = {}  # (group, plural) -> set[Watcher]
        self.hooks = []
        self.pod_logs = {}
        for res in BUILTIN:
            self.register(res)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.lookup("", "v1", "namespaces"), None, {"metadata": {"name": ns}}, "emulator")

    # -- registry

    def register(self, res):
        self.resources[(res.group, res.version, res.plural)] = res
        self.objects.setdefault(res.key, {})
        self.history.setdefault(res.key, [])
        self.watchers.setdefault(res.key, set())

    def lookup(self, group, version, plural):
        return self.resources.get((group, version, plural))

    def by_key(self, key):
        for res in self.resources.values():
            if res.key == key:
                return res
        return None

    def register_crd(self, crd):
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        namespaced = spec.get("scope", "Namespaced") == "Namespaced"
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            subs = version.get("subresources") or {}
            self.register(
                Resource(
                    spec["group"],
                    version["name"],
                    names["plural"],
                    names["kind"],
                    namespaced,
                    singular=names.get("singular"),
                    short_names=names.get("shortNames") or [],
                    categories=names.get("categories") or [],
                    subresources=[s for s in ("status", "scale") if s in subs],
                    scale=subs.get("scale"),
                )
            )

    def unregister_crd(self, crd):
        spec = crd.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural")
        key = (spec.get("group"), plural)
        res = self.by_key(key)
        if res is None:
            return
        for (ns, name) in list(self.objects.get(key, {})):
            self.remove(res, ns, name)
        for k in [k for k, r in self.resources.items() if r.key == key]:
            del self.resources[k]

    # -- reads

    def get(self, res, namespace, name):
        return self.objects[res.key].get((namespace if res.namespaced else None, name))

    def list(self, res, selector):
        items = [o for o in self.objects[res.key].values() if selector.matches(o)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return items

    def subscribe(self, res, watcher):
        self.watchers[res.key].add(watcher)

    def unsubscribe(self, res, watcher):
        self.watchers[res.key].discard(watcher)

    # -- writes

    def _commit(self, res, etype, obj, old):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        slot = (meta.get("namespace"), meta["name"])
        if etype == "DELETED":
            self.objects[res.key].pop(slot, None)
        else:
            self.objects[res.key][slot] = obj
        event = (self.rv, etype, copy.deepcopy(obj), copy.deepcopy(old) if old else None)
        self.history[res.key].append(event)
        for watcher in list(self.watchers[res.key]):
            watcher.offer(event)
        for hook in self.hooks:
            try:
                hook(res, etype, obj, old)
            except Exception:  # a hook must never break a write
                log("hook failed:\n" + traceback.format_exc())
        return obj

    def _check_namespace(self, res, namespace):
        if not res.namespaced:
            return
        ns = self.objects[NAMESPACES].get((None, namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{res.plural} is forbidden: unable to create new content in namespace {namespace} because it is being terminated',
            )

    def _finish(self, res, obj, old, subresource):
        """Server-side fields, defaults and checks of a write's result."""
        obj["apiVersion"] = res.api_version
        obj["kind"] = res.kind
        meta = obj.setdefault("metadata", {})
        if old is not None:
            keep = old["metadata"]
            for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "name", "namespace"):
                if field in keep:
                    meta[field] = keep[field]
                else:
                    meta.pop(field, None)
            if subresource == "status":
                # A status write changes only the status.
                fresh = copy.deepcopy(old)
                if obj.get("status") is not None:
                    fresh["status"] = obj["status"]
                else:
                    fresh.pop("status", None)
                fresh["metadata"]["managedFields"] = meta.get("managedFields", [])
                obj.clear()
                obj.update(fresh)
                meta = obj["metadata"]
            elif res.has_status:
                if old.get("status") is not None:
                    obj["status"] = copy.deepcopy(old["status"])
                else:
                    obj.pop("status", None)
            if content(old) != content(obj):
                meta["generation"] = int(keep.get("generation", 1)) + 1
            else:
                meta["generation"] = keep.get("generation", 1)
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_time()
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            meta.pop("deletionGracePeriodSeconds", None)
            if res.has_status:
                obj.pop("status", None)
        for field in [k for k, v in meta.items() if v in (None, [], {}) and k not in ("name",)]:
            if field != "managedFields":
                meta.pop(field)
        self._kind_rules(res, obj, old)
        validate_meta(res, obj)
        return obj

    def _kind_rules(self, res, obj, old):
        meta = obj["metadata"]
        if res.key == ("", "secrets"):
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            for key, value in data.items():
                try:
                    base64.b64decode(value, validate=True)
                except Exception:
                    raise invalid(res, meta["name"], f"data[{key}]: Invalid value: not base64")
            if not data:
                obj.pop("data")
            obj.setdefault("type", "Opaque")
        elif res.key == ("apps", "deployments"):
            obj.setdefault("spec", {}).setdefault("replicas", 1)
        elif res.key == JOBS:
            spec = obj.setdefault("spec", {})
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            if old is None:
                uid = meta["uid"]
                extra = {
                    "batch.kubernetes.io/controller-uid": uid,
                    "batch.kubernetes.io/job-name": meta["name"],
                    "controller-uid": uid,
                    "job-name": meta["name"],
                }
                template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
                template_meta.setdefault("labels", {}).update(extra)
                spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
            else:
                for field in ("template", "selector", "completions"):
                    if (old.get("spec") or {}).get(field) != spec.get(field):
                        raise invalid(res, meta["name"], f"spec.{field}: Invalid value: field is immutable")
        elif res.key == CRDS:
            spec = obj.get("spec") or {}
            names = spec.get("names") or {}
            storage = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
            previous = ((old or {}).get("status") or {}).get("conditions")
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": storage,
                "conditions": previous
                or [
                    {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now_time()}
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    )
                ],
            }

    def create(self, res, namespace, body, manager, dry_run=False, subresource=None, applied=False):
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            body_ns = meta.get("namespace")
            if namespace is None:
                raise ApiError(405, "MethodNotAllowed", f"{res.plural} must be created in a namespace")
            if body_ns and body_ns != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        self._check_namespace(res, namespace)
        if self.get(res, namespace, meta.get("name", "")) is not None:
            name = meta["name"]
            raise ApiError(
                409,
                "AlreadyExists",
                f'{res.plural}{"." + res.group if res.group else ""} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        meta.pop("resourceVersion", None)
        self._finish(res, obj, None, subresource)
        if not applied:
            record_update(res, None, obj, manager, None)
        if dry_run:
            return obj
        obj = self._commit(res, "ADDED", obj, None)
        if res.key == CRDS:
            self.register_crd(obj)
        return obj

    def update(self, res, namespace, name, change, manager, subresource=None, dry_run=False, applied=False):
        """`change(copy_of_current)` returns the wanted object."""
        old = self.get(res, namespace, name)
        if old is None:
            raise not_found(res, name)
        wanted = change(copy.deepcopy(old))
        meta = wanted.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if res.namespaced and meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace on the URL")
        asked = meta.get("resourceVersion")
        if asked and asked != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural}{"." + res.group if res.group else ""} "{name}": '
                "the object has been modified; please apply your changes to the latest version and try again",
                {"name": name, "group": res.group, "kind": res.plural},
            )
        self._finish(res, wanted, old, subresource)
        if not applied:
            record_update(res, old, wanted, manager, subresource)
        meta = wanted["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if same(old, wanted):
            return old
        if dry_run:
            return wanted
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            gone = self._commit(res, "MODIFIED", wanted, old)
            return self.remove(res, namespace, name) or gone
        obj = self._commit(res, "MODIFIED", wanted, old)
        if res.key == CRDS:
            self.register_crd(obj)
        return obj

    def apply(self, res, namespace, name, body, manager, subresource, force, dry_run=False):
        applied = drop_nulls(copy.deepcopy(body))
        if not isinstance(applied, dict):
            raise ApiError(400, "BadRequest", "an applied configuration must be an object")
        meta = applied.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if res.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace on the URL")
        asked = meta.get("resourceVersion")
        for key in ("apiVersion", "kind"):
            applied.pop(key, None)
        kept_meta = {k: v for k, v in meta.items() if k in ("labels", "annotations", "finalizers", "ownerReferences")}
        if subresource == "status":
            applied = {"status": applied["status"]} if "status" in applied else {}
        else:
            if res.has_status:
                applied.pop("status", None)
            applied.pop("metadata", None)
            if kept_meta:
                applied["metadata"] = kept_meta
        current = self.get(res, namespace, name)
        if current is None:
            if subresource:
                raise not_found(res, name)
            obj = server_side_apply(res, None, applied, manager, None, force)
            obj["metadata"].update({"name": name})
            return self.create(res, namespace, obj, manager, dry_run=dry_run, applied=True)

        def change(obj):
            merged = server_side_apply(res, obj, applied, manager, subresource, force)
            if asked:
                merged["metadata"]["resourceVersion"] = asked
            return merged

        return self.update(res, namespace, name, change, manager, subresource, dry_run=dry_run, applied=True)

    def delete(self, res, namespace, name, propagation="Background", preconditions=None, dry_run=False):
        obj = self.get(res, namespace, name)
        if obj is None:
            raise not_found(res, name)
        meta = obj["metadata"]
        preconditions = preconditions or {}
        for field, key in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
            if preconditions.get(field) and preconditions[field] != meta.get(key):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field}: {preconditions[field]}, object {key}: {meta.get(key)}",
                )
        if dry_run:
            return obj
        if propagation == "Orphan":
            self._orphan(meta["uid"])
        elif propagation == "Foreground":
            self._collect(meta["uid"], "Foreground")
        if res.key == NAMESPACES:
            return self._delete_namespace(res, obj)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return obj
            wanted = copy.deepcopy(obj)
            wanted["metadata"]["deletionTimestamp"] = now_time()
            wanted["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(res, "MODIFIED", wanted, obj)
        return self.remove(res, namespace, name)

    def _delete_namespace(self, res, ns_obj):
        name = ns_obj["metadata"]["name"]
        if not ns_obj["metadata"].get("deletionTimestamp"):
            wanted = copy.deepcopy(ns_obj)
            wanted["metadata"]["deletionTimestamp"] = now_time()
            wanted.setdefault("status", {})["phase"] = "Terminating"
            self._commit(res, "MODIFIED", wanted, ns_obj)
        for other in list(self.resources.values()):
            if not other.namespaced or other.version != self.by_key(other.key).version:
                continue
            for (ns, obj_name) in list(self.objects[other.key]):
                if ns == name and self.get(other, ns, obj_name) is not None:
                    self.delete(other, ns, obj_name)
        return self._namespace_maybe_gone(name) or self.get(res, None, name)

    def _namespace_maybe_gone(self, name):
        ns_obj = self.objects[NAMESPACES].get((None, name))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return None
        for key, bucket in self.objects.items():
            if key != NAMESPACES and any(ns == name for ns, _ in bucket):
                return None
        return self.remove(self.by_key(NAMESPACES), None, name)

    def remove(self, res, namespace, name):
        obj = self.get(res, namespace, name)
        if obj is None:
            return None
        gone = copy.deepcopy(obj)
        self._commit(res, "DELETED", gone, obj)
        if res.key == CRDS:
            self.unregister_crd(gone)
        self._collect(gone["metadata"]["uid"], "Background")
        if namespace:
            self._namespace_maybe_gone(namespace)
        return gone

    def _dependents(self, uid):
        for key, bucket in list(self.objects.items()):
            for obj in list(bucket.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    yield self.by_key(key), obj

    def _alive(self, uid):
        return any(o["metadata"].get("uid") == uid for b in self.objects.values() for o in b.values())

    def _collect(self, uid, propagation):
        for res, obj in list(self._dependents(uid)):
            meta = obj["metadata"]
            others = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != uid and self._alive(r.get("uid"))]
            if others:
                self.update(res, meta.get("namespace"), meta["name"], lambda o: strip_owner(o, uid), "generic-garbage-collector")
            elif self.get(res, meta.get("namespace"), meta["name"]) is not None:
                self.delete(res, meta.get("namespace"), meta["name"], propagation=propagation)

    def _orphan(self, uid):
        for res, obj in list(self._dependents(uid)):
            meta = obj["metadata"]
            self.update(res, meta.get("namespace"), meta["name"], lambda o: strip_owner(o, uid), "generic-garbage-collector")


def strip_owner(obj, uid):
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    obj["metadata"]["ownerReferences"] = refs
    return obj


def content(obj):
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}


def same(a, b):
    def strip(o):
        o = copy.deepcopy(o)
        o["metadata"].pop("managedFields", None)
        o["metadata"].pop("resourceVersion", None)
        return o

    if strip(a) != strip(b):
        return False
    fields = lambda o: [(e.get("manager"), e.get("operation"), e.get("subresource"), e.get("fieldsV1")) for e in o["metadata"].get("managedFields") or []]
    return fields(a) == fields(b)


# ---------------------------------------------------------------- the Job runner


def die_with_parent():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Unready(Exception):
    """A pod cannot start yet (as a kubelet would keep it Pending)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason
        self.message = message


class JobRunner:
    def __init__(self, store, images, retry_delay, pass_env=()):
        self.store = store
        self.images = images
        self.retry_delay = retry_delay
        self.pass_env = list(pass_env)
        self.tasks = {}  # job uid -> Task
        self.processes = {}  # pod uid -> Process
        store.hooks.append(self.on_event)

    def jobs(self):
        return self.store.by_key(JOBS)

    def pods(self):
        return self.store.by_key(PODS)

    def on_event(self, res, etype, obj, old):
        meta = obj["metadata"]
        if res.key == JOBS:
            uid = meta["uid"]
            if etype == "DELETED" or meta.get("deletionTimestamp"):
                task = self.tasks.pop(uid, None)
                if task:
                    task.cancel()
            elif uid not in self.tasks and not job_finished(obj) and not (obj.get("spec") or {}).get("suspend"):
                self.tasks[uid] = asyncio.get_running_loop().create_task(self.run(meta["namespace"], meta["name"], uid))
        elif res.key == PODS and etype == "DELETED":
            proc = self.processes.get(meta["uid"])
            if proc:
                kill_group(proc)

    def current(self, namespace, name, uid):
        job = self.store.get(self.jobs(), namespace, name)
        if job is None or job["metadata"]["uid"] != uid:
            raise asyncio.CancelledError()
        return job

    def job_status(self, namespace, name, uid, change):
        self.current(namespace, name, uid)

        def apply(obj):
            status = obj.setdefault("status", {})
            change(status)
            return obj

        self.store.update(self.jobs(), namespace, name, apply, "kube-controller-manager", subresource="status")

    def pod_status(self, namespace, name, status):
        if self.store.get(self.pods(), namespace, name) is None:
            return

        def apply(obj):
            obj["status"] = status
            return obj

        self.store.update(self.pods(), namespace, name, apply, "kubelet", subresource="status")

    async def run(self, namespace, name, uid):
        try:
            job = self.current(namespace, name, uid)
            spec = job["spec"]
            backoff = int(spec.get("backoffLimit", 6))
            deadline = spec.get("activeDeadlineSeconds")
            failed = int((job.get("status") or {}).get("failed", 0))
            self.job_status(namespace, name, uid, lambda s: s.update(startTime=s.get("startTime") or now_time()))
            log(f"job {namespace}/{name}: started")

            async def attempts():
                count = failed
                while True:
                    rc = await self.attempt(namespace, name, uid)
                    if rc == 0:
                        return True, "CompletionsReached", "Reached expected number of succeeded pods"
                    count += 1
                    self.job_status(namespace, name, uid, lambda s: s.update(failed=count, active=0))
                    if count > backoff:
                        return False, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                    await asyncio.sleep(self.retry_delay)

            try:
                outcome = await asyncio.wait_for(attempts(), float(deadline) if deadline else None)
            except asyncio.TimeoutError:
                outcome = (False, "DeadlineExceeded", "Job was active longer than specified deadline")
            self.finish(namespace, name, uid, *outcome)
        except asyncio.CancelledError:
            log(f"job {namespace}/{name}: stopped (deleted)")
        except Exception:
            log(f"job {namespace}/{name}: runner failed:\n{traceback.format_exc()}")
        finally:
            if self.tasks.get(uid) is asyncio.current_task():
                self.tasks.pop(uid, None)

    def finish(self, namespace, name, uid, succeeded, reason, message):
        at = now_time()
        types = ("SuccessCriteriaMet", "Complete") if succeeded else ("FailureTarget", "Failed")

        def change(status):
            status["active"] = 0
            status["ready"] = 0
            if succeeded:
                status["succeeded"] = 1
                status["completionTime"] = at
            status["conditions"] = [
                {"type": t, "status": "True", "reason": reason, "message": message, "lastProbeTime": at, "lastTransitionTime": at}
                for t in types
            ]

        self.job_status(namespace, name, uid, change)
        log(f"job {namespace}/{name}: {'Complete' if succeeded else 'Failed'} ({reason})")
        ttl = (self.current(namespace, name, uid).get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is not None:
            asyncio.get_running_loop().call_later(float(ttl), self.expire, namespace, name, uid)

    def expire(self, namespace, name, uid):
        job = self.store.get(self.jobs(), namespace, name)
        if job is not None and job["metadata"]["uid"] == uid:
            self.store.delete(self.jobs(), namespace, name)

    def binary(self, image):
        if image in self.images:
            return self.images[image]
        repository = image.split("@", 1)[0]
        last = repository.rsplit("/", 1)[-1]
        last = last.split(":", 1)[0]
        return self.images.get(last)

    def environment(self, namespace, pod_name, container):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "HOSTNAME": pod_name,
        }
        for name in self.pass_env:
            if name in os.environ:
                env[name] = os.environ[name]
        secrets = self.store.by_key(("", "secrets"))
        configmaps = self.store.by_key(("", "configmaps"))

        def lookup(res, ref, what):
            obj = self.store.get(res, namespace, ref.get("name", ""))
            data = (obj or {}).get("data") or {}
            if ref.get("key") in data:
                value = data[ref["key"]]
                return base64.b64decode(value).decode() if what == "secret" else value
            if ref.get("optional"):
                return None
            if obj is None:
                raise Unready("CreateContainerConfigError", f'{what} "{ref.get("name")}" not found')
            raise Unready("CreateContainerConfigError", f'couldn\'t find key {ref.get("key")} in {what} {namespace}/{ref.get("name")}')

        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, res, what in (("secretRef", secrets, "secret"), ("configMapRef", configmaps, "configmap")):
                ref = source.get(kind)
                if ref is None:
                    continue
                obj = self.store.get(res, namespace, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise Unready("CreateContainerConfigError", f'{what} "{ref.get("name")}" not found')
                for key, value in (obj.get("data") or {}).items():
                    env[prefix + key] = base64.b64decode(value).decode() if what == "secret" else value
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            source = item.get("valueFrom") or {}
            value = None
            if "secretKeyRef" in source:
                value = lookup(secrets, source["secretKeyRef"], "secret")
            elif "configMapKeyRef" in source:
                value = lookup(configmaps, source["configMapKeyRef"], "configmap")
            elif "fieldRef" in source:
                value = {"metadata.name": pod_name, "metadata.namespace": namespace}.get(source["fieldRef"].get("fieldPath"), "")
            elif not source:
                value = ""
            if value is not None:
                env[item["name"]] = value
        return env

    def argv(self, container):
        binary = self.binary(container.get("image", ""))
        if binary is None:
            raise Unready("ErrImagePull", f'no local binary for image "{container.get("image")}" (start the emulator with --image NAME=PATH)')
        command = list(container.get("command") or [])
        args = [str(a) for a in container.get("args") or []]
        if command:
            # The image's own executable is the mapped binary; others run as named.
            image_name = container.get("image", "").split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
            if os.path.basename(command[0]) in (os.path.basename(binary), image_name):
                command[0] = binary
            return command + args
        return [binary] + args

    async def attempt(self, namespace, job_name, uid):
        job = self.current(namespace, job_name, uid)
        template = job["spec"].get("template") or {}
        containers = (template.get("spec") or {}).get("containers") or []
        if not containers:
            raise RuntimeError("the Job's pod template has no container")
        container = containers[0]
        pod_name = f"{job_name}-{''.join(random.choices(string.ascii_lowercase + string.digits, k=5))}"
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        pod = {
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job_name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
        }
        pod = self.store.create(self.pods(), namespace, pod, "kube-controller-manager")
        pod_uid = pod["metadata"]["uid"]
        self.job_status(namespace, job_name, uid, lambda s: s.update(active=1, ready=0))
        self.pod_status(namespace, pod_name, {"phase": "Pending", "startTime": now_time()})
        waiting = None
        while True:
            try:
                env = self.environment(namespace, pod_name, container)
                argv = self.argv(container)
                break
            except Unready as why:
                if waiting != why.message:
                    waiting = why.message
                    log(f"pod {namespace}/{pod_name}: waiting: {why.reason}: {why.message}")
                    self.pod_status(
                        namespace,
                        pod_name,
                        {
                            "phase": "Pending",
                            "containerStatuses": [
                                {"name": container.get("name", ""), "ready": False, "restartCount": 0, "image": container.get("image", ""), "state": {"waiting": {"reason": why.reason, "message": why.message}}}
                            ],
                        },
                    )
                await asyncio.sleep(0.5)
        cwd = container.get("workingDir")
        if not cwd or not os.path.isdir(cwd):
            cwd = None
        log(f"pod {namespace}/{pod_name}: running {' '.join(argv)}")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.processes[pod_uid] = proc
        started = now_time()
        self.pod_status(
            namespace,
            pod_name,
            {
                "phase": "Running",
                "startTime": started,
                "containerStatuses": [
                    {"name": container.get("name", ""), "ready": True, "restartCount": 0, "image": container.get("image", ""), "started": True, "state": {"running": {"startedAt": started}}}
                ],
            },
        )
        buffer = self.store.pod_logs.setdefault((namespace, pod_name), bytearray())
        try:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                if len(buffer) < 4 << 20:
                    buffer.extend(line)
                sys.stderr.write(f"[pod {namespace}/{pod_name}] {line.decode(errors='replace').rstrip()}\n")
                sys.stderr.flush()
            rc = await proc.wait()
        except BaseException:
            kill_group(proc)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except BaseException:
                pass
            self.pod_status(namespace, pod_name, terminated_status(container, started, 137, "Error"))
            raise
        finally:
            self.processes.pop(pod_uid, None)
        log(f"pod {namespace}/{pod_name}: exited with {rc}")
        self.pod_status(namespace, pod_name, terminated_status(container, started, rc, "Completed" if rc == 0 else "Error"))
        return rc

    def shutdown(self):
        for proc in list(self.processes.values()):
            kill_group(proc)


def terminated_status(container, started, rc, reason):
    return {
        "phase": "Succeeded" if rc == 0 else "Failed",
        "startTime": started,
        "containerStatuses": [
            {
                "name": container.get("name", ""),
                "ready": False,
                "restartCount": 0,
                "image": container.get("image", ""),
                "started": False,
                "state": {"terminated": {"exitCode": rc, "reason": reason, "startedAt": started, "finishedAt": now_time()}},
            }
        ],
    }


def kill_group(proc):
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def hard():
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    asyncio.get_running_loop().call_later(3, hard)


def job_finished(job):
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return True
    return False


# ---------------------------------------------------------------- HTTP


class Server:
    def __init__(self, store, quiet):
        self.store = store
        self.quiet = quiet

    def json(self, body, status=200):
        return web.Response(status=status, text=json.dumps(body, separators=(",", ":")), content_type="application/json")

    async def handle(self, request):
        started = time.monotonic()
        try:
            response = await self.dispatch(request)
        except ApiError as err:
            response = self.json(err.body(), err.code)
        except Exception as err:
            log(f"{request.method} {request.path_qs} failed:\n{traceback.format_exc()}")
            response = self.json(ApiError(500, "InternalError", f"emulator error: {err!r}").body(), 500)
        if not self.quiet:
            what = "watch ended" if not isinstance(response, web.Response) else str(response.status)
            log(f"{request.method} {request.path_qs} -> {what} ({(time.monotonic() - started) * 1000:.0f} ms)")
        return response

    # -- discovery

    def served(self):
        return list(self.store.resources.values())

    def discovery(self, parts):
        store = self.store
        if parts == ["version"]:
            return {"major": "1", "minor": "34", "gitVersion": "v1.34.0-eventplane-emulator", "platform": "linux/amd64"}
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if parts == ["api", "v1"]:
            return self.resource_list("", "v1")
        groups = {}
        for res in self.served():
            if res.group:
                groups.setdefault(res.group, [])
                if res.version not in groups[res.group]:
                    groups[res.group].append(res.version)

        def group_body(name):
            versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in groups[name]]
            return {"name": name, "versions": versions, "preferredVersion": versions[0]}

        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_body(g) for g in sorted(groups)]}
        if len(parts) == 2 and parts[0] == "apis":
            if parts[1] not in groups:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **group_body(parts[1])}
        if len(parts) == 3 and parts[0] == "apis":
            if parts[2] not in groups.get(parts[1], []):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self.resource_list(parts[1], parts[2])
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def resource_list(self, group, version):
        entries = []
        for res in self.served():
            if res.group == group and res.version == version:
                entries.extend(res.discovery())
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group and f"{group}/{version}" or version, "resources": entries}

    # -- routing

    def route(self, parts):
        """(resource, namespace, name, subresource) of a resource path."""
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and self.store.lookup(group, version, rest[2]):
            namespace, rest = rest[1], rest[2:]
        res = self.store.lookup(group, version, rest[0])
        if res is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if namespace is not None and not res.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        if sub and sub not in res.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return res, namespace, name, sub

    async def dispatch(self, request):
        parts = [p for p in request.path.split("/") if p]
        routed = self.route(parts) if parts[:1] in (["api"], ["apis"]) else None
        if routed is None:
            if request.method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            found = self.discovery(parts)
            return found if isinstance(found, web.StreamResponse) else self.json(found)
        res, namespace, name, sub = routed
        q = request.query
        manager = q.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/", 1)[0] or "unknown"
        dry_run = q.get("dryRun") == "All"
        method = request.method
        if name is None:
            if method == "GET":
                selector = Selector(namespace, q.get("labelSelector"), q.get("fieldSelector"))
                if q.get("watch") in ("true", "1"):
                    return await self.watch(request, res, selector)
                return self.json(self.list(res, selector, q))
            if method == "POST":
                body = await self.body(request)
                return self.json(self.store.create(res, namespace, body, manager, dry_run=dry_run), 201)
            if method == "DELETE":
                selector = Selector(namespace, q.get("labelSelector"), q.get("fieldSelector"))
                options = await self.delete_options(request)
                deleted = []
                for obj in self.store.list(res, selector):
                    meta = obj["metadata"]
                    if self.store.get(res, meta.get("namespace"), meta["name"]) is None:
                        continue  # collected with an owner deleted before it
                    deleted.append(self.store.delete(res, meta.get("namespace"), meta["name"], options.get("propagationPolicy") or "Background", dry_run=dry_run))
                return self.json({"apiVersion": res.api_version, "kind": f"{res.kind}List", "metadata": {"resourceVersion": str(self.store.rv)}, "items": deleted})
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if sub == "log":
            if self.store.get(res, namespace, name) is None:
                raise not_found(res, name)
            return web.Response(body=bytes(self.store.pod_logs.get((namespace, name), b"")), content_type="text/plain")
        if sub == "scale":
            return await self.scale(request, res, namespace, name, manager, dry_run)
        if method == "GET":
            obj = self.store.get(res, namespace, name)
            if obj is None:
                raise not_found(res, name)
            return self.json(obj)
        if method == "PUT":
            body = await self.body(request)
            return self.json(self.store.update(res, namespace, name, lambda old: replace(old, body, sub), manager, sub, dry_run=dry_run))
        if method == "PATCH":
            existed = self.store.get(res, namespace, name) is not None
            # An apply that creates answers 201, as for real.
            return self.json(await self.patch(request, res, namespace, name, sub, manager, dry_run), 200 if existed else 201)
        if method == "DELETE":
            options = await self.delete_options(request)
            obj = self.store.delete(
                res,
                namespace,
                name,
                options.get("propagationPolicy") or "Background",
                options.get("preconditions"),
                dry_run=dry_run,
            )
            return self.json(obj)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def body(self, request):
        text = await request.text()
        try:
            if request.content_type == "application/apply-patch+yaml":
                return yaml.load(text, Loader=YAML_LOADER)
            return json.loads(text) if text else {}
        except Exception as err:
            raise ApiError(400, "BadRequest", f"the request body could not be decoded: {err}")

    async def delete_options(self, request):
        options = {}
        if request.can_read_body:
            text = await request.text()
            if text.strip():
                try:
                    options = json.loads(text)
                except ValueError:
                    raise ApiError(400, "BadRequest", "DeleteOptions could not be decoded")
        if request.query.get("propagationPolicy"):
            options["propagationPolicy"] = request.query["propagationPolicy"]
        if options.get("orphanDependents") is True:
            options["propagationPolicy"] = "Orphan"
        return options

    async def patch(self, request, res, namespace, name, sub, manager, dry_run):
        kind = request.content_type
        body = await self.body(request)
        if kind == "application/apply-patch+yaml":
            if not request.query.get("fieldManager"):
                raise ApiError(422, "Invalid", "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value: is required for apply patch")
            force = request.query.get("force") in ("true", "1")
            return self.store.apply(res, namespace, name, body, manager, sub, force, dry_run=dry_run)
        if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            change = lambda old: merge_patch(old, body)
        elif kind == "application/json-patch+json":
            change = lambda old: json_patch(old, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {kind}")
        return self.store.update(res, namespace, name, change, manager, sub, dry_run=dry_run)

    def list(self, res, selector, q):
        items = self.store.list(res, selector)
        start = 0
        if q.get("continue"):
            try:
                start = json.loads(base64.urlsafe_b64decode(q["continue"].encode()))["start"]
            except Exception:
                raise ApiError(400, "BadRequest", "invalid continue token")
        meta = {"resourceVersion": str(self.store.rv)}
        limit = int(q.get("limit") or 0)
        if limit > 0 and len(items) > start + limit:
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"start": start + limit}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        else:
            items = items[start:]
        return {"apiVersion": res.api_version, "kind": f"{res.kind}List", "metadata": meta, "items": items}

    async def watch(self, request, res, selector):
        q = request.query
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if not self.quiet:
            log(f"WATCH {request.path_qs} (from {q.get('resourceVersion') or 'now'})")
        watcher = Watcher(selector)
        # Subscribing and reading the backlog happen without yielding, so no
        # event is lost or sent twice.
        self.store.subscribe(res, watcher)
        backlog = []
        rv = q.get("resourceVersion") or ""
        initial = q.get("sendInitialEvents") == "true"
        if rv in ("", "0") or initial:
            backlog = [("ADDED", copy.deepcopy(o)) for o in self.store.list(res, selector)]
            if initial:
                backlog.append(
                    (
                        "BOOKMARK",
                        {
                            "apiVersion": res.api_version,
                            "kind": res.kind,
                            "metadata": {"resourceVersion": str(self.store.rv), "annotations": {"k8s.io/initial-events-end": "true"}},
                        },
                    )
                )
        else:
            try:
                since = int(rv)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv!r}")
            for event in self.store.history[res.key]:
                if event[0] > since:
                    translated = watcher.translate(event)
                    if translated:
                        backlog.append(translated)
        try:
            for etype, obj in backlog:
                await response.write((json.dumps({"type": etype, "object": obj}, separators=(",", ":")) + "\n").encode())
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    etype, obj = await asyncio.wait_for(watcher.queue.get(), min(left, 5.0))
                except asyncio.TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                await response.write((json.dumps({"type": etype, "object": obj}, separators=(",", ":")) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unsubscribe(res, watcher)
        return response

    async def scale(self, request, res, namespace, name, manager, dry_run):
        obj = self.store.get(res, namespace, name)
        if obj is None:
            raise not_found(res, name)
        paths = res.scale or {}
        spec_path = paths.get("specReplicasPath", ".spec.replicas")

        def scale_of(o):
            if res.key == ("apps", "deployments"):
                selector = ",".join(f"{k}={v}" for k, v in sorted(((o.get("spec") or {}).get("selector") or {}).get("matchLabels", {}).items()))
            else:
                selector = dotted_get(o, paths.get("labelSelectorPath") or ".status.selector") or ""
            m = o["metadata"]
            body = {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in m},
                "spec": {},
                "status": {"replicas": dotted_get(o, paths.get("statusReplicasPath") or ".status.replicas") or 0},
            }
            replicas = dotted_get(o, spec_path)
            if replicas is not None:
                body["spec"]["replicas"] = replicas
            if selector:
                body["status"]["selector"] = selector
            return body

        if request.method == "GET":
            return self.json(scale_of(obj))
        body = await self.body(request)
        current = scale_of(obj)
        if request.method == "PUT":
            wanted = body
        elif request.method == "PATCH":
            if request.content_type == "application/json-patch+json":
                wanted = json_patch(current, body)
            else:
                wanted = merge_patch(current, body)
        else:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        replicas = (wanted.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, "Invalid", "spec.replicas: Invalid value: must be a non-negative integer")
        asked = (wanted.get("metadata") or {}).get("resourceVersion")

        def change(o):
            dotted_set(o, spec_path, replicas)
            if asked:
                o["metadata"]["resourceVersion"] = asked
            return o

        return self.json(scale_of(self.store.update(res, namespace, name, change, manager, "scale", dry_run=dry_run)))


def replace(old, body, sub):
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be an object")
    new = copy.deepcopy(body)
    new.setdefault("metadata", {})
    if sub != "status":
        # Who owns what is the server's to keep across a replace.
        new["metadata"].setdefault("managedFields", old["metadata"].get("managedFields", []))
    return new


# ---------------------------------------------------------------- main


def load_crds(store, paths):
    crd_res = store.lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".yaml", ".yml", ".json")))
        else:
            files.append(path)
    for path in files:
        with open(path) as f:
            for doc in yaml.load_all(f, Loader=YAML_LOADER):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    store.create(crd_res, None, doc, "emulator")
                    log(f"loaded CRD {doc['metadata']['name']} from {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--crd", action="append", default=[], help="CRD YAML file or directory of them")
    parser.add_argument("--image", action="append", default=[], help="NAME=PATH: the local binary that runs the image NAME")
    parser.add_argument("--ready-file", help="written with the server's URL once it listens")
    parser.add_argument("--job-retry-delay", type=float, default=1.0, help="seconds between a failed Job pod and the next")
    parser.add_argument("--pass-env", action="append", default=[], help="NAME: also give Job processes this variable of the emulator's environment")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when standard input closes (the parent died)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args()

    images = {}
    for item in args.image:
        name, sep, path = item.partition("=")
        if not sep or not path:
            parser.error(f"--image wants NAME=PATH, got {item!r}")
        images[name] = os.path.abspath(path)

    async def serve():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.exit_on_stdin_eof:

            def wait_stdin():
                try:
                    while sys.stdin.buffer.read(4096):
                        pass
                except Exception:
                    pass
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=wait_stdin, daemon=True).start()
        store = Store()
        load_crds(store, args.crd)
        runner = JobRunner(store, images, args.job_retry_delay, args.pass_env)
        server = Server(store, args.quiet)
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", server.handle)
        app_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await app_runner.setup()
        site = web.TCPSite(app_runner, args.host, args.port, reuse_address=True)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = f"http://{args.host}:{port}"
        log(f"listening on {url}; images: {images or 'none'}")
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(url + "\n")
            os.replace(tmp, args.ready_file)
        await stop.wait()
        log("stopping")
        runner.shutdown()
        await asyncio.sleep(0.2)
        await app_runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
