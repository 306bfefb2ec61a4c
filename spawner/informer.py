"""One shared node and pod informer per hub, feeding :class:`hubml.availability.UsageIndex`.

Built on KubeSpawner's :class:`~kubespawner.reflector.ResourceReflector` (same
start/stop, first-load future, failure callback and shared-client handling as
the pod and event reflectors KubeSpawner keeps in ``KubeSpawner.reflectors``),
so there is one list+watch per hub, not one per user or per form render.

- :class:`GpuPodReflector` watches pods in all namespaces (GPUs are used by
  pods the hub did not start too), filtered server-side to non-terminated pods.
  Its ``resources`` dict is an :class:`_IndexedPods`, which updates the usage
  index on every watch event, so the form never walks 20,000 pods.
- :class:`NodeReflector` watches nodes.  Nodes are cluster-scoped (no
  ``metadata.namespace``), which the base class's ``namespace/name`` keys
  assume, so its list and watch loops key by name.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any

from kubernetes_asyncio import client, watch
from kubespawner.reflector import ResourceReflector
from traitlets import Any as AnyTrait
from traitlets import Unicode

from hubml.availability import UsageIndex


def slim_pod(pod: dict) -> dict:
    """What availability needs of a pod.  A hub watching 20,000 pods keeps this
    instead of the full objects (a few hundred bytes instead of several KiB each)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}

    def res(cs):
        return [{"resources": c.get("resources") or {}} for c in cs or ()]

    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels") if k in meta},
        "spec": {"nodeName": spec.get("nodeName"), "containers": res(spec.get("containers")),
                 "initContainers": res(spec.get("initContainers"))},
        "status": {"phase": (pod.get("status") or {}).get("phase")},
    }


class _IndexedPods(dict):
    """A dict of (slimmed) pods whose every change is mirrored into a UsageIndex."""

    def __init__(self, items: dict, index: UsageIndex):
        super().__init__()
        self.index = index
        for k, v in items.items():
            self[k] = v

    def __setitem__(self, key, pod):
        pod = slim_pod(pod)
        super().__setitem__(key, pod)
        self.index.set_pod(key, pod)

    def pop(self, key, *default):
        self.index.remove_pod(key)
        return super().pop(key, *default)

    def __delitem__(self, key):
        self.index.remove_pod(key)
        super().__delitem__(key)


class GpuPodReflector(ResourceReflector):
    kind = "pods"
    omit_namespace = True
    list_method_name = "list_pod_for_all_namespaces"
    index = AnyTrait(help="The shared UsageIndex fed by this reflector.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # two conditions on one field cannot be written through the `fields` dict
        self.field_selector = "status.phase!=Succeeded,status.phase!=Failed"

    async def _list_and_update(self, resource_version=None):
        rv = await super()._list_and_update(resource_version)
        # a full re-list replaces every pod: rebuild the pod side of the index
        self.index.clear_pods()
        self.resources = _IndexedPods(self.resources, self.index)
        return rv


class NodeReflector(ResourceReflector):
    kind = "nodes"
    omit_namespace = True
    list_method_name = "list_node"
    index = AnyTrait(help="The shared UsageIndex fed by this reflector.")
    namespace = Unicode(None, allow_none=True)

    async def _list_and_update(self, resource_version=None):
        kwargs: dict[str, Any] = dict(
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            _request_timeout=self.request_timeout,
            _preload_content=False,
        )
        if resource_version is not None:
            kwargs["resource_version"] = resource_version
            kwargs["resource_version_match"] = "NotOlderThan"
        raw = await self.api.list_node(**kwargs)
        if not raw.ok:
            raise client.ApiException(status=raw.status, reason=raw.reason)
        data = json.loads(await raw.read())
        nodes = {n["metadata"]["name"]: n for n in data["items"]}
        for name in list(self.index.nodes):
            if name not in nodes:
                self.index.remove_node(name)
        for n in nodes.values():
            self.index.set_node(n)
        self.resources = nodes
        if not self.first_load_future.done():
            self.first_load_future.set_result(None)
        return data["metadata"]["resourceVersion"]

    async def _watch_and_update(self):
        """List, then watch; on any error back off and re-list (as the base class)."""
        resource_version = "0"
        cur_delay = 0.1
        while True:
            start = time.monotonic()
            w = watch.Watch()
            try:
                resource_version = await self._list_and_update(resource_version)
                cur_delay = 0.1
                method = partial(self.api.list_node, _preload_content=False)
                async with w.stream(
                    method,
                    label_selector=self.label_selector,
                    field_selector=self.field_selector,
                    resource_version=resource_version,
                    _request_timeout=self.request_timeout,
                    timeout_seconds=self.timeout_seconds,
                ) as stream:
                    async for event in stream:
                        node = event["raw_object"]
                        name = node["metadata"]["name"]
                        if event["type"] == "DELETED":
                            self.resources.pop(name, None)
                            self.index.remove_node(name)
                        else:
                            self.resources[name] = node
                            self.index.set_node(node)
                            resource_version = node["metadata"]["resourceVersion"]
                        if self._stopping or time.monotonic() - start >= self.restart_seconds:
                            break
            except asyncio.CancelledError:
                raise
            except Exception:
                resource_version = "0"
                cur_delay *= 2
                if cur_delay > 30:
                    self.log.exception("Watching nodes never recovered, giving up")
                    if self.on_failure:
                        self.on_failure()
                    return
                self.log.exception("Error watching nodes, retrying in %ss", cur_delay)
                await asyncio.sleep(cur_delay)
                continue
            finally:
                w.stop()
                await w.close()
                if self._stopping:
                    break
