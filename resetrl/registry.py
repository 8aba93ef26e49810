"""One registry mechanism for everything chosen by name in a config: methods, policy losses, advantage
estimators, verifiers, step checkers, weight channels and engines.

    LOSSES = Registry("policy loss", config_field="algorithm.policy_loss")

    @LOSSES.register("ppo_clip")
    def ppo_clip_loss(...): ...

    LOSSES.get("ppo_clip")      # the object
    LOSSES.get("ppo_clp")       # RegistryError: unknown policy loss 'ppo_clp' (algorithm.policy_loss); did you mean 'ppo_clip'? ...
    LOSSES.names()              # ['pg', 'ppo_clip']

A name registered twice with a different object is an error naming the module that registered it first, so two
plug-ins cannot silently shadow each other.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar, overload

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown or duplicate name; the message says what is registered and what to do."""


class Registry(Generic[T]):
    def __init__(self, kind: str, config_field: str | None = None):
        self.kind = kind  # what a member is, for messages: "verifier", "method", ...
        self.config_field = config_field  # where a user writes the name, for messages
        self._members: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj=None):
        """`@registry.register("name")` as a decorator, or `registry.register("name", obj)` directly."""
        if not name or not isinstance(name, str):
            raise RegistryError(f"a {self.kind} needs a non-empty string name, got {name!r}")

        def add(member: T) -> T:
            existing = self._members.get(name)
            if existing is not None and existing is not member:
                owner = getattr(existing, "__module__", type(existing).__module__)
                raise RegistryError(f"{self.kind} '{name}' is already registered (by {owner}); pick another name")
            self._members[name] = member
            return member

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    __getitem__ = get

    def unknown_message(self, name: object) -> str:
        where = f" ({self.config_field})" if self.config_field else ""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown {self.kind} {name!r}{where}; {hint}registered: {', '.join(known) or '(none)'}"

    def names(self) -> list[str]:
        return sorted(self._members)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._members.items())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._members)
