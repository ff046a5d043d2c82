"""Stop 36's changes (isal gzip, header speedups, dcm2niix's `_Eq` grid for `--resample`) as a hostile user drives them,
on real and synthesised data. Each test failed on main at 7eb448f; its docstring says what it found."""
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_prep.synth import synth_series
from test_nifti import ours

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
