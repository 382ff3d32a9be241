"""Registered policy sets: the YAML files in one directory, loaded once at start."""

from __future__ import annotations

from pathlib import Path

from guardrail.errors import PolicyError, UsageError
from guardrail.policy import PolicySet, load_policy, load_policy_text
from guardrail.serve.errors import BadRequest
from guardrail.serve.schemas import CategoryInfo, Options, PolicyList, PolicySetInfo


class PolicyRegistry:
    """Policy sets by name. A bad file stops the service at start, not a request later."""

    def __init__(self, directory: str | Path, default: str):
        root = Path(directory)
        if not root.is_dir():
            raise UsageError(f"policies directory {root} does not exist")
        self.sets: dict[str, PolicySet] = {}
        for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
            pset = load_policy(path)
            if pset.name in self.sets:
                raise PolicyError(f"{path}: policy set name {pset.name!r} is registered twice")
            self.sets[pset.name] = pset
        if default not in self.sets:
            raise UsageError(f"default policy set {default!r} is not in {root} "
                             f"(found: {', '.join(self.sets) or 'none'})")
        self.default = default

    def get(self, name: str) -> PolicySet:
        try:
            return self.sets[name]
        except KeyError:
            raise BadRequest(f"unknown policy_set {name!r}; registered: "
                             f"{', '.join(self.sets)}") from None

    def resolve(self, options: Options) -> PolicySet | None:
        """The set a request asks for; None for the default set (the engine already holds it)."""
        if options.policy is not None and options.policy_set is not None:
            raise BadRequest("give policy (YAML text) or policy_set, not both")
        if options.policy is not None:
            return load_policy_text(options.policy, "<policy>")
        if options.policy_set is None or options.policy_set == self.default:
            return None
        return self.get(options.policy_set)

    def label(self, name: str) -> str:
        """A bounded metrics label: the set's name if registered, else `custom`."""
        return name if name in self.sets else "custom"

    def listing(self) -> PolicyList:
        infos = [
            PolicySetInfo(
                name=s.name, version=s.version, description=s.description,
                default=s.name == self.default,
                categories=[CategoryInfo(id=c.id, name=c.name, threshold=s.threshold_of(c),
                                         severity=c.severity) for c in s.categories])
            for s in self.sets.values()
        ]
        return PolicyList(default=self.default, policy_sets=infos)
