"""Issue 28's differences from dcm2niix, each checked against dcm2niix's own output on a synthesised case (or real data
where we have it): the Philips trace volume (`_ADC`), the fill outside a resampled slab,
a verdict for a spacing that changes, UIH DTI sidecars, `--resample both`'s `_Tilt_1`/`_Eq_1` copies, ...

dcm2niix comes with the dev extra (its pip package); the tests that run it skip when it is absent."""
import gzip, os, subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_prep.db import open_db
from dicom_prep.synth import synth_philips_dwi, synth_series
from test_nifti import DCM2NIIX, canonical, needs_dcm2niix, ours
from test_nifti_vendors import d2n_extra

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')
NIB_DATA = Path(nib.__file__).parent/'nicom'/'tests'/'data'


def dcm2niix_named(src, dest, *flags) -> dict:
    "dcm2niix's output of `src` with its own names (%s: series number, plus its suffixes): {name without .nii.gz: path}."
    dest.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != 'MALLOC_TRIM_THRESHOLD_'}   # Dask sets it for the whole process once a
    r = subprocess.run([DCM2NIIX, '-z', 'y', '-b', 'y', '-f', '%s', *flags, '-o', str(dest), str(src)],   # cluster ran: with it,
                       capture_output=True, text=True, env=env)                  # dcm2niix exits 245 on some mosaics
    assert r.returncode == 0, f'dcm2niix exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}'
    return {p.name[:-7]: p for p in dest.glob('*.nii.gz')}


def by_suffix(files, stem='') -> dict:
    "Our .nii.gz files by what follows the series part of their name, e.g. {'': ..., '_ADC': ...}."
    return {p.name[:-7].split('_dwi', 1)[-1] if '_dwi' in p.name else p.name[:-7]: p for p in files}


@needs_dcm2niix
def test_philips_trace_volume_is_set_apart_as_dcm2niix(tmp_path):
    """A Philips DWI with a derived isotropic (trace) volume last: the DWI is written without it (4 volumes, its .bval/.bvec
    too), and the whole series beside it as `_ADC` (5 volumes, no .bval), the same voxels as dcm2niix writes."""
    synth_philips_dwi(tmp_path/'src')
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    assert sorted(theirs) == ['1', '1_ADC']
    mine = by_suffix(mine)
    assert sorted(mine) == ['', '_ADC'] and r.verdicts == {'ok': 2}
    for suffix, name in (('', '1'), ('_ADC', '1_ADC')):
        a, b = canonical(mine[suffix])[0], canonical(theirs[name])[0]
        assert a.shape == b.shape and np.array_equal(a, b), suffix
    assert nib.load(mine['']).shape[3] == 4 and nib.load(mine['_ADC']).shape[3] == 5
    bval = lambda p: p.with_name(p.name[:-7] + '.bval')
    assert bval(mine['']).read_text().split() == bval(theirs['1']).read_text().split() == ['0', '1000', '1000', '1000']
    assert not bval(mine['_ADC']).exists() and not bval(theirs['1_ADC']).exists()


@needs_dcm2niix
def test_philips_b0_and_trace_pair_stays_whole(tmp_path):
    "A b=0 + trace pair is one volume of two, as dcm2niix leaves it: the trace is the only diffusion-weighted image."
    synth_philips_dwi(tmp_path/'src', bvals=(0, 1000), bvecs=((0, 0, 0),) * 2, isotropic=(False, True))
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    assert sorted(theirs) == ['1'] and len(mine) == 1 and nib.load(mine[0]).shape[3] == 2


def test_philips_enhanced_mprage_has_no_adc(tmp_path):
    "nibabel's real Philips enhanced MPRAGE (no diffusion) is one volume, no `_ADC` copy."
    (tmp_path/'src').mkdir()
    (tmp_path/'src'/'philips.dcm').write_bytes(gzip.decompress((NIB_DATA/'philips_mprage.dcm.gz').read_bytes()))
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    assert len(mine) == 1 and '_ADC' not in mine[0].name


def tilted_ct(folder, intercept, **tags):
    "A CT stack with gantry tilt (0.2 mm of y per mm of z), stored values from 50 up: a stored 0 is not its darkest voxel."
    return synth_series(folder, rows=6, cols=4, positions=[np.array([-5., 4 + 0.2 * z, 20 + z]) for z in (0, 2.5, 5, 7.5, 10)],
                        intercept=intercept, GantryDetectorTilt='11.3', pixels=lambda k: np.arange(24).reshape(6, 4) * 10 + 1000 * k + 50, **tags)


