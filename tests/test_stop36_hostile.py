"""Stop 36's changes (isal gzip, header speedups, dcm2niix's `_Eq` grid for `--resample`) as a hostile user drives them,
on real and synthesised data. Each test failed on main at 7eb448f; its docstring says what it found."""
import importlib.util, re, shutil, subprocess, sys, sysconfig, tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_prep.synth import synth_series
from test_nifti import needs_dcm2niix, ours
from test_nifti_vendors import d2n_extra
from test_run import tmpfs  # noqa: F401  (the fixture `small_disk` asks for)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def as_int32(paths, pixels):
    "Rewrite the slices at `paths` as signed 32-bit data holding `pixels(k)` (stored values past float32's 2**24 exact integers)."
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.BitsAllocated = ds.BitsStored = 32; ds.HighBit = 31; ds.PixelRepresentation = 1
        ds.PixelData = np.asarray(pixels(k), '<i4').tobytes()
        ds.save_as(p)


def test_resample_keeps_32_bit_integers_exact(tmp_path):
    """A 32-bit integer stack with a missing slice, values about 2e7 (a dose grid's or a parametric map's): with --resample
    every grid plane that lies on a source slice holds that slice's values exactly, and the volume keeps int32.
    (Before: the interpolation ran in float32 for every type, so 20,000,001 was written as 20,000,000.)"""
    big = lambda k: np.arange(24).reshape(6, 4) * 1001 + 20_000_001 + 7 * k
    zs = [2.5 * k for k in range(8) if k != 4]
    as_int32(synth_series(tmp_path/'src', rows=6, cols=4, positions=[(0, 0, z) for z in zs]), big)
    r, [vol] = ours(tmp_path/'src', tmp_path/'out', resample=True)
    a = np.asarray(nib.load(vol).dataobj)
    assert r.verdicts == {'ok': 1} and a.dtype == np.int32 and a.shape == (4, 6, 8)
    for k, z in enumerate(zs):                                       # grid plane z / 2.5 is source slice k
        np.testing.assert_array_equal(a[:, :, round(z / 2.5)], big(k)[::-1].T, err_msg=f'slice {k}')


def test_resample_grid_ends_on_the_last_slice(tmp_path):
    """Slices at 0, 1 and 2.5 mm: the `_Eq` grid spans them all, first slice to last, as dcm2niix's does (4 planes 0.833 mm
    apart), its last plane holding the last slice's voxels.
    (Before: 3 planes at the 1 mm step, 0 to 2 mm: Python's round(2.5) is 2, and the step was never stretched, so the
    last slice was cut off the volume.)"""
    ramp = lambda k: np.arange(24).reshape(6, 4) * 7 + 100 * k
    synth_series(tmp_path/'src', rows=6, cols=4, positions=[(0, 0, z) for z in (0, 1, 2.5)], pixels=ramp)
    r, [vol] = ours(tmp_path/'src', tmp_path/'out', resample=True)
    img = nib.load(vol); a = np.asarray(img.dataobj)
    last = img.affine @ [0, 0, a.shape[2] - 1, 1]
    assert r.verdicts == {'ok': 1} and a.shape[2] == 4 and last[2] == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_array_equal(a[:, :, -1], ramp(2)[::-1].T)


def assert_as_dcm2niix(tmp_path):
    "Our --resample volume of tmp_path/src is dcm2niix's `_Eq_` copy: shape, zooms, affine (1e-3 mm) and voxels."
    r, [vol] = ours(tmp_path/'src', tmp_path/'out', resample=True)
    a, theirs = nib.load(vol), d2n_extra(tmp_path/'src', tmp_path/'d2n', 'Eq')
    assert r.verdicts == {'ok': 1} and a.shape == theirs.shape
    np.testing.assert_allclose(a.header.get_zooms(), theirs.header.get_zooms(), atol=1e-4)
    np.testing.assert_allclose(a.affine, theirs.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(theirs.dataobj))


