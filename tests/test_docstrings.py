"""The house rule for lmkd's public API: every public function, method and class that takes arguments
documents them in an ``Args:`` section (Google style; a dataclass may use ``Attributes:``), so a
reader of any module finds what each parameter means without reading the body."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "lmkd"


def undocumented(root: pathlib.Path = ROOT) -> list[str]:
    """``path:line name`` of every public callable with parameters and no ``Args:`` section."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            nodes = [node]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                nodes += [
                    m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
            for m in nodes:
                if not isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    continue
                if m.name.startswith("_"):
                    continue
                doc = ast.get_docstring(m) or ""
                if isinstance(m, ast.ClassDef):
                    takes = True
                else:
                    args = [
                        a.arg
                        for a in m.args.args + m.args.kwonlyargs
                        if a.arg not in ("self", "cls")
                    ]
                    takes = bool(args or m.args.vararg or m.args.kwarg)
                if takes and "Args:" not in doc and "Attributes:" not in doc:
                    out.append(f"{path.relative_to(root.parent)}:{m.lineno} {m.name}")
    return out


def test_every_public_callable_documents_its_arguments():
    missing = undocumented()
    assert not missing, f"{len(missing)} public callables without an Args: section:\n" + "\n".join(
        missing
    )


def test_the_check_sees_a_missing_section(tmp_path):
    pkg = tmp_path / "lmkd"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'def good(x):\n    """Do.\n\n    Args:\n        x: it.\n    """\n\n\n'
        'def bad(x):\n    """Do."""\n\n\ndef _private(x):\n    pass\n\n\ndef no_args():\n    """Do."""\n'
    )
    assert undocumented(pkg) == ["lmkd/m.py:9 bad"]
