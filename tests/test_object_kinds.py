"""Non-image objects (SEG, RTSTRUCT, RTPLAN, SR, ...) never become NIfTI volumes; RT dose grids still do (issue 23).
Real files: pydicom's samples, and where ../shared holds them highdicom's SEGs and rt-utils' structure sets."""
import re, shutil, sqlite3, subprocess, warnings
from pathlib import Path

import nibabel as nib
import pydicom
import pytest

from conftest import console_script, ro
from dicom_prep.read import object_kind
from dicom_prep.sources import find_dicoms, sample_file, sample_files
from dicom_prep.synth import synth_series
from dicom_prep.volumes import VOLUME_KINDS

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'


def _header(path) -> pydicom.Dataset:
    "pydicom's own reading of `path`'s header."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _kinds(tree) -> dict:
    "Each DICOM file of `tree` (relative path) → what pydicom's reading of its header says it holds."
    return {str(p.relative_to(tree)): object_kind(_header(p)) for p, _ in find_dicoms(tree)}


@pytest.fixture(scope='module')
def tree(tmp_path_factory) -> Path:
    "CT (pydicom's CT2 series, which highdicom's SEGs reference) + SEG + RTSTRUCT + RTDOSE + RTPLAN + SR, real files all."
    src = tmp_path_factory.mktemp('kinds')/'src'
    ct2 = next(p for p in sample_files('*') if p.parent.name == 'CT2' and p.parent.parent.name == '77654033').parent
    shutil.copytree(ct2, src/'ct2')
    (src/'rt').mkdir(parents=True)
    for name in ('liver_1frame.dcm', 'rtstruct.dcm', 'rtdose.dcm', 'rtplan.dcm', 'test-SR.dcm'): shutil.copy(sample_file(name), src/'rt'/name)
    if (SHARED/'seg_highdicom').is_dir(): shutil.copytree(SHARED/'seg_highdicom', src/'highdicom', ignore=shutil.ignore_patterns('LICENSE', '*.md'))
    if (SHARED/'rtstruct_rtutils').is_dir(): shutil.copytree(SHARED/'rtstruct_rtutils'/'mock_data', src/'rtutils')
    return src


