"""Registry stages as aliases, planned as data: what to set, what it replaces, how to undo it.

MLflow 3 deprecates registry stages (since 2.9); a stage here is an alias (``candidate``,
``staging``, ``production``) naming one version of a registered model. Every move is planned
from a snapshot (``ModelState``) as a list of ``Change``s, each a registry write with the
write that undoes it, so ``release.registry`` can apply a plan and, if a step fails, undo the
steps already applied: the user never sees an alias half-moved.

The rules:
- Moving an alias records the version it replaces on the version it now names (tag
  ``rlhf.previous.<alias>``); a rollback follows that tag back and leaves it in place, so
  rolling back twice walks two moves back.
- The reward model's aliases follow the policy's: each names the reward-model version the
  aliased policy was trained against (the policy version's ``rlhf.reward_model`` tag).
- A version is found again by its content key (tag ``rlhf.content_key``), so an unchanged
  re-run reuses its version instead of registering a copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEY_TAG = "rlhf.content_key"
"""Version tag: sha256 of what the version serves (weights, tokenizer, generation settings)."""
REWARD_TAG = "rlhf.reward_model"
"""Policy version tag: ``<reward model name>/<version>`` it was trained against."""
PREVIOUS_PREFIX = "rlhf.previous."
"""Version tag prefix: ``rlhf.previous.<alias>`` is the version the alias named before."""


class RegistryError(Exception):
    """A registry request that cannot be carried out; the message says why (CLI exit 2)."""


class UnknownVersion(RegistryError):
    pass


class UnknownAlias(RegistryError):
    pass


class NothingToRollBack(RegistryError):
    pass


def previous_tag(alias: str) -> str:
    return PREVIOUS_PREFIX + alias


def check_alias_name(alias: str) -> str:
    """MLflow's alias rules (``_validate_model_alias_name``): word characters and dashes, not
    ``latest`` and not ``v<digits>``, which ``models:/`` URIs read as versions."""
    if not re.fullmatch(r"[\w\-]{1,255}", alias) or alias.lower() == "latest" or \
            re.fullmatch(r"v\d+", alias, re.IGNORECASE):
        raise ValueError(f"{alias!r} is not a valid alias: word characters and dashes, "
                         "not 'latest' or 'v<number>'")
    return alias


@dataclass(frozen=True)
class ModelState:
    """A snapshot of one registered model: where each alias points and every version's tags."""

    name: str
    aliases: dict[str, str] = field(default_factory=dict)
    """alias -> version."""
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    """version -> its tags; one entry per existing version."""

    def version_tags(self, version: str) -> dict[str, str]:
        if version not in self.tags:
            known = ", ".join(sorted(self.tags, key=int)) or "none"
            raise UnknownVersion(f"{self.name} has no version {version} (versions: {known})")
        return self.tags[version]

    def with_version(self, version: str, tags: dict[str, str]) -> ModelState:
        """The same snapshot with one more version (a version just created)."""
        return ModelState(self.name, dict(self.aliases), {**self.tags, version: dict(tags)})


# One registry write each; ``model`` is the registered model's name.
@dataclass(frozen=True)
class SetAlias:
    model: str
    alias: str
    version: str


@dataclass(frozen=True)
class DeleteAlias:
    model: str
    alias: str


@dataclass(frozen=True)
class SetTag:
    model: str
    version: str
    key: str
    value: str


@dataclass(frozen=True)
class DeleteTag:
    model: str
    version: str
    key: str


Write = SetAlias | DeleteAlias | SetTag | DeleteTag


@dataclass(frozen=True)
class Change:
    """A write and the write that restores what it replaced (computed from the snapshot)."""

    do: Write
    undo: Write


def set_alias(state: ModelState, alias: str, version: str) -> list[Change]:
    old = state.aliases.get(alias)
    if old == version:
        return []
    undo = SetAlias(state.name, alias, old) if old else DeleteAlias(state.name, alias)
    return [Change(SetAlias(state.name, alias, version), undo)]


