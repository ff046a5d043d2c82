"""Real scanner data against dcm2niix: the dcm_qa_nih reference volumes and sidecars (GE EPI, Siemens mosaic EPI),
nibabel's real Siemens mosaic diffusion files, and synthesised mosaic, Philips, multi-echo and complex-valued series
converted by both tools. Where we differ from dcm2niix on purpose, the test says how.

The dcm_qa_nih data lives in ../shared (next to the repository); those tests skip when it is absent."""
import gzip, json, shutil, subprocess
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from dicom_prep.db import open_db
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.pixels import mosaic_slices
from dicom_prep.synth import oblique_orientation, synth_mosaic, synth_series
from test_nifti import DCM2NIIX, canonical, dcm2niix, needs_dcm2niix, ours, pair_up

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')
SHARED = Path(__file__).resolve().parents[1].parent/'shared'
QA = SHARED/'data'/'dcm_qa_nih'
needs_qa = pytest.mark.skipif(not (QA/'In').is_dir(), reason=f'dcm_qa_nih not found under {SHARED}')
NIB_DATA = Path(nib.__file__).parent/'nicom'/'tests'/'data'

# Sidecar keys downstream pipelines read, which must equal dcm2niix's. Tolerance: numbers to 1e-5 relative (dcm2niix
# prints 6 significant digits: %g), AcquisitionTime as a time of day (dcm2niix v1.0.20241127 wrote 12:30:2.285000 for
# 12:30:02.285000, a formatting bug it has since fixed), ImageOrientationPatientDICOM to 1e-5 (we round to 6 decimals).
REQUIRED = ('SliceTiming', 'PhaseEncodingDirection', 'InPlanePhaseEncodingDirectionDICOM', 'TotalReadoutTime',
            'EffectiveEchoSpacing', 'AcquisitionTime', 'ImageType', 'EchoTime')
NOT_COMPARED = ('ConversionSoftware', 'ConversionSoftwareVersion')


def same_value(key, mine, theirs) -> bool:
    "A sidecar value equals dcm2niix's, within the documented tolerance."
    if key == 'AcquisitionTime':
        t = lambda s: datetime.strptime(s, '%H:%M:%S.%f').time()
        return t(mine) == t(theirs)
    if isinstance(theirs, list) and isinstance(mine, list):
        return len(mine) == len(theirs) and all(same_value(key, a, b) for a, b in zip(mine, theirs, strict=True))
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and isinstance(mine, (int, float)):
        return mine == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    return mine == theirs


@pytest.fixture(scope='module')
def qa_run(tmp_path_factory):
    "dcm_qa_nih/In converted once, with sidecars: {(SeriesNumber, SeriesDescription): our .nii.gz}."
    out = tmp_path_factory.mktemp('qa')
    r = dicom_to_nifti(QA/'In', out, n_workers=2, quiet=True, sidecar=True)
    assert r.status == 'completed' and r.counts.get('error', 0) == 0
    found = {}
    for p in (out/'nifti').rglob('*.nii.gz'):
        j = json.loads(p.with_name(p.name[:-7] + '.json').read_text())
        found[(j['SeriesNumber'], j['SeriesDescription'])] = p
    return r, found


def qa_refs():
    return sorted((QA/'Ref').glob('*.nii')) if (QA/'Ref').is_dir() else []


@needs_qa
def test_dcm_qa_nih_every_reference_volume(qa_run):
    "Every reference volume is reproduced: same shape, equal data and an affine within 1e-3 mm after as_closest_canonical."
    r, found = qa_run
    refs = qa_refs()
    assert len(refs) == 8 and r.verdicts == {'ok': 8}           # 4 GE EPI series (64x64x15x10), 4 Siemens mosaic (72x72x5x2)
    reproduced = 0
    for ref in refs:
        j = json.loads(ref.with_suffix('.json').read_text())
        mine = found[(j['SeriesNumber'], j['SeriesDescription'])]
        (a, aff_a), (b, aff_b) = canonical(mine), canonical(ref)
        assert a.shape == b.shape and np.array_equal(a, b), ref.name
        np.testing.assert_allclose(aff_a, aff_b, atol=1e-3)
        assert np.array_equal(np.asarray(nib.load(mine).dataobj), np.asarray(nib.load(ref).dataobj))   # even the layout on disk
        reproduced += 1
    assert reproduced == len(refs)


