"""What a small run pays before and around its work (issue 28, speed on small folders).

- importing a pipeline, or asking for its `--help`, loads none of the heavy optional packages: they are imported by the
  function that uses them (nibabel where an image is written, filelock where a run locks its index, ...);
- a run with fewer than `SMALL_RUN` items starts no worker pool, a larger one does; both give the same results.
"""
import subprocess, sys

import pytest

import dicom_prep.parallel
from dicom_prep.parallel import SMALL_RUN
from dicom_prep.preprocess import preprocess
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.synth import synth_dicom, synth_enhanced

LAZY = ('nibabel', 'scipy', 'filelock', 'pandas', 'dask', 'distributed', 'fsspec', 'aiohttp', 'dicomweb_client', 'pynetdicom',
        'highdicom', 'sqlite_utils', 'fastprogress', 'openpyxl', 'pyarrow', 'fasthtml')


def _loaded(code:str) -> list:
    "The `LAZY` packages loaded once `code` has run in a fresh interpreter."
    probe = f"import sys\n{code}\nprint('LOADED', *sorted({{m.split('.')[0] for m in sys.modules}} & {set(LAZY)!r}))"
    r = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()[-1].split()[1:]


@pytest.mark.parametrize('module', ['nifti', 'preprocess'])
def test_importing_a_pipeline_loads_no_heavy_optional_package(module):
    assert _loaded(f"import dicom_prep.{module}") == []


@pytest.mark.parametrize('script', ['dicom_prep_nifti', 'dicom_prep_preprocess'])
def test_help_loads_no_heavy_optional_package(script):
    code = (f"import importlib; sys.argv = [{script!r}, '--help']\n"
            f"try: importlib.import_module('dicom_prep.{script.split('_')[-1]}').main()\n"
            "except SystemExit: pass")
    assert _loaded(code) == []


@pytest.fixture
def pools(monkeypatch) -> list:
    "The pools started (`drive` calls) while the test runs."
    started, real = [], dicom_prep.parallel.drive
    def spy(fn, items, backend, *a, **kw): started.append(type(backend).__name__); return real(fn, items, backend, *a, **kw)
    monkeypatch.setattr(dicom_prep.parallel, 'drive', spy)
    return started


@pytest.mark.parametrize('n', [3, SMALL_RUN - 1, SMALL_RUN])
def test_a_small_preprocess_run_starts_no_pool(tmp_path, pools, n):
    for i in range(n): synth_dicom(tmp_path/'src'/f'{i}.dcm', seed=i)
    r = preprocess(tmp_path/'src', tmp_path/'out', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts == {'ok': n}, r.summary()
    assert pools == ([] if n < SMALL_RUN else ['_Pool']), pools


def test_a_five_file_nifti_run_starts_no_pool_and_a_larger_one_does(tmp_path, pools):
    for i in range(5): synth_enhanced(tmp_path/'src'/f'e{i}.dcm', n=4, seed=i, SeriesNumber=i + 1)
    r = dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts.get('converted') == 5 and pools == [], (r.summary(), pools)
    for i in range(5, SMALL_RUN + 1): synth_enhanced(tmp_path/'src'/f'e{i}.dcm', n=4, seed=i, SeriesNumber=i + 1)
    r = dicom_to_nifti(tmp_path/'src', tmp_path/'out2', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts.get('converted') == SMALL_RUN + 1
    assert pools == ['_Pool', '_Pool'], pools                                   # headers and volumes: SMALL_RUN + 1 each