def delete_alias(state: ModelState, alias: str) -> list[Change]:
    old = state.aliases.get(alias)
    return [Change(DeleteAlias(state.name, alias), SetAlias(state.name, alias, old))] if old else []


def set_tag(state: ModelState, version: str, key: str, value: str | None) -> list[Change]:
    """Set (or, with ``value=None``, delete) one version tag; nothing when already so."""
    old = state.version_tags(version).get(key)
    if old == value:
        return []
    do = SetTag(state.name, version, key, value) if value is not None else \
        DeleteTag(state.name, version, key)
    undo = SetTag(state.name, version, key, old) if old is not None else \
        DeleteTag(state.name, version, key)
    return [Change(do, undo)]


def reward_version_of(policy_tags: dict[str, str], reward_name: str) -> str | None:
    """The reward-model version a policy version names in ``rlhf.reward_model``, if it is one
    of ``reward_name``'s (registered names may contain ``/``: split at the last one)."""
    name, _, version = policy_tags.get(REWARD_TAG, "").rpartition("/")
    return version if name == reward_name and version else None


def plan_move(policy: ModelState, reward: ModelState | None, alias: str, version: str, *,
              record_previous: bool = True) -> list[Change]:
    """Point ``alias`` at policy ``version`` and the reward model's ``alias`` at the reward
    version that policy was trained against (applied as one plan: both move or neither).

    ``record_previous`` tags the new version with the one it replaces; a move with no
    previous version clears a stale tag, so a rollback never jumps into an older history.
    """
    tags = policy.version_tags(version)
    old = policy.aliases.get(alias)
    if old == version:
        return []
    changes = set_tag(policy, version, previous_tag(alias), old) if record_previous else []
    changes += set_alias(policy, alias, version)
    if reward is not None:
        reward_version = reward_version_of(tags, reward.name)
        if reward_version is not None and reward_version in reward.tags:
            changes += set_alias(reward, alias, reward_version)
        else:  # a version with no known reward model: say nothing rather than something stale
            changes += delete_alias(reward, alias)
    return changes


def plan_promotion(policy: ModelState, reward: ModelState | None, version: str,
                   aliases: list[str]) -> list[Change]:
    """Move each alias in order to ``version`` (put the one users serve from last: a failure
    part-way then leaves it untouched, and the undo restores the others)."""
    return [c for alias in aliases for c in plan_move(policy, reward, alias, version)]


def plan_rollback(policy: ModelState, reward: ModelState | None, alias: str
                  ) -> tuple[str, str, list[Change]]:
    """-> (version rolled back from, version rolled back to, changes).

    The target is the current version's ``rlhf.previous.<alias>`` tag; it is not rewritten,
    so the next rollback goes one move further back.
    """
    current = policy.aliases.get(alias)
    if current is None:
        known = ", ".join(sorted(policy.aliases)) or "none"
        raise UnknownAlias(f"{policy.name} has no alias {alias!r} (aliases set: {known})")
    target = policy.version_tags(current).get(previous_tag(alias))
    if not target:
        raise NothingToRollBack(f"nothing to roll back to: {policy.name} version {current} was "
                                f"the first version with alias {alias!r}")
    if target not in policy.tags:
        raise NothingToRollBack(f"nothing to roll back to: version {target}, which {alias!r} "
                                f"named before version {current}, no longer exists")
    return current, target, plan_move(policy, reward, alias, target, record_previous=False)


def find_by_key(state: ModelState, key: str) -> str | None:
    """The newest version whose content key is ``key``, if any."""
    matches = [v for v, tags in state.tags.items() if tags.get(KEY_TAG) == key]
    return max(matches, key=int) if matches else None


def undo_writes(applied: list[Change]) -> list[Write]:
    """The writes that restore the snapshot after ``applied`` went through, last first."""
    return [c.undo for c in reversed(applied)]