@needs_dcm2niix
@pytest.mark.parametrize('zs', [(0, 1, 2.5), (0, 1, 2, 3.5), (0, 2, 4, 6, 13), (0, 1, 2.4), (0, 3, 6, 7.3, 10.3)])
def test_resample_equals_dcm2niix_when_the_span_is_no_multiple_of_the_step(zs, tmp_path):
    """Irregular stacks whose span is not a whole number of their smallest step: the same shape, zooms, affine and voxels
    as dcm2niix's `_Eq_` copy (it rounds the count halves up, then stretches the step to end on the last slice).
    (Before: Python's banker's rounding of the count and the smallest step kept as is: 3 planes for dcm2niix's 4, 1 mm
    for its 0.833, voxels 2 apart.)"""
    ramp = lambda k: (np.arange(24).reshape(6, 4) - 12) * 3 + 7 * k
    synth_series(tmp_path/'src', rows=6, cols=4, positions=[(0, 0, z) for z in zs], pixels=ramp)
    assert_as_dcm2niix(tmp_path)


@needs_dcm2niix
def test_bench_times_dcm2niix_itself():
    """bench_nifti_real's dcm2niix is the program, not a script that starts it: pip's `dcm2niix` console script is a
    Python that runs the binary (0.078 s against the binary's 0.034 s on the 5-file folder, the shim found in PATH 0.136 s),
    so every ratio against it flattered dicom_prep. In a worktree's venv (--system-site-packages) the bin folder has no
    dcm2niix at all and the bench fell back to pyenv's shim again."""
    spec = importlib.util.spec_from_file_location('bench_nifti_real', Path(__file__).resolve().parents[1]/'bench'/'bench_nifti_real.py')
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    if shutil.which(bench.dcm2niix_program()) is None: pytest.skip('dcm2niix not installed (pip install dcm2niix)')
    cmds = bench.commands(str(Path(sysconfig.get_path('scripts'))/'dicom_prep_nifti'), None)
    for name in ('dcm2niix -z y', 'dcm2niix -z y -1'):
        exe = shutil.which(cmds[name][0])
        assert exe and not Path(exe).read_bytes().startswith(b'#!'), f"{name}: {exe} is a script that launches dcm2niix"


FULL_DISK_WRITE = """
import sys, numpy as np
from dicom_prep.core import atomic_path
from dicom_prep.niftiwrite import nifti_image, write_nii_gz
img = nifti_image(np.random.default_rng(0).integers(0, 3000, (256, 256, 40), np.int16), np.eye(4))
try:
    with atomic_path(sys.argv[1], None) as tmp: write_nii_gz(tmp, img)
except OSError as e: print(type(e).__name__, e.errno, str(e))
"""

