"""Fail if any function in dicom_prep/ is longer than 40 lines (the project's bar: small functions)."""
import ast, sys
from pathlib import Path

LIMIT = 40
ROOT = Path(__file__).resolve().parent.parent

def long_functions(path:Path, limit=LIMIT):
    "(name, line, length) of each function in `path` longer than `limit` lines."
    tree = ast.parse(path.read_text())
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]

if __name__ == '__main__':
    bad = [(p.name, *f) for p in sorted((ROOT/'dicom_prep').glob('*.py')) if p.name != '_modidx.py' for f in long_functions(p)]
    for name, fn, line, n in bad: print(f"dicom_prep/{name}:{line}: {fn} is {n} lines (limit {LIMIT})")
    if bad: sys.exit(1)
    print(f"no function over {LIMIT} lines")