@needs_qa
def test_dcm_qa_nih_sidecars(qa_run):
    "The keys pipelines read are there and equal dcm2niix's; every other key both tools write agrees too."
    _, found = qa_run
    checked = 0
    for ref in qa_refs():
        theirs = json.loads(ref.with_suffix('.json').read_text())
        mine = json.loads(found[(theirs['SeriesNumber'], theirs['SeriesDescription'])].with_suffix('').with_suffix('.json').read_text())
        for key in REQUIRED: assert key in mine, (ref.name, key)
        for key in sorted(set(mine) & set(theirs) - set(NOT_COMPARED)):
            assert same_value(key, mine[key], theirs[key]), (ref.name, key, mine[key], theirs[key])
            checked += 1
    assert checked >= 8 * 40, checked


def nibabel_dwi(dest) -> Path:
    "nibabel's two real Siemens mosaic diffusion files (b=0 and b=1000 of one series), unzipped into `dest`."
    dest.mkdir(parents=True, exist_ok=True)
    for name in ('siemens_dwi_0', 'siemens_dwi_1000'):
        (dest/f'{name}.dcm').write_bytes(gzip.decompress((NIB_DATA/f'{name}.dcm.gz').read_bytes()))
    return dest


# nibabel's test_dicomwrappers.EXPECTED_AFFINE for siemens_dwi_1000 as its test writes it, voxel (column, row, slice) -> RAS
# (the test then swaps the first two columns for nibabel's (row, column) order)
NIBABEL_AFFINE = np.array([[-1.796875, 0, 0, 115], [0, -1.79684984, -0.01570896, 135.028779],
                           [0, -0.00940843750, 2.99995887, -78.710481], [0, 0, 0, 1]])


def test_nibabel_mosaic_dwi_geometry(tmp_path):
    "nibabel's real mosaic DWI: 48 slices of 128², two volumes, on the grid nibabel's own tests expect."
    r, mine = ours(nibabel_dwi(tmp_path/'src'), tmp_path/'ours')
    assert r.verdicts == {'ok': 1} and len(mine) == 1
    img = nib.load(mine[0])
    assert img.shape == (128, 128, 48, 2)
    unflip = np.eye(4); unflip[1, 1], unflip[1, 3] = -1, img.shape[1] - 1       # we write rows bottom-up
    np.testing.assert_allclose(img.affine @ unflip, NIBABEL_AFFINE, atol=1e-4)
    ds = pydicom.dcmread(tmp_path/'src/siemens_dwi_1000.dcm')                   # slice k of volume 2 is tile k of the mosaic
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, ::-1, 7, 1].T, mosaic_slices(ds)[7])


@needs_dcm2niix
def test_nibabel_mosaic_dwi_bval_bvec(tmp_path):
    "Its .bval and .bvec equal dcm2niix's (directions to 1e-5: dcm2niix normalises in single precision and prints %g)."
    src = nibabel_dwi(tmp_path/'src')
    r, mine = ours(src, tmp_path/'ours')
    theirs = dcm2niix(src, tmp_path/'d2n')
    [((a, aff_a), (b, aff_b))], _, _ = pair_up(mine, theirs)
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-3)
    read = lambda p, ext: np.loadtxt(p.with_name(p.name[:-7] + ext))
    np.testing.assert_array_equal(read(mine[0], '.bval'), read(theirs[0], '.bval'))
    np.testing.assert_allclose(read(mine[0], '.bvec'), read(theirs[0], '.bvec'), atol=1e-5)


@needs_dcm2niix
def test_real_files_sidecars_as_dcm2niix(tmp_path):
    """nibabel's Siemens DWI pair (2x in-plane acceleration, slice times of the second volume: dcm2niix's issue-870 rule)
    and its Philips enhanced MPRAGE: every sidecar key both tools write agrees, to the documented tolerance."""
    src = nibabel_dwi(tmp_path/'src')
    (src/'philips.dcm').write_bytes(gzip.decompress((NIB_DATA/'philips_mprage.dcm.gz').read_bytes()))
    r, mine = ours(src, tmp_path/'ours', sidecar=True)
    assert r.verdicts == {'ok': 2}
    theirs = dcm2niix(src, tmp_path/'d2n')
    for m in mine:
        mj = sidecar_of(m)
        tj = next(sidecar_of(t) for t in theirs if sidecar_of(t)['SeriesNumber'] == mj['SeriesNumber'])
        shared = set(mj) & set(tj) - set(NOT_COMPARED)
        assert len(shared) >= 25, sorted(shared)
        for key in sorted(shared): assert same_value(key, mj[key], tj[key]), (m.name, key, mj[key], tj[key])
    dwi = sidecar_of(next(m for m in mine if '012' in m.name))
    assert dwi['ParallelReductionFactorInPlane'] == 2 and len(dwi['SliceTiming']) == 48


