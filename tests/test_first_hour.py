"""The first hour of a new user, end to end through the console scripts as subprocesses (issue 29): a run that achieved
nothing says why in one line and exits 2, a quiet console, errors that name the file and the way out."""
import os, shutil, subprocess

import pytest

from dicom_prep.synth import synth_ct, synth_series
from conftest import console_script

SCRIPTS = ['dicom_prep_preprocess', 'dicom_prep_nifti']


def _cli(name, *args, cwd=None, timeout=300):
    return subprocess.run(console_script(name) + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _last(r) -> str: return r.stderr.strip().splitlines()[-1]


def _truncated(root, n, start=0):
    "`n` CT files cut in half (their pixel data too short): each fails to decode."
    for i in range(start, start + n):
        p = synth_ct(root/f'p{i % 3}/t{i:03d}.dcm', 32, seed=i)
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    return root


@pytest.mark.parametrize('script', SCRIPTS)
def test_empty_folder_exits_2(tmp_path, script):
    "An empty folder: one line naming it, exit 2, no SUMMARY (and so no empty-split warnings)."
    (src := tmp_path/'src').mkdir()
    r = _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    assert r.returncode == 2, r.stdout + r.stderr
    assert _last(r) == f"{script}: error: no DICOM under {src}: it holds no files"
    assert 'SUMMARY' not in r.stdout and 'is empty' not in r.stdout + r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_no_dicom_and_symlinks_say_why(tmp_path, script):
    "Files that are not DICOM and symlinks pointing outside: counted in the line, with the flag that follows symlinks; given it, the run works."
    src, outside = tmp_path/'src', tmp_path/'outside'
    for i in range(4): (src/'notes').mkdir(parents=True, exist_ok=True); (src/'notes'/f'n{i}.txt').write_text('not DICOM')
    synth_series(outside/'s1', n=4)
    for i, f in enumerate(sorted((outside/'s1').iterdir())): os.symlink(f, src/f'link{i}.dcm')
    r = _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    assert r.returncode == 2, r.stdout + r.stderr
    assert _last(r).startswith(f"{script}: error: no DICOM under {src}: "), r.stderr
    assert {*_last(r).split(': ', 3)[3].split('; ')} == {'4 files are not DICOM', '4 symlinks point outside it (add --follow-symlinks)'}
    r = _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0', '--follow-symlinks')
    assert r.returncode == 0, r.stdout + r.stderr


def test_all_failed_exits_2_and_min_ok(tmp_path):
    "Every file failed: exit 2 with the reasons. Some came out: exit 0, unless fewer than --min-ok did (exit 1). A rerun judges the index the same way."
    src = _truncated(tmp_path/'src', 6)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    assert r.returncode == 2 and 'nothing came out of the 6 DICOM files' in _last(r) and 'all failed (decode error 6)' in _last(r), r.stderr
    assert 'Failed: decode error 6' in r.stdout                     # the SUMMARY groups the failures by reason
    for i in range(2): synth_ct(src/f'good/g{i}.dcm', 32, seed=i)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    assert r.returncode == 0, r.stderr
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0', '--min-ok', '0.5')
    assert r.returncode == 1 and 'only 2 of 8 files came out (25%, under --min-ok 0.5)' in _last(r), r.stderr
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--min-ok', '2')
    assert r.returncode == 2 and '--min-ok is a share of the items (0 to 1), not 2.0' in _last(r)


@pytest.mark.parametrize('script', SCRIPTS)
def test_unchanged_rerun_is_a_success(tmp_path, script):
    "A rerun of a good output folder has nothing to do, and succeeds (resume is not broken)."
    src = tmp_path/'src'; synth_series(src/'study'/'s1', n=5)
    for _ in range(2):
        r = _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
        assert r.returncode == 0, r.stdout + r.stderr


def test_failures_are_capped_and_counted(tmp_path):
    "25 failures: the first 10 printed, then a count with where to see them all; the SUMMARY hides phases that did nothing."
    src = _truncated(tmp_path/'src', 25)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '2')
    warnings = [l for l in r.stderr.splitlines() if l.startswith('WARNING: ')]
    assert len(warnings) == 10, r.stderr
    assert '... and 15 more warnings: see them all with `dicom_prep_status --errors` and `dicom_prep_sheet --failures`' in r.stderr
    assert 'Finish: 0 items' not in r.stdout


@pytest.mark.skipif(not shutil.which('script'), reason="needs util-linux `script` for a terminal")
def test_terminal_bar_has_no_stray_glyph_and_no_glued_warning(tmp_path):
    "On a terminal: no `█` line before the bar, and each warning starts a line of its own (never after the bar's text)."
    src = _truncated(tmp_path/'src', 12)
    cmd = ' '.join(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'out'), '--workers', '1'])
    out = subprocess.run(['script', '-qc', cmd, '/dev/null'], capture_output=True, text=True, timeout=300).stdout
    before_bar = out.split(' |', 1)[0]
    assert '█' not in before_bar, repr(before_bar[-200:])
    assert ']WARNING' not in out and 'WARNING: ' in out, repr(out[:2000])


