"""End-to-end checks of `dicom_prep.nifti`: volume for volume against dcm2niix (the reference converter) on
synthesised series and pydicom-data's enhanced multi-frame files, resume after SIGINT, collision-free naming,
and names that cannot leave the output folder."""
import json, os, shutil, signal, sqlite3, subprocess, time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_prep.db import open_db
from dicom_prep.sources import sample_file
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.synth import oblique_orientation, synth_enhanced, synth_series

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')
DCM2NIIX = shutil.which('dcm2niix')
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason='dcm2niix not installed (pip install dcm2niix)')


def data_store_file(name) -> Path:
    "A file of pydicom-data (installed locally, never downloaded); skip when the package is missing."
    try: return sample_file(name)
    except FileNotFoundError: pytest.skip(f'{name} needs pydicom-data')


def dcm2niix(src, dest) -> list[Path]:
    "Run dcm2niix on `src` into `dest` the way users do (gzipped, series_echo names); the .nii.gz it wrote."
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([DCM2NIIX, '-z', 'y', '-f', '%s_%e', '-o', str(dest), str(src)], check=True, capture_output=True)
    return sorted(dest.glob('*.nii.gz'))


def ours(src, dest, **kw):
    "Run dicom_to_nifti serially; the result and the .nii.gz files it wrote."
    r = dicom_to_nifti(src, dest, n_workers=0, quiet=True, **kw)
    return r, sorted((dest/'nifti').rglob('*.nii.gz'))


def canonical(path):
    "The image at `path` in the closest canonical (RAS+) orientation: (real-valued data, affine)."
    img = nib.as_closest_canonical(nib.load(path))
    return img.get_fdata(), img.affine


def pair_up(mine, theirs):
    "Match volumes with the same canonical data; returns (pairs, unmatched of mine, unmatched of theirs)."
    theirs, pairs, lone = {p: canonical(p) for p in theirs}, [], []
    for p in mine:
        a = canonical(p)
        hit = next((q for q, b in theirs.items() if a[0].shape == b[0].shape and np.array_equal(a[0], b[0])), None)
        if hit is None: lone.append(p)
        else: pairs.append((a, theirs.pop(hit)))
    return pairs, lone, list(theirs)


# --- the series: each builder writes one study folder -------------------------------------------------------

def axial(d): synth_series(d, n=8, rows=12, cols=10)
def oblique(d): synth_series(d, n=8, rows=12, cols=10, iop=oblique_orientation(0.3, 0.2), origin=(-20, 30, 12))
def sagittal(d): synth_series(d, n=6, rows=12, cols=10, iop=(0, 1, 0, 0, 0, -1), step=3.)
def shuffled(d):
    "Files (and instance numbers) in an order unrelated to their positions along an oblique normal."
    iop = oblique_orientation(-0.5, 0.4); n = np.cross(iop[:3], iop[3:])
    synth_series(d, rows=12, cols=10, iop=iop, positions=[np.array([5., -3, 7]) + k * 1.25 * n for k in (4, 0, 6, 2, 5, 1, 3)])
def slope(d): synth_series(d, n=8, slope=0.5, intercept=-1024.25)
def slope_per_slice(d):
    "Each slice with its own rescale slope (dcm2niix and we then apply it per slice)."
    uid = generate_uid()
    for k in range(5): synth_series(d, positions=[(0, 0, 2. * k)], slope=1 + k / 4, series_uid=uid, first_instance=k + 1, seed=k)
def missing_slice(d): synth_series(d, positions=[(0, 0, 2.5 * k) for k in range(8) if k != 4])
def localizer(d):
    "An axial stack with a sagittal localizer slice in the same series."
    uid = generate_uid()
    synth_series(d, n=8, series_uid=uid)
    synth_series(d, n=1, iop=(0, 1, 0, 0, 0, -1), series_uid=uid, prefix='LOC', seed=9)
def two_echoes(d):
    "Two echoes of one MR series, slices interleaved by instance number."
    uid = generate_uid()
    for e, te in ((1, 10), (2, 25)):
        synth_series(d, n=6, series_uid=uid, modality='MR', prefix=f'E{e}', first_instance=e, seed=e, EchoNumbers=e, EchoTime=str(te))