def test_header_only_mosaic_is_not_converted(tmp_path):
    "nibabel's csa_slice_norm.dcm is a mosaic header without pixel data: no volume (dcm2niix skips it too)."
    (tmp_path/'src').mkdir(); shutil.copy(NIB_DATA/'csa_slice_norm.dcm', tmp_path/'src')
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    assert r.verdicts == {'no pixel data': 1} and mine == []


MOSAICS = {  # name: synth_mosaic arguments
    'axial': dict(n=5), 'oblique': dict(n=7, iop=oblique_orientation(0.3, 0.2), origin=(5, -7, 12)),
    'sagittal': dict(n=6, iop=(0, 1, 0, 0, 0, -1)), 'coronal': dict(n=4, iop=(1, 0, 0, 0, 0, -1))}


def sidecar_of(p):
    return json.loads(p.with_name(p.name[:-7] + '.json').read_text())


@needs_dcm2niix
@pytest.mark.parametrize('case', MOSAICS)
def test_synth_mosaic_same_as_dcm2niix(case, tmp_path):
    """Synthetic mosaic diffusion series: the same file on disk as dcm2niix's (voxels, layout, affine), the same
    SliceTiming and PhaseEncodingDirection, and the same .bval/.bvec."""
    synth_mosaic(tmp_path/'src', volumes=3, bvals=[0, 1000, 1000], bvecs=[(0, 0, 0), (0.6, 0.8, 0), (0, 0.6, -0.8)],
                 bandwidth_pe=None, **MOSAICS[case])
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    [theirs] = dcm2niix(tmp_path/'src', tmp_path/'d2n')
    a, b = nib.load(mine), nib.load(theirs)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    for key in ('SliceTiming', 'PhaseEncodingDirection'): assert same_value(key, sidecar_of(mine)[key], sidecar_of(theirs)[key])
    read = lambda p, ext: np.loadtxt(p.with_name(p.name[:-7] + ext))
    np.testing.assert_allclose(read(mine, '.bvec'), read(theirs, '.bvec'), atol=1e-5)
    np.testing.assert_array_equal(read(mine, '.bval'), read(theirs, '.bval'))


@needs_dcm2niix
def test_descending_mosaic_differs_on_disk_only(tmp_path):
    """Slices acquired in descending order (CSA SliceNormalVector against row × column): dcm2niix keeps the tiles' order
    on disk (a negative-determinant grid; it then flips the bvec y), we write slices ascending along row × column as for
    every other stack. Same voxels in canonical space; our SliceTiming and bvecs describe our order and axes."""
    synth_mosaic(tmp_path/'src', n=5, volumes=3, step=-3., bvals=[0, 1000, 1000], bvecs=[(0, 0, 0), (0.6, 0.8, 0), (0, 0.6, -0.8)],
                 bandwidth_pe=None)
    r, mine = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    theirs = dcm2niix(tmp_path/'src', tmp_path/'d2n')
    [((a, aff_a), (b, aff_b))], _, _ = pair_up(mine, theirs)
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-3)
    assert sidecar_of(mine[0])['SliceTiming'] == sidecar_of(theirs[0])['SliceTiming'][::-1]
    read = lambda p: np.loadtxt(p.with_name(p.name[:-7] + '.bvec'))
    np.testing.assert_allclose(read(mine[0]), read(theirs[0]) * [[1], [-1], [1]], atol=1e-5)


def philips_series(folder, **tags):
    "A classic Philips MR series with rescale (RS, RI) and the private scale slope SS (2005,100E)."
    paths = synth_series(folder, n=5, modality='MR', slope=2.10793650793650, intercept=0.5, Manufacturer='Philips Medical Systems', **tags)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.private_block(0x2005, 'Philips MR Imaging DD 001', create=True).add_new(0x0E, 'FL', 0.0002682503836695105)
        ds.save_as(p)
    return paths