@pytest.fixture(scope='module')
def nifti_run(tree, tmp_path_factory):
    "`dicom_prep_nifti` over the tree: (output folder, completed process)."
    out = tmp_path_factory.mktemp('kinds_out')
    r = subprocess.run(console_script('dicom_prep_nifti') + ['--dicom-dir', str(tree), '--output-dir', str(out), '--workers', '2'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out, r


def test_no_volume_from_a_non_image_object(tree, nifti_run):
    "Every SEG, RTSTRUCT, RTPLAN and SR keeps its header record with its kind, and is in no volume; each volume is made of images or a dose grid."
    out, r = nifti_run
    kinds = _kinds(tree)
    others = {p for p, k in kinds.items() if k not in VOLUME_KINDS}
    assert {Path(p).name for p in others} >= {'liver_1frame.dcm', 'rtstruct.dcm', 'rtplan.dcm', 'test-SR.dcm'}
    if (SHARED/'seg_highdicom').is_dir(): assert {kinds['highdicom/seg_image_ct_binary.dcm'], kinds['highdicom/sr_document.dcm']} == {'seg', 'sr'}
    if (SHARED/'rtstruct_rtutils').is_dir(): assert kinds['rtutils/rt.dcm'] == 'rtstruct'
    conn = ro(out)
    cached = dict(conn.execute("select path, json_extract(record, '$.object_kind') from nifti_headers where record is not null"))
    assert {p: cached.get(p) for p in others} == {p: kinds[p] for p in others}
    in_volumes = {p for (p,) in conn.execute('select distinct path from volume_files')}
    assert not in_volumes & others and in_volumes
    assert not conn.execute("select modality from volumes where modality in ('SEG', 'RTSTRUCT', 'RTPLAN', 'SR')").fetchall()
    n = len(others)
    assert re.search(rf"{n} non-image objects indexed, not volumes: .*\bseg\b.*", r.stdout), r.stdout[-1500:]


def test_an_rt_dose_grid_is_still_a_volume(tree, nifti_run):
    "pydicom's 15-frame dose grid is converted, as dcm2niix converts it, with its frame of reference; CT2's volume has the CT's."
    out, _ = nifti_run
    conn = ro(out)
    [(vid, status, path, for_uid)] = conn.execute("select v.id, v.status, v.output_path, v.frame_of_reference from volumes v "
                                                   "join volume_files f on f.volume_id = v.id where f.path = 'rt/rtdose.dcm' group by v.id").fetchall()
    dose = _header(tree/'rt/rtdose.dcm')
    assert status == 'ok' and for_uid == dose.FrameOfReferenceUID
    assert nib.load(out/path).shape == (dose.Columns, dose.Rows, 15)
    ct_for = {_header(p).FrameOfReferenceUID for p in (tree/'ct2').iterdir()}
    assert {f for (f,) in conn.execute("select distinct v.frame_of_reference from volumes v join volume_files f on f.volume_id = v.id "
                                         "where f.path like 'ct2/%'")} == ct_for


def test_an_index_of_the_previous_version_is_set_right(tmp_path, monkeypatch):
    """Header records cached before object kinds (and a SEG's or RTSTRUCT's `volumes` rows and files) are corrected by the next
    run, which then equals a clean run; the run after it reads nothing again."""
    import dicom_prep.series as series
    from dicom_prep.nifti import dicom_to_nifti
    src = tmp_path/'src'
    synth_series(src/'ct', n=4)
    for name in ('liver.dcm', 'liver_1frame.dcm', 'rtstruct.dcm', 'rtdose.dcm'):
        try: shutil.copy(sample_file(name), src/name)
        except FileNotFoundError: pass                        # liver.dcm is pydicom-data's
    for seg in (SHARED/'seg_highdicom').glob('seg_image_ct_binary*.dcm'): shutil.copy(seg, src/seg.name)   # the old version converted these
    with monkeypatch.context() as m:     # the previous version: every object was taken for an image, and records had no kind
        m.setattr(series, 'object_kind', lambda ds: 'image')
        dicom_to_nifti(src, tmp_path/'old', n_workers=0, quiet=True)
    with sqlite3.connect(tmp_path/'old/dicom_prep.db') as c:
        c.execute("update nifti_headers set record = json_remove(record, '$.object_kind', '$.frame_of_reference')")
        c.execute('update volumes set frame_of_reference = null')
    assert {m for (m,) in ro(tmp_path/'old').execute('select modality from volumes')} >= {'SEG', 'RTSTRUCT'}
    old_segs = [p for (p,) in ro(tmp_path/'old').execute("select output_path from volumes where modality = 'SEG' and status = 'ok'")]
    assert all((tmp_path/'old'/p).is_file() for p in old_segs) and (old_segs or not (SHARED/'seg_highdicom').is_dir())
    r = dicom_to_nifti(src, tmp_path/'old', n_workers=0, quiet=True)
    clean = dicom_to_nifti(src, tmp_path/'clean', n_workers=0, quiet=True)
    rows = lambda out: sorted(tuple(x) for x in ro(out).execute('select id, output_name, verdict, status, frame_of_reference from volumes'))
    records = lambda out: sorted(tuple(x) for x in ro(out).execute('select path, record from nifti_headers'))
    assert rows(tmp_path/'old') == rows(tmp_path/'clean') and r.verdicts == clean.verdicts == {'ok': 2}
    assert [p for p, _ in records(tmp_path/'old')] == [p for p, _ in records(tmp_path/'clean')]
    assert all('"object_kind"' in rec for _, rec in records(tmp_path/'old'))
    files = lambda out: sorted(p.relative_to(out).as_posix() for p in (out/'nifti').rglob('*.nii.gz'))
    assert files(tmp_path/'old') == files(tmp_path/'clean') and len(files(tmp_path/'clean')) == 2
    assert not any((tmp_path/'old'/p).exists() for p in old_segs)
    again = dicom_to_nifti(src, tmp_path/'old', n_workers=0, quiet=True)
    assert next(t.n for t in again.timers if t.name == 'Headers') == 0 and rows(tmp_path/'old') == rows(tmp_path/'clean')


def test_preprocess_makes_no_image_of_a_non_image_object(tree, tmp_path):
    "`dicom_prep_preprocess` on the same tree: each non-image object is in `files` with its kind and status not_image, and has no image row or PNG; the CT, CR and DX images do, with their frame of reference."
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(tree), '--output-dir', str(tmp_path), '--workers', '2'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    conn = ro(tmp_path)
    files = {p: (s, k) for p, s, k in conn.execute('select path, status, kind from files')}
    kinds = _kinds(tree)
    assert {p: files[p] for p, k in kinds.items() if k != 'image'} == {p: ('not_image', k) for p, k in kinds.items() if k != 'image'}
    imaged = {p: f for p, f in conn.execute('select source_path, frame_of_reference from images')}
    assert set(imaged) == {p for p, k in kinds.items() if k == 'image'} and all(files[p] == ('ok', 'image') for p in imaged)
    assert all(f == _header(tree/p).get('FrameOfReferenceUID') for p, f in imaged.items())
    n = sum(k != 'image' for k in kinds.values())
    assert f"{n} non-image objects indexed, not images:" in r.stdout
