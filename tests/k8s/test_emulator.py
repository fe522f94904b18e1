"""Checks of the Kubernetes API emulator's own semantics, so that the
operator's end-to-end test stands on an emulator known to behave like the
API server where it claims to. Run: python3 -m unittest discover tests/k8s
"""

import asyncio
import base64
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import emulator  # noqa: E402
from emulator import ApiError, Selector, Store  # noqa: E402

emulator.QUIET = True
CRDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crds")


def store():
    s = Store()
    emulator.load_crds(s, [CRDS])
    return s


class Fixture(unittest.TestCase):
    def setUp(self):
        self.s = store()
        self.projections = self.s.lookup("eventplane.io", "v1alpha1", "projections")
        self.deployments = self.s.lookup("apps", "v1", "deployments")
        self.secrets = self.s.lookup("", "v1", "secrets")

    def projection(self, **spec):
        body = {"metadata": {"name": "p"}, "spec": {"table": "t", "version": 1, **spec}}
        return self.s.apply(self.projections, "default", "p", body, "user", None, False)


class Metadata(Fixture):
    def test_writes_stamp_metadata_and_no_ops_change_nothing(self):
        created = self.projection()
        meta = created["metadata"]
        self.assertTrue(meta["uid"] and meta["creationTimestamp"])
        self.assertEqual(meta["generation"], 1)
        rv = meta["resourceVersion"]
        again = self.projection()
        self.assertEqual(again["metadata"]["resourceVersion"], rv, "a no-op apply bumps nothing")
        bumped = self.projection(version=2)
        self.assertEqual(bumped["metadata"]["generation"], 2)
        self.assertGreater(int(bumped["metadata"]["resourceVersion"]), int(rv))

    def test_status_writes_touch_only_status_and_keep_the_generation(self):
        self.projection()
        body = {"status": {"phase": "Ready"}, "spec": {"table": "other"}}
        after = self.s.apply(self.projections, "default", "p", body, "op", "status", True)
        self.assertEqual(after["status"], {"phase": "Ready"})
        self.assertEqual(after["spec"]["table"], "t")
        self.assertEqual(after["metadata"]["generation"], 1)
        # And the main resource never writes status.
        main = self.s.update(self.projections, "default", "p", lambda o: {**o, "status": {"phase": "X"}}, "user")
        self.assertEqual(main["status"], {"phase": "Ready"})

    def test_a_stale_resource_version_is_a_conflict(self):
        obj = self.projection()
        stale = dict(obj, metadata=dict(obj["metadata"], resourceVersion="1"))
        with self.assertRaises(ApiError) as err:
            self.s.update(self.projections, "default", "p", lambda _: stale, "user")
        self.assertEqual(err.exception.code, 409)

    def test_secret_string_data_becomes_base64_data(self):
        secret = self.s.create(self.secrets, "default", {"metadata": {"name": "s"}, "stringData": {"url": "pg://x"}}, "u")
        self.assertEqual(base64.b64decode(secret["data"]["url"]), b"pg://x")
        self.assertNotIn("stringData", secret)

    def test_missing_namespaces_and_long_label_values_are_refused(self):
        with self.assertRaises(ApiError) as err:
            self.s.create(self.secrets, "nowhere", {"metadata": {"name": "s"}}, "u")
        self.assertEqual(err.exception.code, 404)
        with self.assertRaises(ApiError) as err:
            self.s.create(self.secrets, "default", {"metadata": {"name": "s", "labels": {"a": "x" * 64}}}, "u")
        self.assertEqual(err.exception.code, 422)