@needs_dcm2niix
def test_philips_precise_scaling(tmp_path):
    """Philips: by default the precise floating-point values, (stored × RS + RI) / (RS × SS), with exactly dcm2niix's
    header scaling (its default, -p y); --philips-scaling display keeps RescaleSlope/Intercept (dcm2niix -p n)."""
    philips_series(tmp_path/'src')
    d = nib.load(dcm2niix(tmp_path/'src', tmp_path/'d2n')[0])
    dicom_to_nifti(tmp_path/'src', tmp_path/'precise', n_workers=0, quiet=True)
    dicom_to_nifti(tmp_path/'src', tmp_path/'display', n_workers=0, quiet=True, philips_scaling='display')
    precise, display = (nib.load(next((tmp_path/s).rglob('*.nii.gz'))) for s in ('precise', 'display'))
    assert (precise.dataobj.slope, precise.dataobj.inter) == (d.dataobj.slope, d.dataobj.inter)
    np.testing.assert_array_equal(precise.get_fdata(), d.get_fdata())
    stored = display.dataobj.get_unscaled().astype(float)
    np.testing.assert_allclose(display.get_fdata(), stored * 2.10793650793650 + 0.5, rtol=1e-6)
    with pytest.raises(Exception, match='philips_scaling'):          # a changed scaling is a settings change
        dicom_to_nifti(tmp_path/'src', tmp_path/'precise', n_workers=0, quiet=True, philips_scaling='display')


def complex_series(folder, kinds, manufacturer='SIEMENS'):
    "One series holding each complex component in `kinds` (Siemens ImageType letters: M, P, R, I)."
    uid = generate_uid()
    for k, letter in enumerate(kinds):
        synth_series(folder, n=4, series_uid=uid, modality='MR', prefix=f'K{k}', first_instance=10 * k + 1, seed=k,
                     ImageType=['ORIGINAL', 'PRIMARY', letter, 'ND'], Manufacturer=manufacturer, description='fl')


def two_echoes(folder):
    "Two echoes of one MR series."
    uid = generate_uid()
    for e in (1, 2): synth_series(folder, n=4, series_uid=uid, modality='MR', prefix=f'E{e}', first_instance=e, seed=e, EchoNumbers=e,
                                  EchoTime=str(10 * e))


def philips_two_kinds(folder, image_types, codes):
    "Two echoes of a Philips series, each with its ImageType and (2005,1011) code (a B0 field-map acquisition)."
    uid = generate_uid()
    for k, (it, code) in enumerate(zip(image_types, codes, strict=True)):
        for p in synth_series(folder, n=3, series_uid=uid, modality='MR', prefix=f'K{k}', first_instance=10 * k + 1, seed=k, ImageType=it,
                              Manufacturer='Philips Medical Systems', EchoNumbers=k + 1, EchoTime=str(3 + k)):
            ds = pydicom.dcmread(p)
            ds.private_block(0x2005, 'Philips MR Imaging DD 001', create=True).add_new(0x11, 'CS', code)
            ds.save_as(p)


SUFFIX_CASES = {  # name: (builder, our suffixes)
    'echoes': (two_echoes, ['_e1', '_e2']),
    # a magnitude first echo and a real second echo: one echo per component, so only echo numbers above 1 are named
    'magnitude_e1_real_e2': (lambda d: philips_two_kinds(d, [['ORIGINAL', 'PRIMARY', 'M', 'FFE'], ['ORIGINAL', 'PRIMARY', 'R', 'B0']],
                                                         ['M', 'R']), ['', '_e2_real']),
    # a Philips B0 map whose (2005,1011) says R but whose ImageType does not: dcm2niix goes by ImageType, and so do we
    'philips_b0': (lambda d: philips_two_kinds(d, [['ORIGINAL', 'PRIMARY', 'M_FFE', 'M', 'FFE'], ['ORIGINAL', 'PRIMARY', 'B0', 'B0']],
                                               ['M', 'R']), ['_e1', '_e2']),
    # a Philips B0 field map in Hz: a real image whose ImageType says B0 MAP is named _fieldmaphz, not _real
    'philips_b0_map_hz': (lambda d: philips_two_kinds(d, [['ORIGINAL', 'PRIMARY', 'M_FFE', 'M', 'FFE'],
                                                          ['ORIGINAL', 'PRIMARY', 'R_FFE', 'R', 'B0 MAP']], ['M', 'R']), ['', '_e2_fieldmaphz']),
    # any vendor, the component from (0008,9208): dcm2niix only looks for B0 and MAP in ImageType
    'b0_map_alone': (lambda d: synth_series(d, n=4, modality='MR', ImageType=['DERIVED', 'PRIMARY', 'B0 MAP', 'ND'],
                                            ComplexImageComponent='REAL', Manufacturer='SIEMENS'), ['_fieldmaphz']),
    'magnitude_phase': (lambda d: complex_series(d, 'MP'), ['', '_ph']),
    'real_imaginary': (lambda d: complex_series(d, 'RI'), ['_imaginary', '_real']),
}