def full_disk_write(dest) -> subprocess.CompletedProcess:
    "Write a 5 MB volume to `dest` on a full disk in a child process, given 60 s (a hung writer is killed)."
    return subprocess.run([sys.executable, '-c', FULL_DISK_WRITE, str(dest)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def small_disk(request):
    "test_run's 300 KB tmpfs."
    return request.getfixturevalue('tmpfs')


def test_write_nii_gz_on_a_full_disk_fails_cleanly(small_disk):
    """A .nii.gz that does not fit: ENOSPC raised from isal's writer threads, naming the file, nothing left behind, no hang."""
    r = full_disk_write(small_disk/'v.nii.gz')
    assert r.stdout.startswith('OSError 28 ') and str(small_disk/'v.nii.gz') in r.stdout, r.stdout + r.stderr
    assert list(small_disk.iterdir()) == []


def test_the_full_disk_error_names_the_file_and_nothing_else(small_disk):
    """The message a full disk gives (the volume's error, the run's warning) ends with the file's name.
    (Before: `[Errno 28] No space left on device: '.../v.nii.gz' -> None`: core._name_error sets `filename2 = None`, which
    OSError prints unless the attribute is unset.)"""
    r = full_disk_write(small_disk/'v.nii.gz')
    assert r.stdout.strip().endswith(f"'{small_disk/'v.nii.gz'}'"), r.stdout


def test_isal_floor_is_a_version_whose_threaded_writer_raises_on_a_full_disk():
    """pyproject's isal floor admits only versions whose `igzip_threaded` writer raises when the disk fills: 1.6.1, 1.7.0,
    1.7.2 and 1.8.0 (each installed and tried on a 2 MB tmpfs) lose the ENOSPC in their writer thread and hang for ever,
    so a conversion worker, then the run, never ends, its partial temporary left behind; 1.9.0 and 1.9.1 raise."""
    deps = tomllib.loads((Path(__file__).resolve().parents[1]/'pyproject.toml').read_text())['project']['dependencies']
    [floor] = [m.group(1) for d in deps if (m := re.fullmatch(r'isal\s*>=\s*([\d.]+)', d.strip()))]
    assert tuple(map(int, floor.split('.'))) >= (1, 9), f"isal>={floor} admits versions that hang on a full disk"


def oblique_gap(src, ramp):
    "An oblique stack with a missing slice, its ImagePositionPatient written to 5 decimals as scanners write DS values."
    from dicom_prep.synth import oblique_orientation
    iop = oblique_orientation(0.3, -0.2); normal = np.cross(iop[:3], iop[3:]); origin = np.array([-123.4567, 87.6543, 210.9876])
    synth_series(src, rows=6, cols=4, iop=iop, positions=[tuple(origin + z * normal) for z in (0, 2.5, 5, 10, 12.5, 15)], pixels=ramp)


def test_resample_of_an_oblique_stack_adds_no_rows_for_rounded_positions(tmp_path):
    """An oblique stack with a missing slice, positions rounded to 5 decimals (1e-5 mm off the stack's line): with --resample
    its slices keep their size and are read unshifted, first and last planes holding the first and last slices.
    (Before: offsets of 1e-5 pixel were taken for a tilt: a row and a column of fill, 0.75 mm off dcm2niix's `_Eq_` affine.)"""
    ramp = lambda k: (np.arange(24).reshape(6, 4) - 12) * 3 + 7 * k
    oblique_gap(tmp_path/'src', ramp)
    r, [vol] = ours(tmp_path/'src', tmp_path/'out', resample=True)
    a = np.asarray(nib.load(vol).dataobj)
    assert r.verdicts == {'ok': 1} and a.shape[:2] == (4, 6)
    np.testing.assert_array_equal(a[:, :, 0], ramp(0)[::-1].T)
    np.testing.assert_array_equal(a[:, :, -1], ramp(5)[::-1].T)


@needs_dcm2niix
def test_resample_of_an_oblique_stack_equals_dcm2niix(tmp_path):
    "The oblique stack above against dcm2niix's `_Eq_` copy: shape, zooms, affine and voxels."
    oblique_gap(tmp_path/'src', lambda k: (np.arange(24).reshape(6, 4) - 12) * 3 + 7 * k)
    assert_as_dcm2niix(tmp_path)


@needs_dcm2niix
def test_resample_ties_round_as_dcm2niix_on_scanner_coordinates(tmp_path):
    """An oblique stack far from the isocentre with one slice missing (steps of 1.907 mm): the plane interpolated halfway
    between two slices rounds every .5 voxel as dcm2niix does, which measures a slice's distance from the lowest as the
    Euclidean distance between single-precision ImagePositionPatient values (`series.stack_positions`).
    (Before: float64 dot products with the normal; the float noise deciding a tie differed: 24 of 192 voxels 1 apart.)"""
    from dicom_prep.synth import oblique_orientation
    ramp = lambda k: (np.arange(24).reshape(6, 4) - 12) * 3 + 7 * k
    iop = oblique_orientation(0.31, -0.27); normal = np.cross(iop[:3], iop[3:]); origin = np.array([-187.31, 64.09, 251.77])
    synth_series(tmp_path/'src', rows=6, cols=4, iop=iop, positions=[tuple(origin + k * 1.907 * normal) for k in (0, 1, 2, 3, 5, 6)],
                 pixels=ramp)
    r, [vol] = ours(tmp_path/'src', tmp_path/'out', resample=True)
    a, theirs = np.asarray(nib.load(vol).dataobj), np.asarray(d2n_extra(tmp_path/'src', tmp_path/'d2n', 'Eq').dataobj)
    assert a.shape == theirs.shape and int((a != theirs).sum()) == 0, f"{int((a != theirs).sum())} of {a.size} voxels differ"
