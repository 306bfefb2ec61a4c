"""``HubMLSpawner``: KubeSpawner plus GPU profiles.  Kept thin on purpose.

The GPU logic lives in small modules this class wires into KubeSpawner's hooks:

- :mod:`hubml.profiles` / :mod:`hubml.profile_config` / :mod:`hubml.mig` — the catalogue and its validation;
- :mod:`hubml.availability` — free GPU capacity per profile;
- :mod:`.expansion` — catalogue -> KubeSpawner ``profile_list`` entries;
- :mod:`.merges` — profile list settings extend (not replace) the base config;
- :mod:`.informer` — one node + pod informer per hub -> free capacity;
- :mod:`.admission` — option validation, groups, per-user maximum, "full" refusal,
  FailedScheduling translation;
- :mod:`.quota` — namespace ResourceQuota explanation;
- :mod:`.form` + ``gpu_form.html`` — the spawn form.

Every KubeSpawner setting keeps working, ``profile_list`` included (its entries
are shown after the GPU profiles and go through the same option validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import Any

from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from tornado import web
from traitlets import Bool, Dict, Int, List, TraitError, Unicode, default, validate

from hubml import pending
from hubml.availability import UsageIndex
from hubml.profile_config import load_catalogue
from hubml.profiles import Catalogue, ProfileConfigError

from . import admission, quota
from .expansion import expand_catalogue
from .form import form_entries, render_form
from .informer import GpuPodReflector, NodeReflector
from .merges import DEFAULT_EXTEND_TRAITS, as_list, merge_trait


def _kubespawner_trait_names() -> set[str]:
    return set(KubeSpawner.class_trait_names())


def check_gpu_profiles(value: Any) -> Catalogue:
    """Validate a ``gpu_profiles`` value exactly as the spawner does (for tools and tests)."""
    return load_catalogue(value, known_override_keys=_kubespawner_trait_names(), source="HubMLSpawner.gpu_profiles")


class HubMLSpawner(KubeSpawner):
    """KubeSpawner with a validated GPU profile catalogue and an availability-aware form."""

    gpu_profiles = List(
        Dict(),
        default_value=[],
        help="""
        GPU (and CPU) profiles in the compact hubml format, for example::

            c.HubMLSpawner.gpu_profiles = [
                {"name": "cpu", "display": "CPU · 2 cores · 4 GiB", "cpu": 2, "memory": "4G", "default": True},
                {"name": "a100", "display": "1 × A100 80GB",
                 "gpu": {"model": "A100-SXM4-80GB", "count": 1},
                 "cpu": 8, "memory": "64G", "hourly_cost": 4.10, "idle_timeout": "30m",
                 "groups": ["ml-team"]},
                {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}},
                {"name": "t4-shared", "gpu": {"model": "Tesla-T4", "shared": True}},
            ]

        Validated when the hub starts: unknown keys, misspelled override trait
        names, MIG profiles that do not exist for the model, counts <= 0,
        duplicate names, several defaults and unanchored regexes are refused
        with one line per problem.  See the README's 'GPU profiles (HubMLSpawner)' reference for every key.
        """,
    ).tag(config=True)

    max_gpus_per_user = Int(
        0,
        help="""
        Most GPUs one user may hold across all their servers (a MIG slice or a
        time-sliced share counts as one).  0 means no limit.
        """,
    ).tag(config=True)

    extend_list_traits = List(
        Unicode(),
        default_value=list(DEFAULT_EXTEND_TRAITS),
        help="""
        List settings that a profile's ``kubespawner_override`` *extends*
        instead of replacing (KubeSpawner replaces).  ``node_affinity_required``
        terms are ANDed with the base terms.  Set to [] for stock behaviour.
        """,
    ).tag(config=True)

    show_restricted_profiles = Bool(
        False,
        help="Show profiles reserved for other groups, disabled, instead of hiding them.",
    ).tag(config=True)

    gpu_availability = Bool(
        True,
        help="""
        Watch nodes and pods (cluster-wide: needs list/watch on nodes and pods
        in a ClusterRole) to show free GPUs and refuse full profiles at once.
        """,
    ).tag(config=True)

    check_resource_quota = Bool(
        True,
        help="Read the namespace's ResourceQuotas before creating the pod and explain a would-be excess.",
    ).tag(config=True)

    fail_unschedulable = Bool(
        True,
        help="""
        Fail the spawn as soon as the scheduler reports ``Insufficient nvidia.com/…``
        for the pod (and delete the pod), instead of waiting for start_timeout.
        Turn off when a cluster autoscaler adds GPU nodes on demand.
        """,
    ).tag(config=True)

    _usage_index: UsageIndex | None = None  # one per hub process, shared by all spawners

    @validate("gpu_profiles")
    def _validate_gpu_profiles(self, proposal):
        try:
            self._catalogue = check_gpu_profiles(proposal["value"])
        except ProfileConfigError as e:
            raise TraitError(str(e)) from None
        return proposal["value"]

    @property
    def catalogue(self) -> Catalogue:
        cat = getattr(self, "_catalogue", None)
        if cat is None:
            self._catalogue = cat = check_gpu_profiles(self.gpu_profiles)
        return cat

    # ------------------------------------------------------------------ profile list

    async def _stock_profile_list(self) -> list[dict]:
        pl = self.profile_list
        if callable(pl):
            pl = await asyncio.ensure_future(_maybe_await(pl(self)))
        return list(self._sorted_dict_values(pl) or [])

    async def _combined_profile_list(self) -> list[dict]:
        """Expanded GPU profiles, then the stock ``profile_list`` entries (initialized)."""
        combined = expand_catalogue(self.catalogue) + await self._stock_profile_list()
        return self._get_initialized_profile_list(combined)

    # ------------------------------------------------------------------ availability

    async def _ensure_informer(self) -> UsageIndex | None:
        if not self.gpu_availability or not len(self.catalogue) or not self.catalogue.gpu_resources():
            return None
        cls = HubMLSpawner
        if cls._usage_index is None:
            cls._usage_index = UsageIndex()
        await asyncio.gather(
            self._start_reflector(kind="hubml-nodes", reflector_class=NodeReflector, index=cls._usage_index),
            self._start_reflector(kind="hubml-gpu-pods", reflector_class=GpuPodReflector, index=cls._usage_index),
        )
        return cls._usage_index

    def _base_tolerations(self) -> tuple:
        base = getattr(self, "_hubml_base", {}).get("tolerations", self.tolerations)
        return tuple(as_list(base))

    def _user_groups(self) -> list[str]:
        return [g.name for g in getattr(self.user, "groups", None) or []]

    # ------------------------------------------------------------------ form

    @default("options_form")
    def _options_form_default(self):
        if not self.gpu_profiles:
            return super()._options_form_default()
        return self._render_hubml_form

    async def _render_hubml_form(self, spawner=None) -> str:
        profile_list = await self._combined_profile_list()
        idx = await self._ensure_informer()
        avail = idx.availability_all(self.catalogue, self._base_tolerations()) if idx else {}
        selected = (self.user_options or {}).get("profile") if isinstance(self.user_options, dict) else None
        entries = form_entries(
            profile_list, self.catalogue, avail, self._user_groups(), selected, self.show_restricted_profiles
        )
        return render_form(entries)

    # ------------------------------------------------------------------ overrides

    def _apply_overrides(self, spawner_override: dict):
        extend = set(self.extend_list_traits)
        rest = {}
        for k, v in spawner_override.items():
            if k in extend and not callable(v) and isinstance(v, (list, dict)) and isinstance(getattr(self, k), (list, dict)):
                merged = merge_trait(k, getattr(self, k), v)
                self.log.debug(".. extending KubeSpawner list %s with %s", k, v)
                setattr(self, k, merged)
            else:
                rest[k] = v
        super()._apply_overrides(rest)

    def _snapshot_base(self, profile_list: list[dict]) -> None:
        """Remember the configured values of every trait a profile may override, and
        put them back before each spawn: otherwise the previous spawn's profile
        (dict merges, list extensions) leaks into the next one."""
        base = self.__dict__.setdefault("_hubml_base", {})
        names = set(self.extend_list_traits)
        for p in profile_list:
            names |= set(p.get("kubespawner_override") or {})
            for opt in (p.get("profile_options") or {}).values():
                for c in (opt.get("choices") or {}).values():
                    names |= set(c.get("kubespawner_override") or {})
                names |= set((opt.get("unlisted_choice") or {}).get("kubespawner_override") or {})
        traits = self.trait_names()
        for n in names:
            if n in traits and n not in base:
                base[n] = copy.deepcopy(getattr(self, n))
        for n, v in base.items():
            setattr(self, n, copy.deepcopy(v))

    # ------------------------------------------------------------------ start

    def _refuse(self, r: admission.Refusal):
        self.log.info("Refusing spawn of %s: %s", self._log_name, r.message)
        raise web.HTTPError(r.status, r.message)

    async def load_user_options(self):
        """Validate options (400), groups (403), per-user maximum (403), free capacity
        (409) and quota (403) before any Kubernetes object is created."""
        if not self.gpu_profiles and not self.profile_list:
            return await super().load_user_options()
        profile_list = await self._combined_profile_list()
        self._snapshot_base(profile_list)
        chosen = admission.check_user_options(profile_list, self.user_options)
        if isinstance(chosen, admission.Refusal):
            self._refuse(chosen)
        self._hubml_profile = None
        pname = chosen.get("hubml_profile")
        if pname:
            prof = self.catalogue.get(pname)
            self._hubml_profile = prof
            groups = self._user_groups()
            for r in (
                admission.check_groups(prof, groups),
                admission.check_user_gpu_limit(prof, self.catalogue, self._other_servers(), self.max_gpus_per_user),
            ):
                if r:
                    self._refuse(r)
            idx = await self._ensure_informer()
            if idx is not None and prof.gpu:
                tol = self._base_tolerations()
                r = admission.check_availability(
                    prof, idx.availability(prof, tol), self.catalogue, idx.availability_all(self.catalogue, tol), groups
                )
                if r:
                    self._refuse(r)
        self._load_profile(chosen["slug"], profile_list)
        if self.check_resource_quota:
            await self._check_quota()

    def _other_servers(self) -> list[tuple[str, str | None]]:
        out = []
        default_name = self.catalogue.default.name if self.catalogue.default else None
        for name, sp in (getattr(self.user, "spawners", None) or {}).items():
            if sp is self or not getattr(sp, "active", False):
                continue
            opts = sp.user_options if isinstance(getattr(sp, "user_options", None), dict) else {}
            out.append((name, opts.get("profile") or default_name))
        return out

    async def _check_quota(self) -> None:
        try:
            raw = await self.api.list_namespaced_resource_quota(self.namespace, _preload_content=False)
            items = json.loads(await raw.read()).get("items", [])
        except ApiException as e:
            self.log.warning("Cannot read ResourceQuotas in %s (%s); not checking quota", self.namespace, e.status)
            return
        if not items:
            return
        requests = {"cpu": self.cpu_guarantee, "memory": self.mem_guarantee, **self.extra_resource_guarantees}
        limits = {"cpu": self.cpu_limit, "memory": self.mem_limit, **self.extra_resource_limits}
        problems = quota.quota_problems(items, quota.pod_quota_usage(requests, limits))
        if problems:
            self._refuse(admission.Refusal(403, quota.explain(self.namespace, problems)))

    async def _start(self):
        task = asyncio.ensure_future(super()._start())
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=0.5)
                if done:
                    return task.result()
                msg = self._unschedulable_message()
                if msg:
                    task.cancel()
                    try:
                        await task
                    except BaseException:
                        pass
                    self.log.warning("Pod %s cannot be scheduled, removing it: %s", self.pod_name, msg)
                    await self.stop(now=True)
                    raise web.HTTPError(409, msg)
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def progress(self):
        """KubeSpawner's event messages, plus why the pod still waits when no event says it.

        A pod gated by Kueue (kueue.x-k8s.io/admission) gets no scheduler
        events at all (kubespawner #922): without this the spawn page shows
        nothing but the patience message until the queue admits it.
        """
        events = super().progress().__aiter__()
        said = ""
        upcoming: asyncio.Future | None = asyncio.ensure_future(events.__anext__())
        try:
            while upcoming is not None:
                done, _ = await asyncio.wait([upcoming], timeout=1.0)
                if done:
                    try:
                        event = upcoming.result()
                    except StopAsyncIteration:
                        return
                    yield event
                    upcoming = asyncio.ensure_future(events.__anext__())
                reason = self._pending_reason()
                if reason and reason != said:
                    said = reason
                    yield {"message": f"Pending: your server {reason}."}
        finally:
            if upcoming is not None and not upcoming.done():
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await upcoming
            await events.aclose()

    def _pending_reason(self) -> str:
        pods = self.pod_reflector.pods if self.pod_reflector else {}
        pod = pods.get(f"{self.namespace}/{self.pod_name}")
        return pending.pod_reason(pod) if pod else ""

    def _unschedulable_message(self) -> str | None:
        prof = getattr(self, "_hubml_profile", None)
        if not self.fail_unschedulable or prof is None or prof.gpu is None or not self.event_reflector:
            return None
        pods = self.pod_reflector.pods if self.pod_reflector else {}
        pod = pods.get(f"{self.namespace}/{self.pod_name}")
        if not pod:
            return None
        uid = pod["metadata"].get("uid")
        for ev in self.events:
            if ev.get("reason") != "FailedScheduling" or ev["involvedObject"].get("uid") != uid:
                continue
            avail = None
            if HubMLSpawner._usage_index is not None:
                avail = HubMLSpawner._usage_index.availability(prof, self._base_tolerations())
            msg = admission.translate_failed_scheduling(ev.get("message") or "", prof, avail)
            if msg:
                return msg
        return None


async def _maybe_await(v):
    if asyncio.iscoroutine(v) or isinstance(v, asyncio.Future):
        return await v
    return v