@needs_dcm2niix
@pytest.mark.parametrize('case', SUFFIX_CASES)
def test_suffixes_as_dcm2niix(case, tmp_path):
    "Echoes and complex components are separate volumes named with dcm2niix's suffixes, holding the same voxels."
    build, suffixes = SUFFIX_CASES[case]
    build(tmp_path/'src')
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    (tmp_path/'d2n').mkdir()                 # dcm2niix's own naming (%s: series number), which adds its suffixes
    subprocess.run([DCM2NIIX, '-z', 'y', '-f', '%s', '-o', str(tmp_path/'d2n'), str(tmp_path/'src')], check=True, capture_output=True)
    theirs = sorted((tmp_path/'d2n').glob('*.nii.gz'))
    ends = lambda ps: sorted(next((s for s in sorted(suffixes, key=len, reverse=True) if s and p.name[:-7].endswith(s)), '') for p in ps)
    assert ends(mine) == ends(theirs) == sorted(suffixes)
    pairs, lone_mine, lone_theirs = pair_up(mine, theirs)
    assert len(pairs) == len(suffixes) and not lone_mine and not lone_theirs
    for p in mine:                       # each of our volumes has dcm2niix's suffix for the same voxels
        q = next(q for q in theirs if np.array_equal(canonical(p)[0], canonical(q)[0]))
        assert ends([p]) == ends([q])


# --- irregular geometry: --resample ------------------------------------------------------------------------------

def ramp(k): return np.arange(24).reshape(6, 4) * 7 + 100 * k

IRREGULAR = {  # name: slice heights of an axial stack (mm)
    'missing_slice': [2.5 * k for k in range(8) if k != 4],
    'variable_spacing': [0, 2, 4, 7, 10, 12],
}


def d2n_extra(src, dest, tag) -> nib.Nifti1Image:
    "dcm2niix's resampled copy of `src` (its `_Eq_`, `_Tilt_` or `_Tilt_Eq_` file)."
    dest.mkdir()
    subprocess.run([DCM2NIIX, '-z', 'y', '-o', str(dest), str(src)], check=True, capture_output=True)
    return nib.load(next(p for p in dest.glob('*.nii.gz') if f'_{tag}_' in p.name))


@needs_dcm2niix
@pytest.mark.parametrize('case', IRREGULAR)
def test_resample_equidistant_as_dcm2niix(case, tmp_path):
    """An irregular stack is refused, with a reason that names --resample; with it, the volume is dcm2niix's
    equidistant `_Eq_` copy exactly: the smallest step, each slice interpolated linearly, integers rounded."""
    synth_series(tmp_path/'src', rows=6, cols=4, positions=[(0, 0, z) for z in IRREGULAR[case]], pixels=ramp)
    r, mine = ours(tmp_path/'src', tmp_path/'plain')
    assert mine == [] and r.verdicts == {'missing_slice': {'missing slices': 1}, 'variable_spacing': {'inconsistent spacing': 1}}[case]
    [reason] = [v['reason'] for v in open_db(tmp_path/'plain/dicom_prep.db')['volumes'].rows]
    assert '--resample writes it on an equidistant grid' in reason
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', resample=True)
    assert r.verdicts == {'ok': 1}
    theirs = d2n_extra(tmp_path/'src', tmp_path/'d2n', 'Eq')
    a = nib.load(mine)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(theirs.dataobj)) and a.get_data_dtype() == theirs.get_data_dtype()
    np.testing.assert_allclose(a.affine, theirs.affine, atol=1e-4)


def tilted(folder, zs):
    "A CT stack with gantry tilt: 0.2 mm of y per mm of z (11.3°), at heights `zs`."
    return synth_series(folder, rows=6, cols=4, positions=[np.array([-5., 4 + 0.2 * z, 20 + z]) for z in zs], GantryDetectorTilt='11.3',
                        pixels=lambda k: np.arange(24).reshape(6, 4) * 10 + 1000 * k)


