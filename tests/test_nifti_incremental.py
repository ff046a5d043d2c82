"""Incremental NIfTI analysis across schema versions and runs: a v4 index migrated mid-work, names that differ only by non-ASCII case, series that vanish whole."""
import shutil, sqlite3
from pathlib import Path
from contextlib import closing

import pytest

from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.series import read_headers
from dicom_prep.sources import Found, LocalFolder
from dicom_prep.synth import synth_series

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def _nifti(src, out, **kw):
    return dicom_to_nifti(src, out, n_workers=0, quiet=True, **kw)


def _as_v4_interrupted(db_path, src):
    """Leave `db_path` as schema v4 would after a run stopped between its header step and its analysis:
    headers of the current tree cached (vanished ones deleted), the analysis not redone; no v5 parts."""
    with closing(sqlite3.connect(db_path)) as c:
        known = {p for (p,) in c.execute('select path from nifti_headers')}
        found = [Found(Path(e.path), e.study, e.size, e.mtime_ns) for e in LocalFolder(src).entries()]
        paths = {str(f.path) for f in found}
        c.execute('delete from nifti_headers where path not in (%s)' % ','.join('?' * len(paths)), sorted(paths))
        for f in found:
            if str(f.path) in known: continue
            r = read_headers(f)
            c.execute('insert into nifti_headers (path, study_id, size, mtime_ns, error, record, read_at) values (?,?,?,?,?,?,?)',
                      (str(f.path), f.study_id, f.size, f.mtime_ns, r.error, r.to_json(), 'then'))
        c.execute('drop index nifti_headers_series'); c.execute('alter table nifti_headers drop column series_key')
        c.execute('drop table nifti_touched')
        c.execute("update meta set value='4' where key='schema_version'")
        c.commit()


def test_v4_headers_read_but_not_analysed_are_analysed_after_migration(tmp_path):
    "A v4 index whose last run cached new headers (and dropped vanished ones) but never analysed them: v5 must analyse them."
    src, out, study = tmp_path/'src', tmp_path/'out', '1.2.3.4'
    synth_series(src/'p1/ser1', n=4, series_uid='1.2.3.4.1', study_uid=study, series_number=1, description='a')
    synth_series(src/'p1/ser3', n=4, series_uid='1.2.3.4.3', study_uid=study, series_number=3, description='c', seed=3)
    _nifti(src, out, analysis_only=True)
    shutil.rmtree(src/'p1/ser3')
    synth_series(src/'p1/ser4', n=4, series_uid='1.2.3.4.4', study_uid=study, series_number=4, description='d', seed=4)
    _as_v4_interrupted(out/'dicom_prep.db', src)
    _nifti(src, out, analysis_only=True)
    clean = tmp_path/'clean'; _nifti(src, clean, analysis_only=True)
    q = lambda o: sorted(r for r in sqlite3.connect(o/'dicom_prep.db').execute("select series_uid, verdict from volumes where verdict != 'gone'"))
    assert q(out) == q(clean) == [('1.2.3.4.1', 'ok'), ('1.2.3.4.4', 'ok')]


def test_volume_names_differing_only_by_non_ascii_case_get_apart(tmp_path):
    "Names are unique ignoring case, as `unique_name` folds it (Unicode): a series arriving later must not differ only by 'Ä'/'ä'."
    src, out, study = tmp_path/'src', tmp_path/'out', '1.2.3.4'
    synth_series(src/'p1/a', n=3, series_uid='1.2.3.4.1', study_uid=study, series_number=1, description='Ärger')
    _nifti(src, out, analysis_only=True)
    synth_series(src/'p1/b', n=3, series_uid='1.2.3.4.2', study_uid=study, series_number=1, description='ärger', seed=2)
    _nifti(src, out, analysis_only=True)
    clean = tmp_path/'clean'; _nifti(src, clean, analysis_only=True)
    names = lambda o: sorted(n for (n,) in sqlite3.connect(o/'dicom_prep.db').execute('select output_name from volumes'))
    assert len({n.lower() for n in names(out)}) == 2
    assert names(out) == names(clean)


def test_a_series_gone_as_a_whole_leaves_no_volume_files(tmp_path):
    "A volume whose files all left the tree is `gone`; its `volume_files` rows must go too (as a clean run's and schema v4's)."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_series(src/'p1/a', n=3, series_uid='1.2.3.4.1', series_number=1)
    synth_series(src/'p1/b', n=3, series_uid='1.2.3.4.2', series_number=2, seed=2)
    _nifti(src, out, analysis_only=True)
    shutil.rmtree(src/'p1/b')
    _nifti(src, out, analysis_only=True)
    with closing(sqlite3.connect(out/'dicom_prep.db')) as c:
        assert c.execute("select count(*) from volume_files where path like '%/p1/b/%'").fetchone()[0] == 0
        assert c.execute("select verdict from volumes where series_uid = '1.2.3.4.2'").fetchone()[0] == 'gone'


def test_a_volume_no_longer_ok_loses_its_files(tmp_path):
    "A slice removed from the middle of a converted series: the volume is refused, and its .nii.gz and sidecar leave the folder."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_series(src/'s', n=6, series_number=1, description='ax')
    r = _nifti(src, out, sidecar=True)
    assert r.counts == {'converted': 1}
    written = sorted(p.name for p in (out/'nifti').rglob('*') if p.is_file())
    assert len(written) == 2
    sorted((src/'s').glob('*.dcm'))[2].unlink()
    r = _nifti(src, out, sidecar=True)
    assert r.verdicts == {'missing slices': 1}
    assert not [p for p in (out/'nifti').rglob('*') if p.is_file()], "a refused volume's old files are still there"
    with closing(sqlite3.connect(out/'dicom_prep.db')) as c:
        assert c.execute('select output_path, sidecar_path, status from volumes').fetchall() == [(None, None, 'skipped')]
