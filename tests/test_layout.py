"""The package's layout holds (docs/architecture.md): imports run down the floors, never up,
and the modules import each other without a cycle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "timm_fslt"

# Lowest first. A module may import its own floor and the ones below; pruning/ and ticket/
# share a floor, and only ticket/ may import pruning/ (a compacted ticket re-applies its cuts).
FLOORS = [
    ("errors", "version", "atomic", "entropy", "reference_decoder", "models"),
    ("regen",),
    ("nn",),
    ("frozen",),
    ("report", "materialize"),
    ("pruning", "ticket"),
    ("training",),
    ("apps", "train", "integrations", "__init__", "__main__"),
]
FLOOR = {part: i for i, parts in enumerate(FLOORS) for part in parts}
MAX_LINES = 420
# One file on purpose: the decoder an accelerator team ports carries the normal's 256-row table.
LONG_ON_PURPOSE = {"reference_decoder.py"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(candidate modules, at module level?) for every import of timm_fslt in the file: for
    ``from X import a``, ``X.a`` if that is a module, else ``X``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "timm_fslt" or target.startswith("timm_fslt."):
                for alias in node.names:
                    yield (f"{target}.{alias.name}", target), id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "timm_fslt" or alias.name.startswith("timm_fslt."):
                    yield (alias.name,), id(node) in top


def _known(module: str, modules: set) -> str:
    """The longest prefix of ``module`` that is a module of the package."""
    while module not in modules and "." in module:
        module = module.rpartition(".")[0]
    return module


def _graph():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module(p): p for p in files}
    edges = {m: set() for m in modules}
    lazy = {m: set() for m in modules}
    for m, p in modules.items():
        for candidates, at_top in _imports(p):
            target = next((c for c in candidates if c in modules), None) or _known(candidates[-1], set(modules))
            if target != m:
                (edges if at_top else lazy)[m].add(target)
    return modules, edges, lazy


def test_imports_never_climb_a_floor():
    modules, edges, lazy = _graph()
    wrong = []
    for m in modules:
        for target in edges[m] | lazy[m]:
            src, dst = _part(m), _part(target)
            if target == "timm_fslt" and src != "__init__":
                wrong.append(f"{m} imports the package root")
                continue
            if FLOOR[dst] > FLOOR[src] or (src == "pruning" and dst == "ticket"):
                wrong.append(f"{m} -> {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    _, edges, _ = _graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_modules_stay_small():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and p.name not in LONG_ON_PURPOSE}
    assert not long, long
