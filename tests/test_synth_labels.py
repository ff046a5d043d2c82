"""Issue 23 — the masks benchmark's data at full size: a 300-slice 512×512 CT, a 100-segment binary SEG and a 50-ROI
RTSTRUCT (nbs/01c_synth_labels.ipynb). It must write in seconds, and the reference readers must read it back: highdicom
gives the segments' ellipsoids voxel for voxel, rt-utils each ROI. Run with `pytest -s` to see the timings."""
import time

import numpy as np
import pydicom
import pytest

hd = pytest.importorskip('highdicom')
rt_utils = pytest.importorskip('rt_utils')
from dicom_prep.synth_labels import Ellipsoid, synth_bench_annotated

N, SIZE = 300, 512


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    t = time.perf_counter()
    b = synth_bench_annotated(tmp_path_factory.mktemp('bench'))
    return b, time.perf_counter() - t


def _expected(e, k):
    return p if (p := e.plane(k, (SIZE, SIZE))) is not None else np.zeros((SIZE, SIZE), bool)


def _grown(e, k, by):
    "The ellipsoid's section on slice k, its in-plane semi-axes grown by `by` pixels."
    return Ellipsoid(e.centre, (e.radii[0], e.radii[1] + by, e.radii[2] + by)).plane(k, (SIZE, SIZE))


def test_bench_writes_in_seconds(bench):
    b, seconds = bench
    print(f"\nwrote {len(b.images)} CT slices, SEG {b.seg.stat().st_size / 1e6:.0f} MB, RTSTRUCT {b.rtstruct.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s")
    assert seconds < 30
    ds = pydicom.dcmread(b.seg, stop_before_pixels=True)
    assert (len(b.images), len(ds.SegmentSequence), ds.Rows, ds.Columns) == (N, 100, SIZE, SIZE)
    assert len(pydicom.dcmread(b.rtstruct).StructureSetROISequence) == 50


def test_highdicom_reads_segments_across_the_set(bench):
    "highdicom reads the SEG whole, and 10 segments spread over the 100 (first and last among them) voxel for voxel."
    b, _ = bench
    t = time.perf_counter()
    seg = hd.seg.segread(b.seg)
    picked = np.linspace(1, len(b.segments), 10).round().astype(int).tolist()
    vol = seg.get_volume(segment_numbers=picked)       # all 100 at once is a 7.9 GB array
    print(f"\nhighdicom: segread + get_volume of {len(picked)} segments {time.perf_counter() - t:.1f} s, {vol.array.shape}")
    assert seg.number_of_segments == len(b.segments) == 100
    positions = {round(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), 3): k for k, p in enumerate(b.images)}
    where = [positions[round(float((vol.affine @ [i, 0, 0, 1])[2]), 3)] for i in range(vol.shape[0])]
    for s, n in enumerate(picked):
        assert np.array_equal(vol.array[..., s].astype(bool), np.stack([_expected(b.segments[n - 1], k) for k in where])), n


def test_rt_utils_reads_every_roi(bench):
    b, _ = bench
    t = time.perf_counter()
    rt = rt_utils.RTStructBuilder.create_from(str(b.images[0].parent), str(b.rtstruct))
    masks = [rt.get_roi_mask_by_name(f'roi{i:03d}') for i in range(len(b.rois))]
    print(f"\nrt-utils: load + 50 masks {time.perf_counter() - t:.1f} s")
    for m, e in zip(masks, b.rois, strict=True):
        k = int(round(e.centre[0]))
        inner, outer = (_grown(e, k, g) for g in (-1.5, 1.5))     # rt-utils' edge rule differs within a pixel of the outline
        assert m[..., k][inner].all() and not m[..., k][~outer].any()