def time_series(d):
    "Three time points of the same five slices (an fMRI-like 4D series)."
    uid = generate_uid()
    for t in range(3):
        synth_series(d, n=5, series_uid=uid, modality='MR', prefix=f'T{t}', first_instance=10 * t + 1, seed=t,
                     TemporalPositionIdentifier=t + 1, AcquisitionNumber=t + 1, RepetitionTime='2000')
def enhanced(d): synth_enhanced(d/'enh.dcm', n=5, iop=oblique_orientation(0.2, -0.3), origin=(3, -4, 5), slope=2, intercept=-7)
def enhanced_two_echoes(d): synth_enhanced(d/'enh.dcm', n=5, echo_times=(10., 20.), iop=oblique_orientation(0.2, -0.3))

# name: (builder, our refusals {verdict: n}, number of dcm2niix volumes we do not write, why)
CASES = {
    'axial': (axial, {}, 0, ''),
    'oblique': (oblique, {}, 0, ''),
    'sagittal': (sagittal, {}, 0, ''),
    'shuffled': (shuffled, {}, 0, ''),
    'slope': (slope, {}, 0, ''),
    'slope_per_slice': (slope_per_slice, {}, 0, ''),
    'two_echoes': (two_echoes, {}, 0, ''),
    'time_series': (time_series, {}, 0, ''),
    'enhanced': (enhanced, {}, 0, ''),
    'enhanced_two_echoes': (enhanced_two_echoes, {}, 0, ''),
    'missing_slice': (missing_slice, {'missing slices': 1}, 2,
        "dcm2niix writes the gapped stack as if it were regular (every slice after the gap lands 2.5 mm off) plus an "
        "interpolated `_Eq_1` copy; we refuse the volume ('missing slices') rather than invent or misplace slices"),
    'localizer': (localizer, {'single slice': 1}, 1,
        "dcm2niix writes the lone localizer slice as a 2D image; one slice is not a volume, so we refuse it"),
}


@needs_dcm2niix
@pytest.mark.parametrize('case', CASES)
def test_same_volumes_as_dcm2niix(case, tmp_path):
    build, refused, extra, why = CASES[case]
    build(tmp_path/'src'/'study')
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    assert {k: v for k, v in r.verdicts.items() if k != 'ok'} == refused
    assert r.counts.get('error', 0) == 0
    pairs, lone_mine, lone_theirs = pair_up(mine, dcm2niix(tmp_path/'src', tmp_path/'d2n'))
    assert not lone_mine, f"dcm2niix wrote nothing like {lone_mine}"
    assert len(lone_theirs) == extra, f"{lone_theirs}: {why}"
    assert len(pairs) == r.verdicts.get('ok', 0)
    for (_, aff_a), (_, aff_b) in pairs: np.testing.assert_allclose(aff_a, aff_b, atol=1e-3)


@needs_dcm2niix
def test_enhanced_echoes_without_dimension_index(tmp_path):
    """Interleaved echoes in an enhanced file that lacks a Dimension Index Sequence: dcm2niix then stacks the frames in
    file order (its first volume mixes both echoes and repeats positions); we place every frame by its own position
    and echo time, so each of our volumes is exactly one echo, slice by slice (checked against pydicom)."""
    src = synth_enhanced(tmp_path/'src/enh.dcm', n=5, echo_times=(10., 20.), dimension_index=False)
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    assert r.verdicts == {'ok': 2}
    frames = pydicom.dcmread(src).pixel_array                  # frame 2k+e is slice k of echo e
    assert [p.name for p in mine] == ['007_enh_e1.nii.gz', '007_enh_e2.nii.gz']     # dcm2niix's echo suffixes
    for e, p in enumerate(mine):                                # rows are written bottom-up, as dcm2niix writes them
        np.testing.assert_array_equal(np.asarray(nib.load(p).dataobj).transpose(2, 1, 0)[:, ::-1], frames[e::2])
    theirs = dcm2niix(tmp_path/'src', tmp_path/'d2n')
    first = np.asarray(nib.load(theirs[0]).dataobj)[..., 0]
    assert nib.load(theirs[0]).shape == (6, 8, 5, 2)
    assert not any(np.array_equal(first, np.asarray(nib.load(p).dataobj)) for p in mine)


