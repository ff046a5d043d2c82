"""Issue 29's first hour, attacked as a hostile new user would: a rerun over a source whose files changed, another
tool's database, `--min-ok 0`, and runs whose files all came out as something other than images or volumes."""
import shutil, sqlite3
from contextlib import closing

import pytest

from dicom_prep.synth import synth_ct
from test_first_hour import READERS, _cli, _last, _truncated
from conftest import query


def test_files_gone_from_the_source_do_not_count_as_came_out(tmp_path):
    "The good files of a first run deleted, the new ones all broken: the index's stale rows are no output of this source (exit 2)."
    src, out = tmp_path/'src', tmp_path/'out'
    for i in range(3): synth_ct(src/'a'/f'a{i}.dcm', 32, seed=i)
    assert _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    shutil.rmtree(src/'a'); _truncated(src, 3)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', '0')
    assert r.returncode == 2 and 'nothing came out of the 3 DICOM files' in _last(r) and 'all failed (decode error 3)' in _last(r), r.stdout + r.stderr
    assert query(out, "select count(*) from files where status = 'ok'") == [(3,)]      # the rows stay (no --prune): only the verdict ignores them


def _foreign(path):
    "An SQLite file another tool wrote, with a table named `meta` of its own."
    with closing(sqlite3.connect(path)) as c, c: c.execute('create table meta (k text, v text)'); c.execute("insert into meta values ('owner', 'other tool')")
    return path


@pytest.mark.parametrize('script', READERS)
def test_another_tools_database_with_a_meta_table_is_refused_untouched(tmp_path, script):
    "A database of another tool that happens to have a `meta` table is no dicom_prep database: named, exit 2, and neither moved aside nor changed."
    db = _foreign(tmp_path/'other.db'); before = db.read_bytes()
    r = _cli(script, '--db', db, *READERS[script], cwd=tmp_path)
    assert r.returncode == 2 and _last(r) == f"{script}: error: not a dicom_prep database: {db}", r.stdout + r.stderr
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('other')) == ['other.db']


def test_min_ok_0_accepts_a_run_where_every_file_failed(tmp_path):
    "--min-ok 0: no file needs to come out, so an all-failed run exits 0 (its line is still printed); a folder without DICOM stays exit 2."
    src = _truncated(tmp_path/'src', 3)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0', '--min-ok', '0')
    assert r.returncode == 0 and 'nothing came out of the 3 DICOM files' in r.stderr, r.stdout + r.stderr
    (empty := tmp_path/'empty').mkdir()
    r = _cli('dicom_prep_preprocess', '--dicom-dir', empty, '--output-dir', tmp_path/'out2', '--workers', '0', '--min-ok', '0')
    assert r.returncode == 2 and 'no DICOM under' in _last(r), r.stderr


def test_nothing_came_out_says_what_the_files_hold(tmp_path):
    "Only non-image objects (SR, RT plan, RT structure set): the line itself says what they are, not only the SUMMARY (stdout may go elsewhere)."
    from dicom_prep.sources import sample_file
    (src := tmp_path/'src').mkdir()
    for name in ('rtplan.dcm', 'reportsi.dcm', 'rtstruct.dcm'): shutil.copy(sample_file(name), src/name)
    r = _cli('dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    assert r.returncode == 2 and _last(r).endswith('nothing came out of the 3 DICOM files under '
                                                   f"{src}: not images (rtplan 1, rtstruct 1, sr 1)"), r.stderr


def test_nifti_nothing_came_out_says_the_verdicts(tmp_path):
    "NIfTI over files that make no usable volume (two lone slices): the line names the verdicts the index records for them."
    src = tmp_path/'src'
    for i in range(2): synth_ct(src/f's{i}'/'one.dcm', 32, seed=i, series_uid=f'1.2.3.{i}')
    r = _cli('dicom_prep_nifti', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '0')
    [(why,)] = query(tmp_path/'out', "select distinct verdict from volumes")
    assert why != 'ok' and r.returncode == 2, r.stderr
    assert _last(r).endswith(f"nothing came out of the 2 DICOM files under {src}: no usable volume ({why} 2)"), r.stderr


@pytest.mark.parametrize('script', ['dicom_prep_preprocess', 'dicom_prep_nifti'])
def test_an_empty_dicom_dir_is_refused_not_the_current_folder(tmp_path, script):
    "`--dicom-dir \"$DATA\"` with DATA unset: refused in one line, never a scan of the current folder (a home folder, its own output)."
    synth_ct(tmp_path/'here.dcm', 16)
    r = _cli(script, '--dicom-dir', '', '--output-dir', tmp_path/'out', cwd=tmp_path)
    assert r.returncode == 2 and _last(r) == f"{script}: error: --dicom-dir is empty: give the DICOM folder ('.' for the current one)", r.stdout + r.stderr
    assert not (tmp_path/'out').exists()


@pytest.mark.parametrize('script', ['dicom_prep_preprocess', 'dicom_prep_nifti'])
@pytest.mark.parametrize('meta', [True, False])
def test_a_pipeline_refuses_another_programs_database_as_its_db(tmp_path, script, meta):
    "--db naming another program's SQLite database: refused in one line, the file neither written to (its tables) nor moved aside (a `meta` of its own)."
    db = _foreign(tmp_path/'theirs.db') if meta else tmp_path/'theirs.db'
    if not meta:
        with closing(sqlite3.connect(db)) as c, c: c.execute('create table patients (id int, name text)')
    before, src = db.read_bytes(), tmp_path/'src'
    synth_ct(src/'s'/'a.dcm', 16)
    r = _cli(script, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--db', db, '--workers', '0')
    assert r.returncode == 2 and _last(r) == f"{script}: error: not a dicom_prep database: {db} (another program's SQLite file: give another --db)", r.stdout + r.stderr
    assert db.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith('theirs.db.')], list(tmp_path.iterdir())
