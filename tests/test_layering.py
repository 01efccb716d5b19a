"""The house rules of lmkd/, checked on the source with ``ast`` (function-local imports included):

* imports run one way: a module imports only from its own layer or the layers below it
  (docs/architecture.md draws them); ``lmkd/__init__.py`` is the public facade and may import any
  layer but the CLI;
* no import cycle between modules, not even through imports inside functions;
* no ``from lmkd.x import _private`` across modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "lmkd"

#: bottom to top: the packages of lmkd/ (docs/architecture.md draws them); a module belongs to the layer
#: of its package, and the facade ``lmkd/__init__.py`` and ``__main__`` stand apart
LAYERS = [
    ["core"],  # L0: errors, constants, io
    ["losses", "scoring"],  # L1: pure functions on tensors; metrics and significance
    ["models"],  # L2: loading, students, from-scratch models, generation, engines
    ["data"],  # L3: reading rows, tokenising, collators, loss positions
    ["teacher"],  # L4: the teacher signal (frozen, cache, pseudo-targets, cross-tokenizer)
    ["train"],  # L5: config, trainer, objective, features, regimes, run_distill
    ["evaluate"],  # L6: evaluate_models, fidelity, the report writer
    ["compress"],  # L7: pruning, export, the body of lmkd compress
    ["study"],  # L8: the study runner
    ["cli", "__main__"],  # L9: the lmkd command
]


def _modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int | None:
    if module == "":
        return None  # the package facade
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return i
    raise AssertionError(
        f"lmkd.{module} is in no layer of tests/test_layering.py: add it to LAYERS "
        "(and to docs/architecture.md)"
    )


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str | None:
    """The lmkd-relative dotted name an ImportFrom refers to, or None when outside lmkd."""
    if node.level:
        base = module.split(".") if module else []
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        return target
    if node.module == "lmkd" or (node.module or "").startswith("lmkd."):
        return node.module[len("lmkd.") :] if node.module != "lmkd" else ""
    return None


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of a chain of attribute reads on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def imports_of(
    module: str, path: pathlib.Path, known: set[str]
) -> list[tuple[str, list[str], int]]:
    """(imported lmkd module, names taken from it, line) for every import in the file; a private
    attribute read off an imported lmkd module (``regimes._helper(...)``, or
    ``lmkd.train.regimes._helper`` after ``import lmkd.train.regimes``) counts as taking it."""
    out = []
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> lmkd module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lmkd" or alias.name.startswith("lmkd."):
                    target = alias.name[len("lmkd.") :] if alias.name != "lmkd" else ""
                    out.append((target, [], node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target is None:
                continue
            names = [a.name for a in node.names]
            # `from . import x` / `from .pkg import sub` imports modules, not attributes
            subs = [f"{target}.{n}" if target else n for n in names]
            mods = [s for s in subs if s in known]
            if mods:
                out.extend((m, [], node.lineno) for m in mods)
                for a, sub in zip(node.names, subs):
                    if sub in known:
                        aliases[a.asname or a.name] = sub
                names = [n for n, s in zip(names, subs) if s not in known]
            if names:
                out.append((target, names, node.lineno))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append((aliases[node.value.id], [node.attr], node.lineno))
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and (_dotted(node.value) or "").startswith("lmkd.")
            and _dotted(node.value)[len("lmkd.") :] in known
        ):
            out.append((_dotted(node.value)[len("lmkd.") :], [node.attr], node.lineno))
    return out


def _graph(root: pathlib.Path = ROOT):
    mods = _modules(root)
    known = set(mods)
    return mods, {m: imports_of(m, p, known) for m, p in mods.items()}


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
    """Every import of a module from a layer above its own (and of the facade from inside lmkd)."""
    mods, graph = _graph(root)
    bad = []
    for module, imports in graph.items():
        mine = layer_of(module)
        for target, _, line in imports:
            if target == module or (module and target == ""):
                if module and target == "":
                    bad.append(
                        f"lmkd/{mods[module].relative_to(root)}:{line} imports the lmkd facade"
                    )
                continue
            theirs = layer_of(target)
            if mine is None:
                if theirs == len(LAYERS) - 1:
                    bad.append(f"lmkd/__init__.py:{line} imports the CLI lmkd.{target}")
            elif theirs is not None and theirs > mine:
                bad.append(
                    f"lmkd/{mods[module].relative_to(root)}:{line} (L{mine}) imports lmkd.{target} (L{theirs})"
                )
    return bad


def private_imports(root: pathlib.Path = ROOT) -> list[str]:
    """Every private name one lmkd module takes from another, and every private lmkd name the
    tests, benchmarks, eval and recipe scripts beside ``root`` take."""
    mods, graph = _graph(root)
    bad = [
        f"lmkd/{mods[m].relative_to(root)}:{line} takes {n} from lmkd.{t}"
        for m, imports in graph.items()
        for t, names, line in imports
        for n in names
        if n.startswith("_") and not n.startswith("__") and t != m
    ]
    known = set(mods)
    for folder in ("tests", "benchmarks", "eval", "recipes"):
        for path in sorted((root.parent / folder).rglob("*.py")):
            if path.resolve() == pathlib.Path(__file__).resolve():
                continue
            for t, names, line in imports_of("__outside__", path, known):
                bad += [
                    f"{path.relative_to(root.parent)}:{line} takes {n} from lmkd.{t}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    return bad


def import_cycle(root: pathlib.Path = ROOT) -> list[str] | None:
    """One import cycle between lmkd's modules (function-local imports included), or None."""
    _, graph = _graph(root)
    edges = {m: {t for t, _, _ in imports if t != m and t != ""} for m, imports in graph.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")} if m else edges[m]
    return _find_cycle(edges)


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_imports_run_downhill():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    """Neither lmkd's modules nor its tests, benchmarks and eval scripts take a private name of
    another lmkd module: what they need is public (and documented), or it is not needed."""
    bad = private_imports()
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = import_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(f"lmkd.{c}" for c in cycle)


@pytest.mark.parametrize(
    "case,expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ],
)
def test_cycle_finder_finds_cycles(case, expected):
    assert _find_cycle(case) == expected


def test_upward_import_is_caught(tmp_path):
    """The checker itself: an upward and a private import written into a scratch module are seen."""
    src = "from ..cli import main\nfrom ..train.trainer import _helper\n\ndef f():\n    from .. import study\n"
    path = tmp_path / "probe.py"
    path.write_text(src)
    found = imports_of("losses.probe", path, {"cli", "train.trainer", "study"})
    assert ("cli", [], 1) not in found and ("cli", ["main"], 1) in found
    assert ("train.trainer", ["_helper"], 2) in found and ("study", [], 5) in found
    assert layer_of("cli") > layer_of("losses.chunked") == 1


def test_the_checks_fail_on_a_tree_that_breaks_the_rules(tmp_path):
    """The three whole-tree checks run on a scratch copy of the layout whose modules break each rule
    with imports inside functions (upward, a cycle, private names taken both ways); a clean tree passes."""
    pkg = tmp_path / "lmkd"
    for sub in ("losses", "train"):
        (pkg / sub).mkdir(parents=True)
    for name in ("__init__.py", "losses/__init__.py", "train/__init__.py"):
        (pkg / name).write_text("")
    (pkg / "losses" / "token.py").write_text("def f():\n    return 1\n")
    (pkg / "train" / "trainer.py").write_text("from ..losses.token import f\n")
    assert upward_imports(pkg) == [] and private_imports(pkg) == [] and import_cycle(pkg) is None
    (pkg / "losses" / "token.py").write_text(
        "def f():\n    from lmkd.train.trainer import DistillationTrainer\n"
    )
    (pkg / "train" / "objective.py").write_text(
        "import lmkd.train.trainer\n\n\ndef g():\n    return lmkd.train.trainer._x\n"
    )
    (pkg / "train" / "trainer.py").write_text(
        "from ..losses.token import f\n\n\ndef h():\n    from .objective import _y\n"
    )
    assert upward_imports(pkg) == ["lmkd/losses/token.py:2 (L1) imports lmkd.train.trainer (L5)"]
    assert sorted(private_imports(pkg)) == [
        "lmkd/train/objective.py:5 takes _x from lmkd.train.trainer",
        "lmkd/train/trainer.py:5 takes _y from lmkd.train.objective",
    ]
    assert import_cycle(pkg) == ["losses.token", "train.trainer", "losses.token"]
    # a module outside every package of LAYERS is refused by name
    (pkg / "stray.py").write_text("")
    with pytest.raises(AssertionError, match="lmkd.stray is in no layer"):
        upward_imports(pkg)


if __name__ == "__main__":  # python tests/test_layering.py: print every violation
    for fn in (
        test_imports_run_downhill,
        test_no_private_names_across_modules,
        test_no_import_cycles,
    ):
        try:
            fn()
        except AssertionError as e:
            print(e)
