"""Hijacked callback-table entries that point into a module's own code (scenario
``callback_overrides`` objects): a named function, an offset, optionally inside the function's
chained secondary part.  Names and parts are checked against the module as built, so a wrong
name is a scenario error naming the field, not a wrong address."""

from __future__ import annotations

from imagebuilder.process_layout import ProcessLayout
from imagebuilder.scenario import CodeTarget, ScenarioError


def code_target_address(layout: ProcessLayout, target: CodeTarget) -> int:
    module = layout.module_named(target.module)
    assert module is not None, target.module
    start = module.pdb_symbols.get(target.function, module.exports.get(target.function))
    if start is None:
        raise ScenarioError(
            f"{target.where}.function: {target.function!r} is not a function of {module.name}"
        )
    if target.part is not None:
        parts = [b for b, _e, primary in module.functions.chained() if primary == start]
        if not parts:
            raise ScenarioError(
                f"{target.where}.part: {target.function} has no chained part in {module.name}"
            )
        start = min(parts)
    if start + target.offset >= module.size:
        raise ScenarioError(f"{target.where}.offset: {target.offset:#x} is beyond {module.name}")
    return module.base + start + target.offset