@needs_dcm2niix
@pytest.mark.parametrize('intercept,pad', [(0, None), (-1024, None), (-1024, -2000)])
def test_resample_fills_outside_the_slab_as_dcm2niix(intercept, pad, tmp_path):
    """Voxels a tilted slab does not cover hold the series' PixelPaddingValue, else its darkest voxel, in the written
    values (intercept applied): what dcm2niix's `_Tilt` copy holds there, never a stored 0 (0 HU, water, at −1024)."""
    tilted_ct(tmp_path/'src', intercept, **({} if pad is None else dict(PixelPaddingValue=pad)))
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', resample=True)
    a, b = nib.load(mine).get_fdata(), d2n_extra(tmp_path/'src', tmp_path/'d2n', 'Tilt').get_fdata()
    fill = (50 if pad is None else pad) + intercept
    assert a.min() == b.min() == fill
    uncovered = a.shape[1] - 6                                     # rows the shift adds; the first slice lies in the last 6
    assert (a[:, :uncovered, 0] == fill).all() and (b[:, :uncovered, 0] == fill).all()


@needs_dcm2niix
def test_spacing_change_verdict_names_it_and_resample_converts_it(tmp_path):
    """A GE-like series, 4.22 mm apart, one 1.14 mm step, then 7.38 mm apart: nothing is missing, the spacing changes,
    and the verdict says where; --resample (the way out it names) writes it as dcm2niix's `_Eq_` copy: 58 slices, twice
    the 29 it has, 2.74 mm apart (not 138 at the 1.14 mm step), the same voxels and affine."""
    zs = [4.22 * k for k in range(15)] + [4.22 * 14 + 1.14 + 7.38 * k for k in range(14)]
    synth_series(tmp_path/'src', rows=6, cols=4, positions=[(0, 0, z) for z in zs])
    r, mine = ours(tmp_path/'src', tmp_path/'plain')
    assert mine == [] and r.verdicts == {'spacing changes': 1}
    [reason] = [v['reason'] for v in open_db(tmp_path/'plain'/'dicom_prep.db')['volumes'].rows]
    assert reason == 'spacing changes from 4.22 to 7.38 mm at slice 15 (--resample writes it on an equidistant grid)'
    r, [vol] = ours(tmp_path/'src', tmp_path/'resampled', resample=True)
    a, theirs = nib.load(vol), d2n_extra(tmp_path/'src', tmp_path/'d2n', 'Eq')
    assert r.verdicts == {'ok': 1} and a.shape == theirs.shape == (4, 6, 58)
    assert a.header.get_zooms()[2] == pytest.approx(theirs.header.get_zooms()[2], abs=1e-4) == pytest.approx(156.16 / 57, abs=1e-4)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_allclose(a.affine, theirs.affine, atol=1e-4)


def siemens_xa(path, frame_times=(500, 1500, 0, 1000), pe_positive=1, bandwidth_pe=27.778):
    """A Siemens XA enhanced EPI file: 4 slices acquired at `frame_times` (ms; frame 0 is not the first), phase encoded
    along columns ('COLUMN' in MRFOVGeometrySequence), polarity and bandwidth in each frame's private (0021,11FE) item."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from dicom_prep.synth import item, synth_enhanced
    from dicom_prep.vendor import XA_SDI
    ds = dcmread(synth_enhanced(path, n=4, frame_times=frame_times, Manufacturer='Siemens Healthineers', SoftwareVersions='syngo MR XA30',
                                ImageType=['ORIGINAL', 'PRIMARY', 'M', 'ND'], MRAcquisitionType='2D', AcquisitionDateTime='20240101120000.000000'))
    ds.SharedFunctionalGroupsSequence[0].MRFOVGeometrySequence = [item(InPlanePhaseEncodingDirection='COLUMN')]
    ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence = [item(RepetitionTime=2000.)]
    for f in ds.PerFrameFunctionalGroupsSequence:       # SDS 01 holds block 0x10, as in XA files: SDI 02's elements are (0021,11xx)
        f.private_block(0x0021, 'SIEMENS MR SDS 01', create=True); f.private_block(0x0021, XA_SDI, create=True).add_new(0xFE, 'SQ', [Dataset()])
        inner = f[0x0021, 0x11FE].value[0]; inner.private_block(0x0021, 'SIEMENS MR SDS 01', create=True)
        blk = inner.private_block(0x0021, XA_SDI, create=True)
        blk.add_new(0x1C, 'IS', str(pe_positive)); blk.add_new(0x53, 'FD', bandwidth_pe)
    ds.save_as(path)
    return path


@needs_dcm2niix
def test_siemens_xa_enhanced_sidecar_as_dcm2niix(tmp_path):
    """Siemens XA enhanced: phase-encoding direction, readout time and echo spacing from the private (0021,111C) and
    (0021,1153), 'COL' as in classic files, the acquisition time of the file (not of frame 0): dcm2niix's values. SliceTiming
    from the frames' FrameAcquisitionDateTime (dcm2niix writes none for this synthetic file: its frame times read 0..0)."""
    import json
    siemens_xa(tmp_path/'src'/'xa.dcm')
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    a, b = (json.loads(p.with_name(p.name[:-7] + '.json').read_text()) for p in (mine, next(iter(theirs.values()))))
    for key in ('PhaseEncodingDirection', 'InPlanePhaseEncodingDirectionDICOM', 'AcquisitionTime', 'ReconMatrixPE',
                'BandwidthPerPixelPhaseEncode'):
        assert a.get(key) == b[key], (key, a.get(key), b[key])
    for key in ('TotalReadoutTime', 'EffectiveEchoSpacing'): assert a.get(key) == pytest.approx(b[key], rel=1e-5), key
    assert a['SliceTiming'] == [0.5, 1.5, 0, 1] and 'SliceTiming' not in b