class Patches(Fixture):
    def test_the_finalizer_helpers_json_patches(self):
        self.projection()
        add = [
            {"op": "test", "path": "/metadata/finalizers", "value": None},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x.io/cleanup"]},
        ]
        obj = self.s.update(self.projections, "default", "p", lambda o: emulator.json_patch(o, add), "op")
        self.assertEqual(obj["metadata"]["finalizers"], ["x.io/cleanup"])
        with self.assertRaises(ApiError):
            self.s.update(self.projections, "default", "p", lambda o: emulator.json_patch(o, add), "op")
        # Deletion waits for the finalizer.
        deleting = self.s.delete(self.projections, "default", "p")
        self.assertTrue(deleting["metadata"]["deletionTimestamp"])
        self.assertIsNotNone(self.s.get(self.projections, "default", "p"))
        remove = [
            {"op": "test", "path": "/metadata/finalizers/0", "value": "x.io/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ]
        self.s.update(self.projections, "default", "p", lambda o: emulator.json_patch(o, remove), "op")
        self.assertIsNone(self.s.get(self.projections, "default", "p"))

    def test_apply_removes_what_its_manager_no_longer_applies(self):
        self.projection()
        status = {"status": {"phase": "Building", "building": {"version": 2}}}
        self.s.apply(self.projections, "default", "p", status, "op", "status", True)
        after = self.s.apply(self.projections, "default", "p", {"status": {"phase": "Ready"}}, "op", "status", True)
        self.assertEqual(after["status"], {"phase": "Ready"})

    def test_apply_conflicts_with_another_managers_field_unless_forced(self):
        body = {"metadata": {"name": "q"}, "spec": {"replicas": 2, "selector": {}, "template": {}}}
        self.s.apply(self.deployments, "default", "q", body, "kubectl", None, False)
        with self.assertRaises(ApiError) as err:
            self.s.apply(self.deployments, "default", "q", {"spec": {"replicas": 3}}, "scaler", None, False)
        self.assertEqual(err.exception.code, 409)
        self.assertIn('conflict with "kubectl"', err.exception.message)
        self.assertIn(".spec.replicas", err.exception.message)
        forced = self.s.apply(self.deployments, "default", "q", {"spec": {"replicas": 3}}, "scaler", None, True)
        self.assertEqual(forced["spec"]["replicas"], 3)
        owners = {e["manager"]: e["fieldsV1"] for e in forced["metadata"]["managedFields"]}
        self.assertIn("f:replicas", owners["scaler"]["f:spec"])
        self.assertNotIn("f:replicas", owners["kubectl"].get("f:spec", {}))


class Watching(Fixture):
    def test_label_selectors_and_watch_translation(self):
        jobs = self.s.lookup("batch", "v1", "jobs")
        self.assertTrue(Selector(None, "a=b,c in (d,e),!f", None).matches({"metadata": {"labels": {"a": "b", "c": "e"}}}))
        self.assertFalse(Selector(None, "a!=b", None).matches({"metadata": {"labels": {"a": "b"}}}))
        watcher = emulator.Watcher(Selector("default", "app=x", None))
        self.s.subscribe(jobs, watcher)
        template = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
        body = {"metadata": {"name": "j", "labels": {"app": "x"}}, "spec": {"template": template}}
        job = self.s.create(jobs, "default", body, "u")
        self.s.update(jobs, "default", "j", lambda o: {**o, "metadata": {**o["metadata"], "labels": {"app": "y"}}}, "u")
        seen = []
        while not watcher.queue.empty():
            etype, obj = watcher.queue.get_nowait()
            seen.append((etype, obj["metadata"]["resourceVersion"]))
        self.assertEqual(seen[0], ("ADDED", job["metadata"]["resourceVersion"]))
        self.assertEqual(seen[-1][0], "DELETED", "leaving the selector")


class Collection(Fixture):
    def test_dependents_go_with_their_owner(self):
        owner = self.projection()
        ref = {"apiVersion": "eventplane.io/v1alpha1", "kind": "Projection", "name": "p", "uid": owner["metadata"]["uid"], "controller": True}
        self.s.create(self.secrets, "default", {"metadata": {"name": "child", "ownerReferences": [ref]}}, "u")
        self.s.delete(self.projections, "default", "p")
        self.assertIsNone(self.s.get(self.secrets, "default", "child"))


class Jobs(unittest.IsolatedAsyncioTestCase):
    async def run_job(self, args, backoff=0):
        s = store()
        runner = emulator.JobRunner(s, {"tool": "/bin/sh"}, 0.05)
        secrets = s.lookup("", "v1", "secrets")
        jobs = s.lookup("batch", "v1", "jobs")
        s.create(secrets, "default", {"metadata": {"name": "db"}, "stringData": {"url": "pg://db"}}, "u")
        container = {
            "name": "c",
            "image": "registry.example/team/tool:1.2",
            "args": ["-c", args],
            "env": [
                {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "none", "key": "k", "optional": True}}},
            ],
        }
        body = {"metadata": {"name": "j"}, "spec": {"backoffLimit": backoff, "template": {"spec": {"containers": [container]}}}}
        s.create(jobs, "default", body, "u")
        for _ in range(200):
            job = s.get(jobs, "default", "j")
            if emulator.job_finished(job):
                break
            await asyncio.sleep(0.05)
        runner.shutdown()
        logs = b"".join(bytes(v) for v in s.pod_logs.values()).decode()
        return job["status"], logs

    async def test_a_job_runs_with_its_secret_and_completes(self):
        status, logs = await self.run_job('echo "url=$URL opt=${OPT-unset}"')
        self.assertEqual(status["succeeded"], 1)
        self.assertEqual([c["type"] for c in status["conditions"]], ["SuccessCriteriaMet", "Complete"])
        self.assertIn("url=pg://db opt=unset", logs)

    async def test_a_failing_job_is_retried_up_to_its_backoff_limit(self):
        status, _ = await self.run_job("exit 4", backoff=1)
        self.assertEqual(status["failed"], 2)
        failed = [c for c in status["conditions"] if c["type"] == "Failed"]
        self.assertEqual(failed[0]["reason"], "BackoffLimitExceeded")


if __name__ == "__main__":
    unittest.main()
