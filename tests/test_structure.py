"""The code's shape, checked: what a read-through of the library found wrong, each with a test that would have caught it.

- no function takes a `**_` catch-all (which hid misspelt arguments passed by `**locals()`),
- no private name is imported from another module (the frame-naming rule was private yet shared),
- every console script reports unusable arguments in one style: one line `PROGRAM: error: ...`, exit 2,
- every `dicom_prep_preprocess` flag reaches the `preprocess` parameter of the same meaning (it was passed by position).
"""
import ast, inspect, subprocess
from pathlib import Path

import pytest
from fastcore.script import anno_parser

import dicom_prep
import dicom_prep.preprocess
from conftest import console_script

PKG = Path(dicom_prep.__file__).parent
MODULES = sorted(p for p in PKG.glob('*.py') if p.name not in ('_modidx.py', '__init__.py'))


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.name)
def test_no_catch_all_keyword_arguments(path):
    "A `**_` parameter swallows misspelt arguments; `**kw`/`**tags` that are used are fine."
    tree = ast.parse(path.read_text())
    bad = [f.name for f in _functions(tree) if f.args.kwarg and f.args.kwarg.arg.startswith('_')]
    assert not bad, f"{path.name}: {bad} take a **_ catch-all"
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and any(
        isinstance(k.value, ast.Call) and getattr(k.value.func, 'id', None) == 'locals' for k in n.keywords if k.arg is None)]
    assert not calls, f"{path.name}: a call passes **locals()"


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.name)
def test_no_private_names_imported_across_modules(path):
    tree = ast.parse(path.read_text())
    bad = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and (n.level or n.module.startswith('dicom_prep'))
           for a in n.names if a.name.startswith('_')]
    assert not bad, f"{path.name} imports private names {bad}"


def test_every_module_has_a_summary():
    "Each notebook's `>` line and exported prose become its module's docstring; llms.txt and the package docstring list every module."
    for p in MODULES: assert (ast.get_docstring(ast.parse(p.read_text())) or '').strip(), p.name
    llms = (PKG.parent/'nbs'/'llms.txt').read_text()
    for p in MODULES: assert f"`dicom_prep.{p.stem}`" in dicom_prep.__doc__ and f"[dicom_prep.{p.stem}]" in llms, p.stem


SCRIPTS = {  # console script -> arguments that cannot work
    'dicom_prep_preprocess': ['--dicom-dir', '/no/such/folder'],
    'dicom_prep_nifti': ['--dicom-dir', '/no/such/folder'],
    'dicom_prep_sheet': ['--db', '/no/such/dicom_prep.db'],
    'dicom_prep_status': ['--db', '/no/such/dicom_prep.db'],
}

@pytest.mark.parametrize('script', SCRIPTS)
def test_one_error_style(script, tmp_path):
    r = subprocess.run(console_script(script) + SCRIPTS[script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), (r.returncode, r.stderr)
    assert '/no/such' in lines[0] and 'Traceback' not in r.stderr


def test_every_preprocess_flag_reaches_its_parameter(monkeypatch, tmp_path):
    "Set every flag to a non-default value and check `preprocess` receives each under its own name."
    seen = {}
    def spy(dicom_dir, output_dir, **kw): seen.update(kw, dicom_dir=dicom_dir, output_dir=output_dir); raise SystemExit(0)
    monkeypatch.setattr(dicom_prep.preprocess, 'preprocess', spy)
    params = inspect.signature(dicom_prep.preprocess.main.__wrapped__).parameters
    renamed = {'workers': 'n_workers', 'db': 'db_path'}
    args, want = [], {}
    for name, p in params.items():
        if name in ('test', 'sheet'): continue
        flag = '--' + name.replace('_', '-')
        if p.annotation in (bool, 'store_true') or p.default is False: args.append(flag); value = True
        elif p.annotation in (int, 'int'): value = (p.default or 0) + 3; args += [flag, str(value)]
        elif p.annotation in (float, 'float'): value = p.default + 0.5; args += [flag, str(value)]
        else: value = str(tmp_path/name) if 'Path' in str(p.annotation) else f"x{name}"; args += [flag, value]
        want[renamed.get(name, name)] = value
    parsed = {k: v for k, v in vars(anno_parser(dicom_prep.preprocess.main.__wrapped__).parse_args(args)).items() if k in params}
    with pytest.raises(SystemExit): dicom_prep.preprocess.main(**parsed)
    got = {k: (str(v) if isinstance(v, Path) else v) for k, v in seen.items()}
    assert got == want