def uih_dti(folder, duration_ms=21.):
    """A UIH DTI grid series as the scanner writes it: AcquisitionDate, AcquisitionDuration (0018,9073) in ms, and slice
    times in (0065,1051) interleaved downwards, so its last item is the first acquired (dcm2niix reads the last one's time)."""
    import pydicom
    from dicom_prep.synth import synth_uih
    paths = synth_uih(folder, n=5, volumes=3, bvals=[0, 1000, 1000], bvecs=[(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    for t, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.AcquisitionDate, ds.AcquisitionDuration, ds.ScanningSequence = '20240101', duration_ms, 'EP'
        for it, s in zip(ds[0x0065, 0x1051].value, (4, 2, 3, 1, 0), strict=True): it.AcquisitionTime = f'1352{57 + s:02d}.{t:06d}'
        ds.save_as(p)


@needs_dcm2niix
@pytest.mark.parametrize('duration_ms', [21., 188717.])
def test_uih_dti_sidecar_as_dcm2niix(duration_ms, tmp_path):
    """UIH DTI sidecar: AcquisitionTime from the grid's slice items, TotalReadoutTime from AcquisitionDuration as dcm2niix
    writes them; a duration of a second or more is a scan's (a 3D T1's), which dcm2niix reports and we leave out."""
    import json
    uih_dti(tmp_path/'src', duration_ms)
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    a, b = (json.loads(p.with_name(p.name[:-7] + '.json').read_text()) for p in (mine, next(iter(theirs.values()))))
    assert a['AcquisitionTime'] == b['AcquisitionTime'] == '13:52:57.000000'
    assert a['SliceTiming'] == b['SliceTiming'] == [4, 2, 3, 1, 0]
    if duration_ms < 1000: assert a['TotalReadoutTime'] == b['TotalReadoutTime'] == 0.021
    else: assert 'TotalReadoutTime' not in a and b['TotalReadoutTime'] == 188.717

MOSAIC_TIMES = {  # name: slice acquisition times (ms) of a 6-slice Siemens mosaic, in slice order
    'interleaved': [0, 1000, 333, 1333, 667, 1667], 'sequential': [k * 300 for k in range(6)], 'descending': [(5 - k) * 300 for k in range(6)],
    'interleaved_from_second': [900, 0, 1200, 300, 1500, 600], 'interleaved_down': [1500, 600, 1200, 300, 900, 0],
    'multiband': [(k % 3) * 300 for k in range(6)]}


def header_codes(path) -> tuple[int, int]:
    h = nib.load(path).header
    return int(h['dim_info']), int(h['slice_code'])


@needs_dcm2niix
@pytest.mark.parametrize('case', [*MOSAIC_TIMES, 'row_phase', 'ct'])
def test_dim_info_and_slice_code_as_dcm2niix(case, tmp_path):
    """NIfTI's dim_info (frequency, phase, slice dims) and slice_code (slice order) are dcm2niix's: set from the phase-encoding
    axis and a Siemens series' slice times (0 for multiband, where slices share a time); both 0 for a CT."""
    from dicom_prep.synth import synth_mosaic
    if case == 'ct': synth_series(tmp_path/'src', n=4)
    elif case == 'row_phase': synth_mosaic(tmp_path/'src', n=6, InPlanePhaseEncodingDirection='ROW')
    else: synth_mosaic(tmp_path/'src', n=6, times=[float(t) for t in MOSAIC_TIMES[case]])
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours')
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    assert header_codes(mine) == header_codes(next(iter(theirs.values())))
    assert header_codes(mine) != (0, 0) or case in ('ct', 'multiband')


QA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'dcm_qa_nih'


@pytest.mark.skipif(not (QA/'Ref').is_dir(), reason=f'dcm_qa_nih not found at {QA}')
def test_dim_info_and_slice_code_as_dcm_qa_nih_references(tmp_path):
    "Every dcm_qa_nih reference volume (GE and Siemens EPI): our dim_info and slice_code are those of dcm2niix's reference."
    import json
    from dicom_prep.nifti import dicom_to_nifti
    dicom_to_nifti(QA/'In', tmp_path, n_workers=1, quiet=True, sidecar=True)
    found = {}
    for p in (tmp_path/'nifti').rglob('*.nii.gz'):
        j = json.loads(p.with_name(p.name[:-7] + '.json').read_text())
        found[j['SeriesNumber'], j['SeriesDescription']] = p
    refs = sorted((QA/'Ref').glob('*.nii'))
    assert len(refs) == 8
    for ref in refs:
        j = json.loads(ref.with_suffix('.json').read_text())
        assert header_codes(found[j['SeriesNumber'], j['SeriesDescription']]) == header_codes(ref), ref.name


@needs_dcm2niix
def test_field_map_echoes_and_echo_number_as_dcm2niix(tmp_path):
    """A field map whose two echoes both say EchoNumber 1: two volumes, `_e1` and `_e2` by echo time (dcm2niix names them
    `_e1` and `_e1a`), the same voxels as dcm2niix's, EchoNumber in their sidecars; a single echo's sidecar has none."""
    import json
    from pydicom.uid import generate_uid
    uid = generate_uid()
    for k, te in enumerate(('4.92', '7.38')):
        synth_series(tmp_path/'fmap', n=4, series_uid=uid, modality='MR', prefix=f'E{k}', seed=k, EchoNumbers=1, EchoTime=te)
    synth_series(tmp_path/'single', n=4, modality='MR', EchoNumbers=1, EchoTime='4.1', series_number=2)
    r, mine = ours(tmp_path/'fmap', tmp_path/'ours', sidecar=True)
    theirs = dcm2niix_named(tmp_path/'fmap', tmp_path/'d2n')
    assert sorted(p.name[:-7].rsplit('_', 1)[1] for p in mine) == ['e1', 'e2'] and sorted(theirs) == ['1_e1', '1_e1a']
    side = lambda p: json.loads(p.with_name(p.name[:-7] + '.json').read_text())
    for p, name in zip(sorted(mine), ('1_e1', '1_e1a'), strict=True):
        assert np.array_equal(canonical(p)[0], canonical(theirs[name])[0])
        assert (side(p)['EchoNumber'], side(p)['EchoTime']) == (side(theirs[name])['EchoNumber'], side(theirs[name])['EchoTime'])
    r, [one] = ours(tmp_path/'single', tmp_path/'ours1', sidecar=True)
    [d2n_one] = dcm2niix_named(tmp_path/'single', tmp_path/'d2n1').values()
    assert 'EchoNumber' not in side(one) and 'EchoNumber' not in side(d2n_one) and side(one)['EchoTime'] == side(d2n_one)['EchoTime']


@needs_dcm2niix
def test_binary_floats_written_as_their_decimals_as_dcm2niix(tmp_path):
    """An enhanced file's RepetitionTime and FlipAngle are binary floats (FD) holding float32 values: the sidecar has the
    decimals they were written from (0.0038045 s, 8.1), as dcm2niix prints them, not 0.003804500103 and 8.100000381469727."""
    import json
    from pydicom import dcmread
    from dicom_prep.synth import item, synth_enhanced
    path = synth_enhanced(tmp_path/'src'/'enh.dcm', n=3)
    ds = dcmread(path)
    ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence = [
        item(RepetitionTime=float(np.float32(3.8045)), FlipAngle=float(np.float32(8.1)))]
    ds.save_as(path)
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    [theirs] = dcm2niix_named(tmp_path/'src', tmp_path/'d2n').values()
    a, b = (json.loads(p.with_name(p.name[:-7] + '.json').read_text()) for p in (mine, theirs))
    assert (a['RepetitionTime'], a['FlipAngle']) == (b['RepetitionTime'], b['FlipAngle']) == (0.0038045, 8.1)


def nii_bytes(path) -> bytes: return gzip.decompress(Path(path).read_bytes())


RESAMPLE_BOTH = {  # case: (writer of the source stack, dcm2niix's suffix for its resampled copy)
    'tilt': (lambda d: tilted_ct(d, -1024), '_Tilt_1'),
    'gap': (lambda d: synth_series(d, rows=6, cols=4, positions=[(0, 0, 2.5 * k) for k in range(8) if k != 4],
                                   pixels=lambda k: np.arange(24).reshape(6, 4) * 7 + 100 * k), '_Eq_1')}


@needs_dcm2niix
@pytest.mark.parametrize('case', RESAMPLE_BOTH)
def test_resample_both_keeps_the_acquired_volume_as_dcm2niix(case, tmp_path):
    """`--resample both`: the acquired volume under the usual name, byte for byte a plain run's, and the resampled copy
    with dcm2niix's suffix, a `--resample yes` run's voxels and affine. A stack refused as acquired (a missing slice) gets
    only its copy. The index holds both rows; a rerun rewrites nothing."""
    write, suffix = RESAMPLE_BOTH[case]
    write(tmp_path/'src')
    (r, both), (_, plain), (_, [yes]) = (ours(tmp_path/'src', tmp_path/m, resample=m) for m in ('both', 'no', 'yes'))
    theirs = dcm2niix_named(tmp_path/'src', tmp_path/'d2n')
    assert sorted(theirs) == ['1', '1' + suffix]
    [copy] = [p for p in both if p.name.endswith(suffix + '.nii.gz')]
    acquired = [p for p in both if p != copy]
    assert copy.relative_to(tmp_path/'both') == yes.relative_to(tmp_path/'yes').with_name(yes.name[:-7] + suffix + '.nii.gz')
    assert nii_bytes(copy) == nii_bytes(yes)
    a, b = nib.load(copy), nib.load(theirs['1' + suffix])
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)
    if case == 'tilt':          # our tilt voxels sit where the affine says, half a pixel from dcm2niix's (test_nifti_vendors)
        assert [p.relative_to(tmp_path/'both') for p in acquired] == [p.relative_to(tmp_path/'no') for p in plain]
        assert nii_bytes(acquired[0]) == nii_bytes(plain[0])
        assert np.array_equal(canonical(acquired[0])[0], canonical(theirs['1'])[0])
    else:
        assert acquired == plain == [] and np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    rows = sorted(open_db(tmp_path/'both'/'dicom_prep.db').query('select id, verdict, suffix, status, output_path from volumes'),
                  key=lambda v: v['suffix'])
    assert [(v['suffix'], v['verdict'], v['status']) for v in rows] == [
        ('', 'ok' if case == 'tilt' else 'missing slices', 'ok' if case == 'tilt' else 'skipped'), (suffix, 'ok', 'ok')]
    assert rows[1]['output_path'] == str(copy.relative_to(tmp_path/'both'))
    stamps = {p: p.stat().st_mtime_ns for p in both}
    again, files = ours(tmp_path/'src', tmp_path/'both', resample='both')
    assert files == both and {p: p.stat().st_mtime_ns for p in files} == stamps and not again.counts.get('converted')


def test_resample_modes_keep_databases_valid(tmp_path):
    """`--resample` alone is `yes`, recorded as `true` as when it was a switch: an index made with the switch reruns with
    `--resample` or `--resample yes`; `both` is a new setting, refused without --force."""
    from dicom_prep.cli import cli_args
    from dicom_prep.db import SettingsMismatch
    from dicom_prep.nifti import NiftiOptions
    from dicom_prep.options import UsageError
    flag = lambda *argv: NiftiOptions.make(**cli_args(NiftiOptions, '', '', ['--dicom-dir', 'x', *argv])[0]).resample
    assert [flag(), flag('--resample'), flag('--resample', 'yes'), flag('--resample', 'no'), flag('--resample', 'both')] == [
        False, True, True, False, 'both']
    with pytest.raises(UsageError, match='no, yes or both'): flag('--resample', 'maybe')
    tilted_ct(tmp_path/'src', 0)
    ours(tmp_path/'src', tmp_path/'out', resample=True)
    for mode in (True, 'yes'): assert ours(tmp_path/'src', tmp_path/'out', resample=mode)[0].counts.get('converted') is None
    with pytest.raises(SettingsMismatch, match="resample: True in the database, 'both' now"): ours(tmp_path/'src', tmp_path/'out', resample='both')
    assert len(ours(tmp_path/'src', tmp_path/'out', resample='both', force=True)[1]) == 2