@needs_dcm2niix
def test_missing_slice_dcm2niix_misplaces(tmp_path):
    "Why we refuse a gapped stack: dcm2niix's uncorrected output puts the slices after the gap in the wrong place."
    missing_slice(tmp_path/'src')
    plain = [p for p in dcm2niix(tmp_path/'src', tmp_path/'d2n') if '_Eq_' not in p.name]
    img = nib.load(plain[0])
    z = [(img.affine @ [0, 0, k, 1])[2] for k in range(img.shape[2])]
    assert np.allclose(np.diff(z), 2.5)            # regular 2.5 mm steps ...
    assert z[-1] - z[0] == pytest.approx(15.)      # ... but the real stack spans 17.5 mm


@needs_dcm2niix
def test_gantry_tilt_keeps_shear(tmp_path):
    "dcm2niix writes a tilted CT stack with an unsheared affine (and a resampled `_Tilt_1` copy); we keep the shear."
    tilt = np.array([0, 0.5, 2.5])
    paths = synth_series(tmp_path/'src', positions=[np.array([-5., 4, 20]) + k * tilt for k in range(8)], GantryDetectorTilt='11.3')
    r, mine = ours(tmp_path/'src', tmp_path/'ours')
    img = nib.load(mine[0])
    for k, p in enumerate(paths):   # every slice lands where the scanner put it (its first row is written last)
        ipp = np.array([float(v) for v in pydicom.dcmread(p).ImagePositionPatient]) * [-1, -1, 1]
        np.testing.assert_allclose((img.affine @ [0, img.shape[1] - 1, k, 1])[:3], ipp, atol=1e-4)
    plain = [p for p in dcm2niix(tmp_path/'src', tmp_path/'d2n') if '_Tilt_' not in p.name]
    (a, aff_a), (b, aff_b) = canonical(mine[0]), canonical(plain[0])
    np.testing.assert_array_equal(a, b)                                       # same voxels
    np.testing.assert_allclose(aff_a[:, [0, 1, 3]], aff_b[:, [0, 1, 3]], atol=1e-3)  # same in-plane axes and origin
    assert abs(aff_a[1, 2] - aff_b[1, 2]) == pytest.approx(0.5, abs=1e-3)     # only the shear differs


@needs_dcm2niix
def test_enhanced_ct_pydicom_data(tmp_path):
    """pydicom-data's Enhanced CT: 2 frames with per-frame positions and the rescale (intercept -1024) in the shared
    Pixel Value Transformation Sequence. Same voxels, scaling and affine as dcm2niix."""
    src = tmp_path/'src'; src.mkdir(); shutil.copy(data_store_file('eCT_Supplemental.dcm'), src)
    r, mine = ours(src, tmp_path/'ours')
    assert r.verdicts == {'ok': 1} and len(mine) == 1
    [((a, aff_a), (b, aff_b))], _, _ = pair_up(mine, dcm2niix(src, tmp_path/'d2n'))
    assert a.shape == (512, 512, 2) and a.min() < -1000
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-3)


@needs_dcm2niix
@pytest.mark.parametrize('name', ['emri_small.dcm', 'emri_small_RLE.dcm', 'emri_small_jpeg_2k_lossless.dcm',
                                  'emri_small_jpeg_ls_lossless.dcm', 'emri_small_big_endian.dcm'])
def test_enhanced_mr_without_geometry(name, tmp_path):
    """pydicom-data's Enhanced MR files carry no Plane Position/Orientation functional groups at all. dcm2niix still
    writes a volume ("Bogus spatial matrix") with a made-up affine; we refuse it as 'missing orientation'."""
    src = tmp_path/'src'; src.mkdir(); shutil.copy(data_store_file(name), src)
    r, mine = ours(src, tmp_path/'ours')
    assert r.verdicts == {'missing orientation': 1} and mine == []
    theirs = dcm2niix(src, tmp_path/'d2n')
    assert len(theirs) == 1 and nib.load(theirs[0]).shape == (64, 64, 10)


