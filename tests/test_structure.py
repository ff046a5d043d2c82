"""The code's shape, checked: what a read-through of the library found wrong, each with a test that would have caught it.

- no function takes a `**_` catch-all (which hid misspelt arguments passed by `**locals()`),
- no private name is imported from another module (the frame-naming rule was private yet shared),
- imports point down the room list only, inside functions too (`preprocess` imported `sheet` inside one),
- every console script reports unusable arguments in one style: one line `PROGRAM: error: ...`, exit 2,
- every field of `PreprocessOptions` is a `dicom_prep_preprocess` flag and reaches the options of the same name (flag lists drifted apart),
- a field added to a subclass of the options is a flag and reaches the worker (the flag is written once).
"""
import ast, dataclasses, re, subprocess, sys
from pathlib import Path

import pytest

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


def _rooms() -> dict:
    "{module: its place in the room list}: the place of the notebook it is exported from, in nbs/'s file-name order."
    order = {p.stem: i for i, p in enumerate(sorted((PKG.parent/'nbs').glob('*.ipynb')))}
    return {p.stem: order[m.group(1)] for p in MODULES if (m := re.search(r'File to edit: \.\./nbs/(\S+)\.ipynb', p.read_text()))}


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.name)
def test_imports_point_down_the_room_list(path):
    "A module imports only rooms above it in the list, at its top or inside a function (preprocess imported sheet inside one)."
    rooms, tree = _rooms(), ast.parse(path.read_text())
    names = [n.module if n.level else n.module.removeprefix('dicom_prep.') for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
             and (n.level or n.module.startswith('dicom_prep.'))]
    up = [m for m in names if m in rooms and rooms[m] >= rooms[path.stem]]
    assert not up, f"{path.name} imports {up}, which come after it in the room list"


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
    'dicom_prep_label': ['--db', '/no/such/dicom_prep.db', '--classes', 'a,b', '--no-browser'],
}

@pytest.mark.parametrize('script', SCRIPTS)
def test_one_error_style(script, tmp_path):
    r = subprocess.run(console_script(script) + SCRIPTS[script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), (r.returncode, r.stderr)
    assert '/no/such' in lines[0] and 'Traceback' not in r.stderr


def _non_defaults(cls, tmp_path) -> tuple[list, dict]:
    "(argv setting every flag of `cls` to a value other than its default, the value each field should then hold)."
    args, want = [], {}
    for f in cls.flags():
        flag, kind = '--' + f.cli.replace('_', '-'), f.type.split('|')[0].strip()
        if kind == 'bool': args.append(flag); value = True
        elif kind == 'int': value = (f.default or 0) + 3; args += [flag, str(value)]
        elif kind == 'float': value = f.default + 0.5; args += [flag, str(value)]
        elif kind == 'Path': value = tmp_path/f.name; args += [flag, str(value)]
        else: value = f"x{f.name}"; args += [flag, value]
        want[f.name] = value
    return args, want


def test_every_preprocess_flag_reaches_its_option(monkeypatch, tmp_path):
    "Every field of `PreprocessOptions` is a flag; set each to a non-default value and `preprocess` receives each under its own name."
    from dicom_prep.preprocess import PreprocessOptions
    seen = {}
    def spy(**kw): seen.update(kw); raise SystemExit(0)
    monkeypatch.setattr(dicom_prep.preprocess, 'preprocess', spy)
    args, want = _non_defaults(PreprocessOptions, tmp_path)
    init = {f.name for f in dataclasses.fields(PreprocessOptions) if f.init and f.metadata.get('cli') != ''} - {'key', 'deidentify'}
    assert set(want) == init, init ^ set(want)            # every field a user sets is a flag (quiet: a library option)
    with pytest.raises(SystemExit): dicom_prep.preprocess.main(args)
    assert seen == want


def test_a_new_image_flag_reaches_the_worker(monkeypatch, tmp_path):
    "Add a field to a subclass of the options: it is a flag in --help, and the worker receives it."
    from dicom_prep.cli import cli_args, cli_parser
    from dicom_prep.options import flag
    from dicom_prep.preprocess import PreprocessOptions, preprocess
    from dicom_prep.synth import synth_dicom

    @dataclasses.dataclass(frozen=True)
    class GammaOptions(PreprocessOptions):
        gamma: float = flag(1.0, 'image')  # Gamma applied to the windowed image

    shown = ' '.join(cli_parser(GammaOptions).format_help().split())
    assert '--gamma (float) Gamma applied to the windowed image [default: 1.0]' in shown.split('image:')[1].split('privacy:')[0]
    kw, _ = cli_args(GammaOptions, 'doc', 'example', ['--dicom-dir', str(synth_dicom(tmp_path/'src/a.dcm', 8, 8).parent), '--gamma', '2.2',
                                                      '--workers', '0', '--output-dir', str(tmp_path/'out')])
    got = []
    real = dicom_prep.preprocess.process_dicom
    def spy(path, study, out, opts, **kw): got.append(opts.gamma); return real(path, study, out, opts, **kw)
    monkeypatch.setattr(dicom_prep.preprocess, 'process_dicom', spy)
    r = preprocess(options=GammaOptions(**kw), quiet=True)
    assert got == [2.2] and r.counts == {'ok': 1}


@pytest.mark.parametrize('script', [*SCRIPTS, 'dicom_prep_export'])
def test_console_scripts_start_without_pydicoms_downloader(script):
    "A console script never downloads, so pydicom's downloader (`requests`) stays unloaded: `core` imports pydicom without it."
    code = (f"import importlib, sys; sys.argv = [{script!r}, '--help']\n"
            f"try: importlib.import_module('dicom_prep.{script.split('_')[-1]}').main()\n"
            "except SystemExit: pass\n"
            "print('requests' in sys.modules, 'pydicom' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.stderr.split()[-2:] == ['False', 'True'], r.stderr[-2000:]
