"""What a small run pays before and around its work (issue 28, speed on small folders).

- importing a pipeline, or asking for its `--help`, loads none of the heavy optional packages: they are imported by the
  function that uses them (nibabel where an image is written, filelock where a run locks its index, ...);
- a stage starts one worker per `SMALL_RUN` items at most (NIfTI conversion of a few volumes: one), never none, so a
  crash or a hang stays in a worker however small the run.
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
    "The workers of each pool started (`drive` calls) while the test runs."
    started, real = [], dicom_prep.parallel.drive
    def spy(fn, items, backend, *a, **kw): started.append(backend.workers); return real(fn, items, backend, *a, **kw)
    monkeypatch.setattr(dicom_prep.parallel, 'drive', spy)
    return started


def test_a_small_run_keeps_a_worker(tmp_path, pools):
    "preprocess's --file-timeout (and with it a worker's crash isolation) holds however small the run."
    for i in range(3): synth_dicom(tmp_path/'src'/f'{i}.dcm', seed=i)
    r = preprocess(tmp_path/'src', tmp_path/'out', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts == {'ok': 3} and pools == [1], (r.summary(), pools)


@pytest.mark.parametrize('n', [5, SMALL_RUN, SMALL_RUN + 1])
def test_a_small_nifti_run_starts_one_worker_per_small_run(tmp_path, pools, n):
    "Up to SMALL_RUN files are read and volumes converted by one worker of the two asked for; one more takes both."
    for i in range(n): synth_enhanced(tmp_path/'src'/f'e{i}.dcm', n=4, seed=i, SeriesNumber=i + 1)
    r = dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts.get('converted') == n, r.summary()
    assert pools == [1 if n <= SMALL_RUN else 2] * 2, pools
