"""The package reads as the data flow: each stage imports only itself, the stages before it and the shared
modules at the top; nothing imports a later stage, there are no circles, and no package uses another's
private names. Imports inside functions count too."""
import ast
from pathlib import Path

import featx

ROOT = Path(featx.__file__).parent
SHARED = {"errors", "files", "identity", "devices", "data", "workspace", "modelfile", "provenance", "threads"}
STAGES = ["extraction", "report", "heads", "serve", "finetuning"]  # in data-flow order: fine-tuning scores the
# model it writes through serve, so the figures are the saved model's
ORCHESTRATORS = {"__init__", "__main__", "cli", "pipeline", "transformer", "autosearch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute featx module below featx, names imported) for every import in the file."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("featx"):
                target = node.module[len("featx."):] if node.module != "featx" else ""
            else:
                continue
            names = [a.name for a in node.names]
            if not target or target in STAGES:  # from featx import x / from featx.heads import fit: modules
                found += [(f"{target}.{n}" if target else n, []) for n in names if (ROOT / target / n).with_suffix(
                    ".py").exists() or (ROOT / target / n).is_dir()]
                found += [(target or "__init__", [n]) for n in names
                          if not ((ROOT / target / n).with_suffix(".py").exists() or (ROOT / target / n).is_dir())]
            else:
                found.append((target, names))
        elif isinstance(node, ast.Import):
            found += [(a.name[len("featx."):], []) for a in node.names if a.name.startswith("featx.")]
    return found


def rank(module: str) -> int:
    top = module.split(".")[0]
    if top in SHARED:
        return 0
    if top in STAGES:
        return 1 + STAGES.index(top)
    assert top in ORCHESTRATORS, f"{module} is in no layer: add it to SHARED, a stage or ORCHESTRATORS"
    return len(STAGES) + 1


GRAPH = {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def test_no_module_imports_a_later_stage():
    wrong = [f"{m} imports {t}" for m, targets in GRAPH.items() for t, _ in targets
             if t != "__init__" and rank(t) > rank(m)]
    assert wrong == []


def test_no_package_uses_another_packages_private_names():
    wrong = [f"{m} uses {t}.{n}" for m, targets in GRAPH.items() for t, names in targets for n in names
             if n.startswith("_") and n != "__version__" and t.split(".")[0] != m.split(".")[0]]
    assert wrong == []


def test_the_import_graph_has_no_circles():
    edges = {m: {t for t, _ in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    edges = {m: {t for t in ts if t != "__init__"} for m, ts in edges.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in edges.get(m, ()):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert cycles == []
