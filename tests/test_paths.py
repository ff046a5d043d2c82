"""A folder you can hand over (issue 24): every path read from an index stays under its root, `--prune` refuses to wipe
the index when the source is not there, an output folder is moved or copied whole, the `.db` file alone is the whole
index, one tree under any spelling of its root is one tree, and an index from a newer dicom_prep is refused untouched."""
import json, os, shutil, sqlite3, subprocess
from contextlib import closing
from pathlib import Path

import pytest

from dicom_prep.privacy import attach_private, source_id
from dicom_prep.db import open_db
from dicom_prep.export import export
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_ct, synth_dicom, synth_series
from conftest import console_script, query

SECRET = b'-----BEGIN OPENSSH PRIVATE KEY----- (not for a training set)'


def _cli(name, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(console_script(f'dicom_prep_{name}') + [str(a) for a in args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)

def _corpus(src, n=6) -> Path:
    for i in range(n): synth_ct(src/f'study_{i % 2}/im{i:02d}.dcm', 16, seed=i)
    return src

def _edit(out, sql, args=()):
    "Edit a run's index as a hostile sender (or a careless user) would."
    with closing(sqlite3.connect(Path(out)/'dicom_prep.db')) as c:
        with c: c.execute(sql, args)
        c.execute('pragma wal_checkpoint(TRUNCATE)')          # the edit is in the .db file itself

def _refused(r, *needles):
    "Exit 2 with one line (no traceback) holding every needle."
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, (r.returncode, r.stderr)
    assert all(n in lines[0] for n in needles), (needles, lines[0])

def _leaked(folder) -> list[Path]:
    "Files under `folder` holding the secret's bytes (a tar shard holds its members' bytes as they are)."
    return [p for p in Path(folder).rglob('*') if p.is_file() and SECRET in p.read_bytes()]

def _pngs(out) -> set[int]:
    return {p.stat().st_ino for p in (Path(out)/'images').rglob('*.png')}

@pytest.fixture
def made(tmp_path):
    "A source tree, its output folder made by a run, and a private file beside them."
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    (tmp_path/'home').mkdir(); (tmp_path/'home/id_rsa').write_bytes(SECRET)
    return src, out, tmp_path/'home/id_rsa'

# ----------------------------------------------------------------------------------------------------------------------
# 1. Every path read from an index stays strictly under its root

HOSTILE = {'dotdot': lambda out, secret: os.path.relpath(secret, out),                 # '../home/id_rsa'
           'absolute': lambda out, secret: str(secret),
           'dotdot inside': lambda out, secret: 'images/../' + os.path.relpath(secret, out)}

@pytest.mark.parametrize('fmt', ['webdataset', 'imagefolder'])
@pytest.mark.parametrize('how', [*HOSTILE, 'planted symlink'])
def test_export_refuses_an_index_path_leading_out(made, tmp_path, how, fmt):
    "`update images set thumbnail_path='../home/id_rsa'` (or a symlink planted under images/): one line naming the row, nothing copied."
    src, out, secret = made
    [(name, png)] = query(out, 'select filename, thumbnail_path from images order by filename limit 1')
    if how in HOSTILE: _edit(out, 'update images set thumbnail_path = ? where filename = ?', [HOSTILE[how](out, secret), name])
    else: (out/png).unlink(); (out/png).symlink_to(secret)
    r = _cli('export', '--db', out/'dicom_prep.db', '--out', tmp_path/'x', '--format', fmt, '--label-column', 'modality')
    _refused(r, f"images row {name!r}: thumbnail_path")
    assert not _leaked(tmp_path/'x')


def test_an_index_dropped_alone_into_a_folder_reads_nothing_there(made, tmp_path):
    "A received dicom_prep.db put into a home folder names images/ there: that folder is not its output folder, nothing is read."
    src, out, secret = made
    home = tmp_path/'home'; (home/'images').mkdir(); (home/'images/holiday.png').write_bytes(SECRET)
    _edit(out, 'select 1'); shutil.copy(out/'dicom_prep.db', home/'dicom_prep.db')
    _edit(home, "update images set thumbnail_path = 'images/holiday.png'")
    _edit(home, "update meta set value = ? where key = 'preprocess_output_dir'", [json.dumps(str(home))])   # "my folder is where I lie"
    r = _cli('export', '--db', home/'dicom_prep.db', '--out', tmp_path/'x', '--format', 'webdataset')
    _refused(r, 'output folder, which does not belong to it')
    assert not _leaked(tmp_path/'x')


def test_export_refuses_a_recorded_item_leading_out(made, tmp_path):
    "An export's own records are read back too: a recorded item leading out of --out is refused, never removed."
    src, out, secret = made
    assert export(out/'dicom_prep.db', tmp_path/'x', 'imagefolder', label_col='modality').written == 6
    [(item,)] = query(out, 'select item from export_items order by item limit 1')
    _edit(out, 'update export_items set item = ? where item = ?', [os.path.relpath(secret, tmp_path/'x'), item])
    r = _cli('export', '--db', out/'dicom_prep.db', '--out', tmp_path/'x', '--format', 'imagefolder', '--label-column', 'modality')
    _refused(r, 'export_items row')
    assert secret.read_bytes() == SECRET


def test_export_drops_records_of_a_folder_it_did_not_write(made, tmp_path):
    "A received index's records of a folder the recipient exports into (and keeps a file in) are not trusted: nothing there goes."
    src, out, secret = made
    x = tmp_path/'x'; x.mkdir(); (x/'keep.txt').write_bytes(SECRET)
    for key in (str(x), os.path.relpath(x, out)):                       # as recorded before schema 6, and after
        _edit(out, "insert into export_items (out_dir, item, sig) values (?, 'keep.txt', 'forged')", [key])
    r = _cli('export', '--db', out/'dicom_prep.db', '--out', x, '--format', 'imagefolder', '--label-column', 'modality')
    assert r.returncode == 0 and (x/'keep.txt').read_bytes() == SECRET, r.stderr
    assert len(list(x.rglob('*.png'))) == 6


def test_preprocess_never_deletes_or_reads_through_an_index_path(made):
    "A source now of two frames replaces its image; --verify reads them: a row leading out stops the run, the file outside intact."
    src, out, secret = made
    [(name, source)] = query(out, 'select filename, source_path from images order by filename limit 1')
    _edit(out, 'update images set thumbnail_path = ? where filename = ?', [os.path.relpath(secret, out), name])
    synth_dicom(src/source, 16, 16, frames=2)
    for extra in ((), ('--verify',)):
        r = _cli('preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', 0, *extra)
        _refused(r, f"images row {name!r}: thumbnail_path")
        assert secret.read_bytes() == SECRET


def test_nifti_never_deletes_or_reads_through_an_index_path(tmp_path):
    "A recorded source frame, or a volume's recorded output, leading out of its root: refused, nothing read or deleted."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_series(src/'s', n=4)
    dicom_to_nifti(src, out, n_workers=0, quiet=True)
    [(vid,)] = query(out, "select id from volumes where status = 'ok'")
    outside = tmp_path/'outside.dcm'; shutil.copy(next((src/'s').glob('*.dcm')), outside)    # a DICOM outside the source tree
    _edit(out, 'update volume_files set path = ? where rowid = (select min(rowid) from volume_files)', [str(outside)])
    _edit(out, "update volumes set status = 'pending' where id = ?", [vid])
    _refused(_cli('nifti', '--dicom-dir', src, '--output-dir', out, '--workers', 0), f"volume_files row {vid!r}: path")
    victim = tmp_path/'victim.nii.gz'; victim.write_bytes(SECRET)
    _edit(out, "update volumes set output_path = ?, status = 'ok' where id = ?", [os.path.relpath(victim, out), vid])
    r = _cli('nifti', '--dicom-dir', src, '--output-dir', out, '--workers', 0, '--name-template', '{series_number}_x', '--force')
    _refused(r, f"volumes row {vid!r}: output_path")
    assert victim.read_bytes() == SECRET


def test_sheet_and_status_refuse_a_hostile_index(made, tmp_path):
    "The contact sheet does not draw a file outside the folder; status does not attach a private state the index points at."
    src, out, secret = made
    _edit(out, 'update images set thumbnail_path = ?', [os.path.relpath(secret, out)])
    _refused(_cli('sheet', '--db', out/'dicom_prep.db', '--out', tmp_path/'s.png', '--n', 0), 'thumbnail_path')
    p = _cli('preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'pseudo', '--pseudonymize', '--workers', 0)
    assert p.returncode == 0, p.stderr
    planted = tmp_path/'planted'; planted.mkdir()                      # a database the index should not lead status to
    with closing(sqlite3.connect(f"{planted}.private.db")) as c, c:
        c.execute('create table files (path text, status text, error text)')
        c.execute("insert into files values ('PLANTED/x.dcm', 'unreadable', 'planted')")
    for where in (str(planted), os.path.relpath(planted, tmp_path/'pseudo')):
        _edit(tmp_path/'pseudo', "update meta set value = ? where key = 'preprocess_output_dir'", [json.dumps(where)])
        r = _cli('status', '--db', tmp_path/'pseudo/dicom_prep.db', '--errors')
        assert 'PLANTED' not in r.stdout + r.stderr, r.stdout

# ----------------------------------------------------------------------------------------------------------------------
# 3. --prune while the source mount is down

def test_prune_refuses_an_empty_source_and_a_mass_forgetting(tmp_path):
    src, out = _corpus(tmp_path/'mnt', 20), tmp_path/'out'
    prune = lambda *extra: _cli('preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', 0, '--prune', *extra)
    assert prune().returncode == 0
    before = {p: p.read_bytes() for p in (out/'images').rglob('*.png')}
    src.rename(tmp_path/'away'); src.mkdir()                             # the mount is down for a moment
    for extra in ((), ('--force',)):
        _refused(prune(*extra), 'no DICOM file found under', 'is the source mounted')
        assert query(out, 'select count(*) from images') == [(20,)] and {p: p.read_bytes() for p in before} == before
    src.rmdir(); (tmp_path/'away').rename(src)
    gone = sorted(src.rglob('*.dcm'))[:11]
    for p in gone: p.unlink()
    _refused(prune(), 'would forget 11 of the 20 recorded files', '--prune --force')
    assert query(out, 'select count(*) from images') == [(20,)]
    assert prune('--force').returncode == 0 and query(out, 'select count(*) from images') == [(9,)]
    for p in sorted(src.rglob('*.dcm'))[:2]: p.unlink()
    r = prune()                                                          # 2 of 9: the ordinary case
    assert r.returncode == 0 and 'Pruned 2 files' in r.stdout and query(out, 'select count(*) from images') == [(7,)]

# ----------------------------------------------------------------------------------------------------------------------
# 10. An output folder moved or copied whole

def test_a_moved_output_folder_exports_and_resumes(tmp_path):
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    assert export(out/'dicom_prep.db', out/'wds', 'webdataset').written == 6            # an export inside it moves along
    shutil.move(out, tmp_path/'moved'); moved = tmp_path/'moved'
    r = export(moved/'dicom_prep.db', moved/'wds', 'webdataset')
    assert (r.n_items, r.written) == (6, 0)
    r = export(moved/'dicom_prep.db', tmp_path/'folder', 'imagefolder', label_col='modality')
    assert {p.stat().st_ino for p in (tmp_path/'folder').rglob('*.png')} == _pngs(moved)
    r = _cli('preprocess', '--dicom-dir', src, '--output-dir', moved, '--workers', 0)
    assert r.returncode == 0 and 'unchanged 6' in r.stdout, r.stdout + r.stderr


def test_a_copied_output_folder_is_an_index_of_its_own(tmp_path):
    "The copy's export links the copy's PNGs, never the sender's; the copy runs without --force and leaves the sender alone."
    src, out, copy = _corpus(tmp_path/'src'), tmp_path/'out', tmp_path/'copy'
    preprocess(src, out, n_workers=0, quiet=True)
    export(out/'dicom_prep.db', tmp_path/'sent', 'imagefolder', label_col='modality')
    shutil.copytree(out, copy)
    export(copy/'dicom_prep.db', tmp_path/'mine', 'imagefolder', label_col='modality')
    linked = {p.stat().st_ino for p in (tmp_path/'mine').rglob('*.png')}
    assert len(linked) == 6 and linked <= _pngs(copy) and not linked & _pngs(out)
    sender = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    r = _cli('preprocess', '--dicom-dir', src, '--output-dir', copy, '--workers', 0)
    assert r.returncode == 0 and 'unchanged 6' in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == sender
    r = _cli('export', '--db', copy/'dicom_prep.db', '--out', tmp_path/'sent', '--format', 'imagefolder', '--label-column', 'modality')
    _refused(r, 'holds the export of another index', str(out/'dicom_prep.db'))


def _as_before_schema_6(src, out):
    "Rewrite a fresh index as dicom_prep wrote it before schema 6: absolute output folder, owner and source paths."
    root = os.path.realpath(src)
    _edit(out, "update meta set value = ? where key = 'preprocess_output_dir'", [json.dumps(str(out))])
    _edit(out, "update meta set value = '5' where key = 'schema_version'")
    _edit(out, "update files set path = ? || '/' || path", [root])
    _edit(out, "update images set source_path = ? || '/' || source_path", [root])
    (out/'.dicom_prep_db').write_text(f"{out/'dicom_prep.db'}\n")


def test_a_folder_written_before_schema_6_moves_too(tmp_path):
    "Its absolute paths are migrated: the moved folder exports its own PNGs, and resumes without redoing a file."
    src, out, moved = _corpus(tmp_path/'src'), tmp_path/'out', tmp_path/'moved'
    preprocess(src, out, n_workers=0, quiet=True)
    _as_before_schema_6(src, out)
    shutil.move(out, moved)
    export(moved/'dicom_prep.db', tmp_path/'folder', 'imagefolder', label_col='modality')
    assert {p.stat().st_ino for p in (tmp_path/'folder').rglob('*.png')} == _pngs(moved)
    r = _cli('preprocess', '--dicom-dir', src, '--output-dir', moved, '--workers', 0)
    assert r.returncode == 0 and 'unchanged 6' in r.stdout, r.stdout + r.stderr
    assert all(not p.startswith('/') for (p,) in query(moved, 'select path from files union all select source_path from images'))


def test_a_pseudonymised_index_written_before_schema_6_keeps_its_images(tmp_path):
    "Its private paths become relative and its images' keyed source ids follow: a changed file replaces its images, no duplicate."
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True, pseudonymize=True)
    root, db = os.path.realpath(src), open_db(out/'dicom_prep.db')
    key = attach_private(db, f"{out}.private.db")
    with db.atomic():
        for (p,) in db.execute('select path from files').fetchall():
            db.execute('update images set source_path = ? where source_path = ?', [source_id(f'{root}/{p}', key), source_id(p, key)])
        db.execute("update files set path = ? || '/' || path", [root])
        db.execute("update meta set value = '5' where key = 'schema_version'")
    db.close()
    os.utime(sorted(src.rglob('*.dcm'))[0], ns=(10**9, 10**9))
    r = preprocess(src, out, n_workers=0, quiet=True, pseudonymize=True)
    assert (r.counts, r.n_images) == ({'ok': 1, 'unchanged': 5}, 6)

# ----------------------------------------------------------------------------------------------------------------------
# 11. The .db file alone is the whole index when no run is active

def _alone(out, tmp_path, table) -> int:
    "Rows of `table` in a copy of the `.db` file alone (no -wal beside it)."
    shutil.copy(out/'dicom_prep.db', tmp_path/'alone.db')
    with closing(sqlite3.connect(tmp_path/'alone.db')) as c: return c.execute(f'select count(*) from {table}').fetchone()[0]

def test_the_db_file_alone_is_the_whole_index(tmp_path):
    "After a run or an export from Python (its connection still open), the .db file copied alone holds every row."
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    wal = lambda: (out/'dicom_prep.db-wal').stat().st_size if (out/'dicom_prep.db-wal').exists() else 0
    r = preprocess(src, out, n_workers=0, quiet=True)
    assert (wal(), _alone(out, tmp_path, 'images')) == (0, 6), r
    export(out/'dicom_prep.db', tmp_path/'x', 'imagefolder', label_col='modality')
    assert (wal(), _alone(out, tmp_path, 'export_items')) == (0, 6)
    synth_series(src/'series', n=4)
    dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert wal() == 0 and _alone(out, tmp_path, 'volumes') == query(out, 'select count(*) from volumes')[0][0] > 0

# ----------------------------------------------------------------------------------------------------------------------
# 12. One tree under any spelling of its root

def test_an_alias_of_the_source_root_is_the_same_tree(tmp_path):
    "`src_b -> src_a`, then a relative path against an absolute one through a symlinked folder: nothing is done twice."
    src, out = _corpus(tmp_path/'src_a'), tmp_path/'out'
    (tmp_path/'src_b').symlink_to(src, target_is_directory=True); (tmp_path/'link').symlink_to(tmp_path, target_is_directory=True)
    for root, cwd in ((src, None), (tmp_path/'src_b', None), (tmp_path/'link/src_a', None), ('src_a', tmp_path)):
        r = _cli('preprocess', '--dicom-dir', root, '--output-dir', out, '--workers', 0, cwd=cwd)
        assert r.returncode == 0 and 'gone from disk' not in r.stdout, r.stdout + r.stderr
        assert query(out, 'select count(*) from images') == [(6,)] and query(out, 'select count(*) from files') == [(6,)]
    assert 'unchanged 6' in r.stdout
    synth_series(src/'series', n=4)
    first = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    r = dicom_to_nifti(tmp_path/'src_b', out, n_workers=0, quiet=True)
    assert r.counts == {'already_done': first.counts['converted']} and next(t.n for t in r.timers if t.name == 'Headers') == 0


def test_a_different_source_root_is_refused_unless_rebased(tmp_path):
    "A source that really moved is one --rebase away, and nothing is redone; other files need another output folder."
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    synth_series(src/'series', n=4)
    assert _cli('preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', 0).returncode == 0
    dicom_to_nifti(src, out, n_workers=0, quiet=True)
    src.rename(tmp_path/'new_home'); new = tmp_path/'new_home'
    r = _cli('preprocess', '--dicom-dir', new, '--output-dir', out, '--workers', 0)
    _refused(r, f'source root: {os.path.realpath(tmp_path)}/src in the database', '--rebase', '--output-dir')
    r = _cli('preprocess', '--dicom-dir', new, '--output-dir', out, '--workers', 0, '--rebase')
    assert r.returncode == 0 and 'unchanged 10' in r.stdout and 'gone from disk' not in r.stdout, r.stdout + r.stderr
    r = _cli('nifti', '--dicom-dir', new, '--output-dir', out, '--workers', 0, '--rebase')
    n_ok = query(out, "select count(*) from volumes where status = 'ok'")[0][0]
    assert r.returncode == 0 and f'already done {n_ok}' in r.stdout and 'converted' not in r.stdout, r.stdout + r.stderr
    assert export(out/'dicom_prep.db', tmp_path/'x', 'imagefolder', label_col='modality').n_items == 10

# ----------------------------------------------------------------------------------------------------------------------
# 15. An index from a newer dicom_prep

@pytest.mark.parametrize('script', ['preprocess', 'export'])
def test_an_index_from_a_newer_dicom_prep_is_refused_untouched(tmp_path, script):
    src, out = _corpus(tmp_path/'src', 2), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    _edit(out, "update meta set value = '99' where key = 'schema_version'")
    before = (out/'dicom_prep.db').read_bytes()
    args = (('--dicom-dir', src, '--output-dir', out, '--workers', 0) if script == 'preprocess' else
            ('--db', out/'dicom_prep.db', '--out', tmp_path/'x'))
    _refused(_cli(script, *args), 'written by a newer dicom_prep (schema 99 > ', '; upgrade')
    assert (out/'dicom_prep.db').read_bytes() == before and not list(out.glob('*.corrupt-*'))