@needs_dcm2niix
def test_sidecar_agrees_with_dcm2niix(tmp_path):
    "Keys both tools write have the same values (dcm2niix normalises Manufacturer names, so that one is skipped)."
    synth_series(tmp_path/'src', n=3, modality='MR', RepetitionTime='2000', EchoTime='30', InversionTime='900', FlipAngle='90',
                 MagneticFieldStrength='3', ManufacturerModelName='Prisma', InstitutionName='Hosp', StationName='ST1',
                 SoftwareVersions='syngo', BodyPartExamined='HEAD', ProtocolName='t2_tse', ScanningSequence='SE',
                 SequenceVariant='SK', SequenceName='tse', PixelBandwidth='200', ImagingFrequency='123.2', EchoNumbers=1,
                 SpacingBetweenSlices='2.5', ConvolutionKernel='B30f', EchoTrainLength='10', ReceiveCoilName='HeadNeck')
    ours(tmp_path/'src', tmp_path/'ours', sidecar=True)
    mine = json.loads(next((tmp_path/'ours/nifti').rglob('*.json')).read_text())
    dcm2niix(tmp_path/'src', tmp_path/'d2n')
    theirs = json.loads(next((tmp_path/'d2n').glob('*.json')).read_text())
    shared = set(mine) & set(theirs) - {'Manufacturer', 'ConversionSoftware', 'ConversionSoftwareVersion'}
    assert len(shared) >= 20, sorted(shared)
    for k in sorted(shared):
        assert mine[k] == pytest.approx(theirs[k]) if isinstance(theirs[k], (int, float)) else mine[k] == theirs[k], k


# --- tracking, resume, names ----------------------------------------------------------------------------------

def _volume_states(db_path):
    "id -> (status, run_id, converted_at) of every ok volume."
    with sqlite3.connect(db_path) as c:
        return {r[0]: r[1:] for r in c.execute("select id, status, run_id, converted_at from volumes where verdict='ok'")}


def _slow_nifti_run(src, out, n_series, n, size) -> subprocess.Popen:
    "Write `n_series` series of `n` slices `size`² and start the NIfTI CLI on them, one volume per commit."
    for s in range(n_series): synth_series(src/f'p{s:02d}', n=n, rows=size, cols=size, series_number=s, seed=s)
    cmd = [shutil.which('dicom_prep_nifti'), '--dicom-dir', str(src), '--output-dir', str(out), '--workers', '1', '--batch-size', '1']
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigint_then_resume(tmp_path):
    "Ctrl+C on the CLI commits finished volumes and prints the resume command; the rerun converts only the rest."
    src, out = tmp_path/'src', tmp_path/'out'
    proc = _slow_nifti_run(src, out, 40, 40, 128)
    db_path, t0 = out/'dicom_prep.db', time.time()
    while time.time() - t0 < 60:
        try:
            with sqlite3.connect(db_path) as c:
                if c.execute("select count(*) from volumes where status='ok'").fetchone()[0] >= 2: break
        except sqlite3.OperationalError: pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text
    assert 'Resume with:' in text and '--dicom-dir' in text.split('Resume with:')[1]
    before = _volume_states(db_path)
    done = {k for k, v in before.items() if v[0] == 'ok'}
    assert 2 <= len(done) < 40
    with sqlite3.connect(db_path) as c: assert c.execute("select status from runs order by id desc").fetchone()[0] == 'interrupted'
    r = dicom_to_nifti(src, out, n_workers=2, quiet=True)
    with sqlite3.connect(db_path) as c: errors = c.execute("select output_name, error from volumes where status='error'").fetchall()
    assert r.status == 'completed' and r.counts == {'converted': 40 - len(done), 'already_done': len(done)}, (r.counts, errors)
    after = _volume_states(db_path)
    assert all(after[k] == before[k] for k in done)                    # nothing that was done was reconverted
    assert all(v[0] == 'ok' for v in after.values())
    touched = src/'p07/IM0003.dcm'; os.utime(touched)                    # a source changes: its volume only is redone
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert r.counts == {'converted': 1, 'already_done': 39}
    redone = {k for k, v in _volume_states(db_path).items() if v != after[k]}
    with sqlite3.connect(db_path) as c:
        assert redone == {r[0] for r in c.execute('select volume_id from volume_files where path=?', ['p07/IM0003.dcm'])}