@pytest.mark.parametrize('script', SCRIPTS)
def test_dicom_dir_of_a_file_names_its_folder(tmp_path, script):
    "--dicom-dir given a DICOM file: it says it is a file and names the folder to give instead."
    f = synth_ct(tmp_path/'scans'/'one.dcm', 16)
    r = _cli(script, '--dicom-dir', f, '--output-dir', tmp_path/'out')
    assert r.returncode == 2 and _last(r) == f"{script}: error: --dicom-dir is a file, not a folder: {f}; give its folder, {f.parent}", r.stderr


@pytest.fixture(scope='module')
def index(tmp_path_factory):
    "A small preprocess output folder."
    tmp = tmp_path_factory.mktemp('index'); synth_series(tmp/'src'/'study'/'s1', n=3)
    assert _cli('dicom_prep_preprocess', '--dicom-dir', tmp/'src', '--output-dir', tmp/'out', '--workers', '0').returncode == 0
    return tmp/'out'


READERS = {'dicom_prep_status': [], 'dicom_prep_sheet': ['--out', 'sheet.png'], 'dicom_prep_export': ['--out', 'exported']}


@pytest.mark.parametrize('script', READERS)
def test_reader_db_folder_empty_or_not_sqlite(tmp_path, index, script):
    "--db of an output folder reads its dicom_prep.db; an empty or non-SQLite file is named as no dicom_prep database, and left as it was."
    assert _cli(script, '--db', index, *READERS[script], cwd=tmp_path).returncode == 0
    (empty := tmp_path/'empty.db').touch(); (text := tmp_path/'notes.db').write_text('hello')
    for bad in (empty, text):
        r = _cli(script, '--db', bad, *READERS[script], cwd=tmp_path)
        assert r.returncode == 2 and _last(r) == f"{script}: error: not a dicom_prep database: {bad}", r.stderr
    assert empty.stat().st_size == 0


def test_missing_labels_file_is_exit_2(tmp_path, index):
    "A --labels file that is not there: one line naming it, exit 2 (1 is for disk and I/O failures)."
    r = _cli('dicom_prep_export', '--db', index/'dicom_prep.db', '--out', tmp_path/'exp', '--labels', tmp_path/'nope.csv', '--on', 'sop_uid')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'nope.csv' in r.stderr and 'No such file' in r.stderr, r.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_shows_what_is_required_and_the_real_worker_default(script):
    "--help: the usage line and the flag say --dicom-dir is required unless --test; --workers defaults to the CPUs this process may use."
    out = _cli(script, '--help').stdout
    assert out.startswith(f"usage: {script} --dicom-dir FOLDER [options]   (or --test"), out[:200]
    assert 'Required (unless --test)' in out and '[default: the CPUs this process may use]' in ' '.join(out.split())


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason="needs CPU affinity (Linux)")
def test_workers_default_follows_cpu_affinity(tmp_path):
    "Pinned to one CPU, a run without --workers uses one worker, not a fixed 2."
    src = tmp_path/'src'; synth_series(src/'study'/'s1', n=3)
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'out')],
                       capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert r.returncode == 0 and 'Processing 3 files with 1 workers' in r.stdout, r.stdout + r.stderr


def test_test_run_says_where_its_output_goes(tmp_path):
    "--test writes to ./dicom_prep_sample: the first line says so, before any work."
    r = _cli('dicom_prep_preprocess', '--test', '--workers', '2', cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"Output: {tmp_path/'dicom_prep_sample'} (index {tmp_path/'dicom_prep_sample'/'dicom_prep.db'})"


def test_flat_folder_is_the_same_study_in_both_pipelines(tmp_path):
    "Files right under --dicom-dir are study `~root` (core.TOP_STUDY) in the images, the volumes and the NIfTI names alike."
    from dicom_prep.core import TOP_STUDY
    from conftest import query
    src = tmp_path/'flat'; synth_series(src, n=4)
    for script, out in (('dicom_prep_preprocess', 'img'), ('dicom_prep_nifti', 'nii')):
        assert _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/out, '--workers', '0').returncode == 0
    assert {p.parent.name for p in (tmp_path/'img'/'images').rglob('*.png')} == {TOP_STUDY}
    assert [p.parent.name for p in (tmp_path/'nii'/'nifti').rglob('*.nii.gz')] == [TOP_STUDY]
    assert query(tmp_path/'nii', 'select distinct study_id from volumes') == [(TOP_STUDY,)]
