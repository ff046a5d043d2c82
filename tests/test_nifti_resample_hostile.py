"""Issue 28's `--resample both` and UIH sidecars as a hostile user drives them: modes switched between runs on one output
folder, the copies fed to a training export, malformed UIH slice times. Each test failed before its fix (named in its docstring)."""
import json

import pydicom
import pytest

from dicom_prep.db import open_db
from dicom_prep.export import export, volumes_df
from dicom_prep.synth import synth_series
from test_nifti import ours
from test_nifti_dcm2niix_diffs import tilted_ct, uih_dti

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def two_series(src):
    "A tilted CT (ok as acquired, plus a `_Tilt_1` copy) and a CT with a missing slice (refused as acquired: only its `_Eq_1` copy)."
    tilted_ct(src/'tilt', -1024, SeriesNumber=1)
    synth_series(src/'gap', rows=6, cols=4, series_number=2, description='gap', positions=[(0, 0, 2.5 * k) for k in range(8) if k != 4])


def written(out) -> list[str]:
    "Every file under the output's nifti folder, relative to it."
    return sorted(str(p.relative_to(out/'nifti')) for p in (out/'nifti').rglob('*') if p.is_file())


@pytest.mark.parametrize('mode', [False, True])
def test_switching_off_both_removes_the_copies(mode, tmp_path):
    """`both`, then `no` or `yes` with --force: the copies are made no more, so their files (image and sidecar) go, and
    their rows with them; no row claims that source files left the DICOM folder, for they are all still there.
    (Before: the `_Tilt_1`/`_Eq_1` files stayed beside the new outputs, their rows 'gone'.)"""
    two_series(tmp_path/'src')
    ours(tmp_path/'src', tmp_path/'out', resample='both', sidecar=True)
    assert sum(n.endswith(('_Tilt_1.nii.gz', '_Eq_1.nii.gz')) for n in written(tmp_path/'out')) == 2
    ours(tmp_path/'src', tmp_path/'out', resample=mode, sidecar=True, force=True)
    _, plain = ours(tmp_path/'src', tmp_path/f'fresh{mode}', resample=mode, sidecar=True)
    assert written(tmp_path/'out') == written(tmp_path/f'fresh{mode}') and plain
    rows = list(open_db(tmp_path/'out'/'dicom_prep.db').query('select verdict, suffix from volumes'))
    assert [r for r in rows if r['verdict'] == 'gone' or r['suffix']] == []


def test_both_then_both_again_after_no_writes_the_copies_again(tmp_path):
    "`both`, `no`, `both` (each with --force): the copies come back, under the same names as the first time."
    two_series(tmp_path/'src')
    first = written(ours(tmp_path/'src', tmp_path/'out', resample='both')[0].output_dir)
    for mode in (False, 'both'): ours(tmp_path/'src', tmp_path/'out', resample=mode, force=True)
    assert written(tmp_path/'out') == first


def test_export_takes_one_case_per_acquisition(tmp_path):
    """nnU-Net/MONAI of a `--resample both` index: a series converted as acquired is one case, its resampled copy left out
    (with a note saying so) rather than a second, near-identical training case; a series refused as acquired is exported
    as its copy. `volumes_df` names each copy's acquired volume (`copy_of`).
    (Before: the tilted series was two cases, `001_..` and `001_.._Tilt_1`.)"""
    two_series(tmp_path/'src')
    ours(tmp_path/'src', tmp_path/'out', resample='both')
    df = volumes_df(tmp_path/'out'/'dicom_prep.db')
    assert len(df) == 3
    acquired = df.loc[df['copy_of'].isna(), 'id']
    assert len(acquired) == 2 and set(df['copy_of'].dropna()) <= set(acquired)
    for fmt in ('nnunet', 'monai'):
        r = export(tmp_path/'out'/'dicom_prep.db', tmp_path/fmt, fmt)
        cases = sorted(p.name for p in (tmp_path/fmt).rglob('*.nii.gz'))
        assert len(cases) == 2 and not any('_Tilt_1' in c for c in cases) and any('_Eq_1' in c for c in cases), cases
        assert any('resampled cop' in n and '1' in n for n in r.notes), r.notes


@pytest.mark.parametrize('bad', ['13:52:59', 'N/A', '99'])
def test_uih_malformed_slice_time_leaves_the_volume_whole(bad, tmp_path):
    """A UIH DTI whose (0065,1051) items hold one malformed AcquisitionTime (ACR-NEMA colons, text, too short): the
    volume converts, its sidecar's AcquisitionTime is the earliest well-formed slice time.
    (Before: `float('13:52:59')` raised in the sidecar, and the volume was an error with its .nii.gz left on disk.)"""
    uih_dti(tmp_path/'src')
    for p in sorted((tmp_path/'src').rglob('*.dcm')):
        ds = pydicom.dcmread(p)
        ds[0x0065, 0x1051].value[1].AcquisitionTime = bad
        ds.save_as(p)
    r, [mine] = ours(tmp_path/'src', tmp_path/'out', sidecar=True)
    assert r.counts.get('converted') == 1 and not r.counts.get('error')
    assert json.loads(mine.with_name(mine.name[:-7] + '.json').read_text())['AcquisitionTime'] == '13:52:57.000000'


def test_a_copy_is_named_after_its_acquired_volume(tmp_path):
    """Two tilted series whose names collide (a template without the series number): each copy is its acquired volume's
    name plus dcm2niix's suffix, so the pair is found by name; a template placing `{suffix}` itself is followed as given.
    (Before: series 3's volume was `CT_3` and its copy `CT_Tilt_1_2`, made unique after the suffix.)"""
    from pydicom.uid import generate_uid
    study = generate_uid()
    for n in (1, 3): tilted_ct(tmp_path/'src'/f's{n}', -1024, SeriesNumber=n, StudyInstanceUID=study)
    synth_series(tmp_path/'src'/'s2', rows=6, cols=4, series_number=2, study_uid=study)
    for template, want in (('{modality}', ['CT', 'CT_2', 'CT_3', 'CT_3_Tilt_1', 'CT_Tilt_1']),
                           ('{modality}{suffix}/{series_number}', ['CT/1', 'CT/2', 'CT/3', 'CT_Tilt_1/1', 'CT_Tilt_1/3'])):
        out = tmp_path/template.replace('/', '_')
        ours(tmp_path/'src', out, resample='both', name_template=template)
        assert sorted(v['output_name'] for v in open_db(out/'dicom_prep.db').query('select output_name from volumes')) == want