def test_second_ctrl_c_records_interrupted(tmp_path):
    "A second Ctrl+C quits at once (exit 130) and the run is recorded `interrupted`, as preprocess records it, never `failed`."
    src, out = tmp_path/'src', tmp_path/'out'
    proc = _slow_nifti_run(src, out, 12, 60, 256)
    db_path, t0 = out/'dicom_prep.db', time.time()
    while time.time() - t0 < 60 and not any((out/'nifti').rglob('*.nii.gz')): time.sleep(0.01)
    proc.send_signal(signal.SIGINT); time.sleep(0.05); proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Quit at once' in text and 'Traceback' not in text, text
    with sqlite3.connect(db_path) as c: assert c.execute("select status from runs order by id desc").fetchone()[0] == 'interrupted'
    assert dicom_to_nifti(src, out, n_workers=2, quiet=True).status == 'completed'


def test_changed_name_template_is_refused_then_rebuilt_on_force(tmp_path):
    "A changed --name-template is refused on the CLI with both ways out; --force-reprocess renames every volume, leaving no old file."
    src, out = tmp_path/'src', tmp_path/'out'
    for s in range(3): synth_series(src/f'p{s}', n=4, series_number=s + 1, description='T1', seed=s)
    cli = [shutil.which('dicom_prep_nifti'), '--dicom-dir', str(src), '--output-dir', str(out), '--sidecar']
    assert subprocess.run(cli, capture_output=True).returncode == 0
    before = sorted(p.name for p in (out/'nifti').rglob('*') if p.is_file())
    r = subprocess.run(cli + ['--name-template', '{series_uid}'], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'name_template' in r.stderr and 'Use --force to' in r.stderr
    assert sorted(p.name for p in (out/'nifti').rglob('*') if p.is_file()) == before          # refused: nothing touched
    r = subprocess.run(cli + ['--name-template', 'renamed/{series_number:02d}', '--force-reprocess'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(out/'nifti')) for p in (out/'nifti').rglob('*') if p.is_file()) == \
        [f'renamed/{k:02d}.{ext}' for k in (1, 2, 3) for ext in ('json', 'nii.gz')]


def test_twenty_patients_twenty_files(tmp_path):
    """20 patients whose volumes share series number and description, all in one folder: dicom2nifti-style fixed names
    would overwrite each other; here each gets its own file, and the names survive reruns."""
    for p in range(20): synth_series(tmp_path/'src', n=3, series_number=1, description='T1 MPRAGE', prefix=f'P{p:02d}_', seed=p, PatientID=f'P{p}')
    r, files = ours(tmp_path/'src', tmp_path/'out')
    assert r.counts == {'converted': 20} and len(files) == 20
    assert len({canonical(f)[0].tobytes() for f in files}) == 20          # 20 different volumes, none overwritten
    names = {f.name for f in files}
    assert min(names) == '001_T1_MPRAGE.nii.gz' and any(n.endswith('_20.nii.gz') for n in names)   # readable: no hash, numbered
    db = open_db(tmp_path/'out/dicom_prep.db')
    before = {v['id']: v['output_name'] for v in db['volumes'].rows}
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True, reanalyze=True, force=True)
    assert {v['id']: v['output_name'] for v in db['volumes'].rows} == before


@pytest.mark.parametrize('template', ['../../{series_description}', '/tmp/{series_description}/x', '{series_description}/../../..'])
def test_names_stay_inside_output_dir(template, tmp_path):
    synth_series(tmp_path/'src', n=3, description='../../escape')
    r, files = ours(tmp_path/'src', tmp_path/'out', name_template=template)
    assert r.counts == {'converted': 1}
    assert [p for p in tmp_path.rglob('*.nii.gz') if not p.resolve().is_relative_to((tmp_path/'out/nifti').resolve())] == []


def test_parallel_and_dask_give_the_same_volumes(tmp_path):
    "Two local workers and a local Dask cluster write the same files as a serial run."
    oblique(tmp_path/'src/a'); two_echoes(tmp_path/'src/b'); time_series(tmp_path/'src/c')
    runs = {'serial': dict(n_workers=0), 'pool': dict(n_workers=2), 'dask': dict(n_workers=2, scheduler='local')}
    got = {}
    for name, kw in runs.items():
        r = dicom_to_nifti(tmp_path/'src', tmp_path/name, quiet=True, **kw)
        assert r.counts == {'converted': 4}, name
        got[name] = {p.relative_to(tmp_path/name): canonical(p)[0].tobytes() for p in (tmp_path/name/'nifti').rglob('*.nii.gz')}
    assert got['serial'] == got['pool'] == got['dask']


