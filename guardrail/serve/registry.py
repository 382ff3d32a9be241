"""Registered policy sets: the YAML files of one directory (loaded at start) plus versions
registered while the service runs (`PUT /v1/policies/{name}`), which live in the job store, so
every replica sees them and they survive a restart. A name's latest version is the highest of
its file and its stored versions; requests may pin `policy_version`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from guardrail.errors import PolicyError, UsageError
from guardrail.policy import PolicySet, load_policy, load_policy_text
from guardrail.serve.errors import BadRequest, Conflict, NotFound, StoreUnavailable
from guardrail.serve.jobs import JobStore
from guardrail.serve.schemas import CategoryInfo, Options, PolicyList, PolicySetInfo

FRESH_S = 1.0        # how stale a replica's view of the latest versions may be

log = logging.getLogger("guardrail.serve")


class PolicyRegistry:
    """Policy sets by name and version. A bad file stops the service at start, not a request
    later."""

    def __init__(self, directory: str | Path, default: str, store: JobStore | None = None):
        root = Path(directory)
        if not root.is_dir():
            raise UsageError(f"policies directory {root} does not exist")
        self.sets: dict[str, PolicySet] = {}          # from the files
        self._texts: dict[str, str] = {}
        for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
            pset = load_policy(path)
            if pset.name in self.sets:
                raise PolicyError(f"{path}: policy set name {pset.name!r} is registered twice")
            self.sets[pset.name] = pset
            self._texts[pset.name] = path.read_text()
        if default not in self.sets:
            raise UsageError(f"default policy set {default!r} is not in {root} "
                             f"(found: {', '.join(self.sets) or 'none'})")
        self.default = default
        self.store = store
        self._parsed: dict[tuple[str, int], PolicySet] = {}
        self._latest: dict[str, tuple[float, dict | None]] = {}
        self._names: tuple[float, list[str]] = (0.0, [])

    # --- reading ----------------------------------------------------------------------------

    def _stored(self, name: str, version: int | None = None) -> PolicySet | None:
        if self.store is None:
            return None
        if version is None:
            at, row = self._latest.get(name, (0.0, None))
            if time.monotonic() - at > FRESH_S:
                try:
                    row = self.store.policy(name)
                except StoreUnavailable:
                    if not at and name not in self.sets:
                        raise                      # never seen: nothing to serve it from
                    log.warning("job store unavailable: policy set %r served from its last "
                                "known version", name)
                self._latest[name] = (time.monotonic(), row)   # asked again in FRESH_S
        else:
            key = (name, version)
            if key in self._parsed:
                return self._parsed[key]
            row = self.store.policy(name, version)
        if row is None:
            return None
        key = (row["name"], row["version"])
        if key not in self._parsed:
            self._parsed[key] = load_policy_text(row["yaml"], f"<{row['name']} v{row['version']}>")
        return self._parsed[key]

    def get(self, name: str, version: int | None = None) -> PolicySet:
        """The latest version of `name`, or exactly `version`."""
        base, stored = self.sets.get(name), self._stored(name, version)
        if version is not None:
            found = stored or (base if base is not None and base.version == version else None)
            if found is None:
                raise NotFound(f"policy set {name!r} has no version {version}")
            return found
        best = max((s for s in (base, stored) if s is not None), key=lambda s: s.version,
                   default=None)
        if best is None:
            known = sorted({*self.sets, *self._stored_names()})
            raise BadRequest(f"unknown policy_set {name!r}; registered: {', '.join(known)}")
        return best

    def _stored_names(self) -> list[str]:
        if self.store is None:
            return []
        at, names = self._names
        if time.monotonic() - at > FRESH_S:
            try:
                names = self.store.policy_names()
            except StoreUnavailable:
                if not at:
                    raise
            self._names = (time.monotonic(), names)
        return self._names[1]

    def file_text(self, name: str) -> str | None:
        return self._texts.get(name)

    def resolve(self, options: Options) -> PolicySet | None:
        """The set a request asks for; None for the set the engine already holds (the default
        file set, while no newer version of it is registered)."""
        if options.policy is not None and (options.policy_set or options.policy_version):
            raise BadRequest("give policy (YAML text) or policy_set, not both")
        if options.policy is not None:
            return load_policy_text(options.policy, "<policy>")
        if options.policy_version is not None and options.policy_set is None:
            raise BadRequest("policy_version needs policy_set")
        pset = self.get(options.policy_set or self.default, options.policy_version)
        return None if pset is self.sets[self.default] else pset

    def label(self, name: str) -> str:
        """A bounded metrics label: the set's name if registered, else `custom` (also while
        the store cannot say)."""
        if name in self.sets:
            return name
        try:
            return name if name in self._stored_names() else "custom"
        except StoreUnavailable:
            return "custom"

    # --- registering ------------------------------------------------------------------------

    def put(self, name: str, text: str) -> PolicySet:
        """Register a new version of `name` (PolicyError 422 when invalid; Conflict 409 when the
        YAML names another set or its version is not greater than the latest)."""
        if self.store is None:
            raise UsageError("this service has no store to register policy versions in")
        pset = self.parse(name, text)
        latest = max([s.version for s in (self.sets.get(name), self._stored(name))
                      if s is not None], default=0)
        if pset.version <= latest or self.store.add_policy(
                name, pset.version, pset.content_hash, text) is None:
            raise Conflict(f"version {pset.version} of {name!r} is not greater than the latest "
                           f"({latest}); raise `version`")
        self._latest.pop(name, None)
        self._names = (0.0, [])
        return pset

    def parse(self, name: str, text: str) -> PolicySet:
        """A candidate version of `name` (PolicyError 422 when invalid, Conflict 409 when the
        YAML names another set)."""
        pset = load_policy_text(text, f"<{name}>")
        if pset.name != name:
            raise Conflict(f"the YAML is policy set {pset.name!r}, not {name!r}")
        return pset

    def versions(self, name: str) -> list[dict]:
        out = []
        base = self.sets.get(name)
        if base is not None:
            out.append({"version": base.version, "hash": base.content_hash, "created_at": None})
        if self.store is not None:
            out += [{"version": r["version"], "hash": r["hash"],
                     "created_at": r["created_at"]} for r in self.store.policy_versions(name)]
        if not out:
            raise NotFound(f"no policy set {name!r}")
        return out

    def listing(self) -> PolicyList:
        names = list(dict.fromkeys([*self.sets, *self._stored_names()]))
        infos = []
        for name in names:
            s = self.get(name)
            infos.append(PolicySetInfo(
                name=s.name, version=s.version, description=s.description,
                default=s.name == self.default,
                categories=[CategoryInfo(id=c.id, name=c.name, threshold=s.threshold_of(c),
                                         severity=c.severity) for c in s.categories]))
        return PolicyList(default=self.default, policy_sets=infos)
