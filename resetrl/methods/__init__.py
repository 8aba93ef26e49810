"""Training methods, one module each, selected by `algorithm.name` through one registry (resetrl/methods/base.py
says what a method declares). Importing this package imports every module in it, and each method module registers
its method (`@register_method`): adding a method is adding a module."""

from __future__ import annotations

import importlib
import pkgutil

from resetrl.methods.base import METHODS, Method, OptionsSection, register_method

__all__ = ["METHODS", "Method", "OptionsSection", "get_method", "option_sections", "register_method"]


def get_method(name: str) -> Method:
    return METHODS.get(name)


def option_sections() -> dict[str, type[OptionsSection]]:
    """algorithm.<key> -> its options model, for every registered method (methods may share a section)."""
    sections: dict[str, type[OptionsSection]] = {}
    for _name, method in METHODS.items():
        if method.options_key is not None:
            if sections.setdefault(method.options_key, method.Options) is not method.Options:
                raise TypeError(f"methods disagree on the options model of algorithm.{method.options_key}")
    return sections


for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