@needs_dcm2niix
@pytest.mark.parametrize('zs,tag', [([2.5 * k for k in range(5)], 'Tilt'), ([0, 2.5, 5, 10, 12.5, 15], 'Tilt_Eq')])
def test_resample_tilt_grid_as_dcm2niix(zs, tag, tmp_path):
    """A tilted stack (and one also missing a slice) resampled: dcm2niix's `_Tilt_` (`_Tilt_Eq_`) grid exactly — shape,
    the rows added for the shift, the unsheared affine. The voxels differ on purpose: dcm2niix's are half a pixel off
    along the tilt (its first slice holds averages of neighbouring rows where the source slice lies unshifted), ours
    are the source values at the positions the affine gives (the first slice is copied exactly)."""
    paths = tilted(tmp_path/'src', zs)
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', resample=True)
    theirs = d2n_extra(tmp_path/'src', tmp_path/'d2n', tag)
    a = nib.load(mine)
    assert a.shape == theirs.shape
    np.testing.assert_allclose(a.affine, theirs.affine, atol=1e-4)
    np.testing.assert_allclose(a.affine[:3, 2], [0, 0, 2.5], atol=1e-6)                   # no shear
    first = pydicom.dcmread(paths[0]).pixel_array.T[:, ::-1]                                # rows bottom-up
    rows = first.shape[1]
    np.testing.assert_array_equal(np.asarray(a.dataobj)[:, -rows:, 0], first)              # the first slice is where it was
    assert not np.array_equal(np.asarray(theirs.dataobj)[:, -rows:, 0], first)


# --- UIH grid files ------------------------------------------------------------------------------------------------

@needs_dcm2niix
@pytest.mark.parametrize('iop', [(1, 0, 0, 0, 1, 0), oblique_orientation(0.3, 0.2)], ids=['axial', 'oblique'])
def test_uih_grid_as_dcm2niix(iop, tmp_path):
    """UIH "VFRAME" grid files (no ImagePositionPatient; slice count, positions and diffusion in private tags): the same
    4D volume on disk as dcm2niix's, and the same .bval/.bvec (UIH's gradients are in image axes)."""
    from dicom_prep.synth import synth_uih
    synth_uih(tmp_path/'src', n=5, volumes=3, iop=iop, origin=(-10, -20, 5), bvals=[0, 1000, 1000],
              bvecs=[(0, 0, 0), (0.6, 0.8, 0), (0, 0.6, -0.8)])
    r, [mine] = ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    assert r.verdicts == {'ok': 1}
    [theirs] = dcm2niix(tmp_path/'src', tmp_path/'d2n')
    a, b = nib.load(mine), nib.load(theirs)
    assert a.shape == b.shape == (6, 6, 5, 3) and np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    read = lambda p, ext: np.loadtxt(p.with_name(p.name[:-7] + ext))
    np.testing.assert_array_equal(read(mine, '.bval'), read(theirs, '.bval'))
    np.testing.assert_allclose(read(mine, '.bvec'), read(theirs, '.bvec'), atol=1e-5)


@pytest.mark.parametrize('source', ['nibabel', 'dcm_qa_nih'])
def test_preprocess_untiles_real_mosaics(source, tmp_path):
    "dicom_prep_preprocess writes one PNG per slice of a real Siemens mosaic, each equal in size to a tile, and none for empty tiles."
    if source == 'dcm_qa_nih':
        if not (QA/'In').is_dir(): pytest.skip(f'dcm_qa_nih not found under {SHARED}')
        src = tmp_path/'src'; shutil.copytree(QA/'In'/'20180918Si'/'mr_0003', src/'mr_0003')
    else: src = nibabel_dwi(tmp_path/'src'/'dwi')
    r = subprocess.run(['dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '2'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    db = open_db(tmp_path/'out'/'dicom_prep.db')
    files = sorted(src.rglob('*.dcm'))
    assert files and db.execute("select count(*) from files where status = 'ok'").fetchone()[0] == len(files)
    for f in files:
        ds = pydicom.dcmread(f)
        n = int(ds[0x0019, 0x100A].value)          # Siemens' NumberOfImagesInMosaic, read apart from the CSA header we use
        rows = list(db.query('select filename, rows, columns, mosaic, thumbnail_path from images where source_path = ? order by filename', [str(f.relative_to(src))]))
        m = int(np.ceil(np.sqrt(n)))
        assert len(rows) == n > 1 and {r['mosaic'] for r in rows} == {n}, (f.name, len(rows), n)
        assert {(r['rows'], r['columns']) for r in rows} == {(ds.Rows // m, ds.Columns // m)}
        assert [r['filename'].rsplit('_frame', 1)[1] for r in rows] == [f'{i:04d}' for i in range(n)]
        pngs = [Image.open(tmp_path/'out'/r['thumbnail_path']) for r in rows]
        assert all(p.size == (ds.Columns // m, ds.Rows // m) or max(p.size) == 256 for p in pngs)
