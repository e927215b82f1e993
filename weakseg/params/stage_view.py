"""The view of :class:`~weakseg.params.schema.Params` a stage may read: exactly the keys ``dvc.yaml`` declares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from weakseg.flatten import flatten
from weakseg.params.base import ParamsError
from weakseg.params.schema import Params, load_params

#: Declared keys as a tree: a name maps to ``True`` (everything under it is declared) or to a subtree.
DeclaredTree = dict[str, Any]


def declared_tree(names: list[str]) -> DeclaredTree:
    """Turns dotted names (``["seed", "data.positive_label", "refine"]``) into a :data:`DeclaredTree`.

    A name inside a section that is declared whole adds nothing; a whole section replaces its subtree.
    """
    tree: DeclaredTree = {}
    for name in names:
        *parents, last = name.split(".")
        node: DeclaredTree = tree
        for part in parents:
            child = node.get(part)
            if child is True:
                break  # an enclosing section is already declared whole
            node = node.setdefault(part, {})
        else:
            node[last] = True
    return tree


class _DeclaredView:
    """A read-only view of one part of :class:`Params` that exposes exactly the declared keys below it."""

    __slots__ = ("_value", "_tree", "_prefix", "_stage", "_declared")

    def __init__(self, value: BaseModel, tree: DeclaredTree, prefix: str, stage: str, declared: list[str]) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_declared", declared)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._prefix}{name}"
        branch = self._tree.get(name)
        if branch is None:
            raise ParamsError(
                f"stage '{self._stage}' reads params '{key}' but dvc.yaml does not declare it "
                f"(declared: {self._declared}); add it to the stage's params in dvc.yaml"
            )
        value = getattr(self._value, name)
        if branch is True:
            return value
        return _DeclaredView(value, branch, f"{key}.", self._stage, self._declared)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"params are read-only (tried to set '{self._prefix}{name}')")

    def __repr__(self) -> str:
        return f"<params of stage '{self._stage}' under '{self._prefix or '.'}': {sorted(self._tree)}>"

    def __reduce__(self) -> tuple[Any, ...]:  # __setattr__ refuses, so pickle rebuilds through __init__
        return (_DeclaredView, (self._value, self._tree, self._prefix, self._stage, self._declared))


class StageParams(_DeclaredView):
    """A read-only view of :class:`Params` that exposes exactly the keys a stage declares in ``dvc.yaml``.

    A declared section (``refine``) gives everything under it; a declared key (``refine.threshold_quantile``)
    gives that key alone, so ``params.refine.crf`` then fails. A stage that reads a key DVC does not know
    about would not re-run when that key changes; this view turns such a mistake into an immediate error
    naming the stage and the key.
    """

    __slots__ = ()

    def __init__(self, params: Params, declared: list[str], stage: str) -> None:
        tree = declared_tree(declared)
        super().__init__(params, tree, "", stage, sorted(_declared_names(tree)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (StageParams, (self._value, self._declared, self._stage))

    @property
    def declared(self) -> set[str]:
        """The dotted keys this stage may read (a section declared whole is one name)."""
        return set(self._declared)

    def to_flat_dict(self) -> dict[str, Any]:
        """The declared keys as ``{"a.b.c": value}`` (every leaf under a declared section), for MLflow."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any, branch: DeclaredTree | Literal[True]) -> None:
            if branch is True:  # a declared section (a dict) gives each leaf under it, a declared key itself
                if isinstance(value, dict):
                    flat.update(flatten(value, f"{prefix}."))
                else:
                    flat[prefix] = value
                return
            for key, inner in branch.items():
                name = f"{prefix}.{key}" if prefix else key
                if not isinstance(value, dict) or key not in value:
                    raise ParamsError(
                        f"dvc.yaml: stage '{self._stage}' declares params '{name}', which params.yaml has no key for"
                    )
                walk(name, value[key], inner)

        walk("", self._value.model_dump(), self._tree)
        return flat


def _declared_names(tree: DeclaredTree, prefix: str = "") -> list[str]:
    names: list[str] = []
    for key, branch in tree.items():
        name = f"{prefix}{key}"
        names.extend([name] if branch is True else _declared_names(branch, f"{name}."))
    return names


def declared_params(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The ``params`` entries of one stage in ``dvc.yaml``."""
    document = yaml.safe_load(Path(dvc_yaml).read_text())
    try:
        entries = document["stages"][stage].get("params", [])
    except KeyError:
        raise ParamsError(f"{dvc_yaml}: no stage named '{stage}'") from None
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict):  # {"other.yaml": [keys]}
            for keys in entry.values():
                names.extend(keys)
    return names


def load_stage_params(
    stage: str, params_path: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml"
) -> StageParams:
    """Validates the whole params file and returns the view a stage is allowed to read."""
    params = load_params(params_path)
    return StageParams(params, declared_params(stage, dvc_yaml), stage)