# ----------------------------------------------------------------------------------------------------------------------
# Incremental analysis: a change re-analyses only its series

def _analysis(r) -> int:
    "How many series a run analysed (its Analysis phase's count)."
    return next(t.n for t in r.timers if t.name == 'Analysis')

def _analysed_at(out) -> dict:
    with sqlite3.connect(out/'dicom_prep.db') as c:
        return dict(c.execute("select series_description, analyzed_at || '|' || verdict from volumes"))

def test_a_change_reanalyses_only_its_series(tmp_path):
    "Touching, removing or adding files re-analyses their series alone; a series whose files are all gone is `gone`; others keep their rows."
    src, out = tmp_path/'src', tmp_path/'out'
    for k in range(4): synth_series(src/f's{k}', n=5, series_number=k + 1, description=f'series{k}', seed=k)
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert _analysis(r) == 4 and r.counts == {'converted': 4}
    time.sleep(1.1)                                                       # analyzed_at has one-second resolution
    before = _analysed_at(out)
    os.utime(next((src/'s1').glob('*.dcm')))
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    after = _analysed_at(out)
    assert _analysis(r) == 1 and r.counts == {'converted': 1, 'already_done': 3}
    assert {k for k in before if before[k] != after[k]} == {'series1'}
    shutil.rmtree(src/'s2')                                               # a whole series gone
    next((src/'s3').glob('*.dcm')).unlink()                               # a slice gone: that volume changes
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert _analysis(r) == 1                                              # s3; s2 has no record left to analyse
    with sqlite3.connect(out/'dicom_prep.db') as c:
        rows = dict(c.execute('select series_description, verdict || ":" || n_slices from volumes'))
    assert rows == {'series0': 'ok:5', 'series1': 'ok:5', 'series2': 'gone:5', 'series3': 'ok:4'}, rows
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert _analysis(r) == 0 and any('Analysis reused' in n for n in r.notes)

def test_series_touched_by_an_interrupted_run_are_analysed_by_the_next(tmp_path):
    "A run stopped while reading headers leaves the series it touched noted (nifti_touched): the next run analyses them."
    src, out = tmp_path/'src', tmp_path/'out'
    for k in range(3): synth_series(src/f's{k}', n=4, series_number=k + 1, description=f'series{k}', seed=k)
    dicom_to_nifti(src, out, n_workers=0, quiet=True)
    for k in range(3): synth_series(src/f's{k}', n=6, series_number=k + 1, description=f'series{k}', seed=k,
                                    series_uid=pydicom.dcmread(next((src/f's{k}').glob('*.dcm'))).SeriesInstanceUID, prefix='B', origin=(0, 0, 40))
    seen = []
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True, should_stop=lambda: seen.append(1) or len(seen) > 3)
    assert r.status == 'interrupted' and r.verdicts == {}
    with sqlite3.connect(out/'dicom_prep.db') as c: touched = c.execute('select count(*) from nifti_touched').fetchone()[0]
    assert touched >= 1
    r = dicom_to_nifti(src, out, n_workers=0, quiet=True)
    assert r.status == 'completed' and _analysis(r) == 3
    with sqlite3.connect(out/'dicom_prep.db') as c:
        assert c.execute('select count(*) from nifti_touched').fetchone()[0] == 0
        assert sorted(c.execute('select n_slices from volumes')) == [(10,), (10,), (10,)]


def test_nifti_help_says_what_its_shared_flags_do_here():
    "Flags shared with preprocess keep dicom_prep_nifti's own meaning in its --help (sidecars hold no date, --force converts volumes)."
    from dicom_prep.nifti import NiftiOptions
    h = {f.name: f.help for f in NiftiOptions.flags()}
    assert 'sidecars hold no date' in h['shift_dates'] and 'in sidecars' in h['keep'] and 'volume' in h['force']
    assert 'OUTPUT_DIR/nifti' in h['output_dir'] and 'sidecars' in h['pseudonymize']
    assert next(f for f in NiftiOptions.flags() if f.name == 'force').alias == 'force_reprocess'
