"""Masks from real SEG and RTSTRUCT files, compared with the reference readers (highdicom, rt-utils), and through both pipelines.

The real files live in ../shared/data (seg_highdicom, rtstruct_rtutils); the tests that need them skip when it is absent."""
import os, shutil, sqlite3, subprocess, sys, time
from functools import partial
from contextlib import closing
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import query
from dicom_prep.annotations import describe_annotation, image_planes
from dicom_prep.masks import fill_contours, match_rows, paint_target
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.preprocess import preprocess
from dicom_prep.sources import sample_data_dirs
from dicom_prep.synth import synth_series

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'
SEGS, RTS = SHARED/'seg_highdicom', SHARED/'rtstruct_rtutils'
needs_real = pytest.mark.skipif(not (SEGS.is_dir() and RTS.is_dir()), reason=f'seg_highdicom/rtstruct_rtutils not found under {SHARED}')
hd = pytest.importorskip('highdicom')


def ct2() -> list[Path]:
    "pydicom's CT2 series (four 16×16 slices), which highdicom's CT SEGs reference."
    d = next(d for d in sample_data_dirs() if (d/'dicomdirtests').is_dir())
    return sorted((d/'dicomdirtests/77654033/CT2').glob('*'))

def _ct2_with(tmp_path, seg:str, name:str) -> Path:
    "A source tree: CT2 in src/p1, with highdicom's SEG `seg` beside it as `name`."
    src = tmp_path/'src'/'p1'; src.mkdir(parents=True)
    for f in ct2(): shutil.copy(f, src)
    shutil.copy(SEGS/seg, src/name)
    return tmp_path/'src'

def planes_of(files) -> list:
    return [p for f in files for p in image_planes(pydicom.dcmread(f, stop_before_pixels=True))]

def painted(path, planes, policy='last'):
    "The label map of annotation `path` on `planes` (ids 1, 2, ... in segment order), and its rows."
    a = describe_annotation(pydicom.dcmread(path, stop_before_pixels=True))
    ids = {s.key: n for n, s in enumerate(a.segments, 1)}
    canvas, outcomes = paint_target([(path, a)], planes, ids, policy)
    stack = np.stack([canvas.layers[k] if canvas.layers[k] is not None else np.zeros((p.rows, p.cols), np.uint8) for k, p in enumerate(planes)])
    return stack, match_rows([(path, a)], canvas, outcomes, ids)


@needs_real
@pytest.mark.parametrize('name', ['seg_image_ct_binary', 'seg_image_ct_binary_fractional', 'seg_image_ct_true_fractional', 'seg_image_ct_binary_overlap'])
def test_seg_equals_highdicom_voxel_for_voxel(name):
    "Each CT SEG painted on pydicom's CT2 slices equals highdicom's pixels by source instance (fractions from 0.5; overlaps: the last segment)."
    planes, path = planes_of(ct2()), SEGS/f'{name}.dcm'
    mine, rows = painted(path, planes)
    seg = hd.seg.segread(path)
    theirs = seg.get_pixels_by_source_instance([p.sop_uid for p in planes], combine_segments=False)
    if seg.segmentation_type.value == 'FRACTIONAL' and theirs.dtype.kind == 'f': theirs = theirs >= 0.5
    expected = np.zeros(mine.shape, np.uint8)
    for s in range(theirs.shape[-1]): expected[theirs[..., s] > 0] = s + 1          # later segments over earlier ones: --overlap last
    np.testing.assert_array_equal(mine, expected)
    assert mine.any() and rows[0].verdict == 'matched'
    assert ('overlap' in {r.verdict for r in rows}) == name.endswith('overlap')

@needs_real
def test_single_frame_seg_on_its_ct_image():
    "highdicom's single-frame 128×128 SEG over its CT image: equal to highdicom's array."
    planes = planes_of([SEGS/'ct_image.dcm'])
    mine, _ = painted(SEGS/'seg_image_ct_binary_single_frame.dcm', planes)
    theirs = hd.seg.segread(SEGS/'seg_image_ct_binary_single_frame.dcm').get_pixels_by_source_instance([planes[0].sop_uid], combine_segments=True)
    np.testing.assert_array_equal(mine, theirs)
    assert mine.sum() > 0

@needs_real
def test_a_seg_whose_image_is_absent_is_recorded_as_such(tmp_path):
    "highdicom's CR SEG without its image (pydicom's dicomdirtests CR1/6154, left out here): no mask, and a 'reference not found' row that says what is missing."
    preprocess(_ct2_with(tmp_path, 'seg_image_cr_binary.dcm', 'cr_seg.dcm'), tmp_path/'out', n_workers=0, quiet=True)
    assert query(tmp_path/'out', 'select annotation, verdict, reason from mask_matches') == [
        ('p1/cr_seg.dcm', 'reference not found', 'none of its 1 referenced images or 1 series is in the tree')]
    assert query(tmp_path/'out', 'select count(*) from images where mask_path is not null') == [(0,)]


def _rt_utils_masks(series_dir, rt_path):
    "{ROI name: {SOP Instance UID: rt-utils' mask of that slice}}."
    rt_utils = pytest.importorskip('rt_utils')
    rts = rt_utils.RTStructBuilder.create_from(str(series_dir), str(rt_path))
    uids = [d.SOPInstanceUID for d in rts.series_data]
    return {n: {u: m[:, :, j] for j, u in enumerate(uids)} for n in rts.get_roi_names() for m in [rts.get_roi_mask_by_name(n)]}

def _near_contour(shape, contours, tol=1.0) -> np.ndarray:
    "Pixels whose centres lie within `tol` pixels of a contour's edges."
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]; near = np.zeros(shape, bool)
    for c in contours:
        for (a, b), (e, f) in zip(c, np.roll(c, -1, 0), strict=True):
            t = np.clip(((xx - a) * (e - a) + (yy - b) * (f - b)) / max((e - a)**2 + (f - b)**2, 1e-12), 0, 1)
            near |= np.hypot(xx - a - t * (e - a), yy - b - t * (f - b)) <= tol
    return near

@needs_real
@pytest.mark.parametrize('rt', ['rt.dcm', 'non_existent_reference_rt.dcm'])
def test_rtstruct_against_rt_utils(tmp_path, rt):
    """rt-utils' masks, where we differ on purpose: rt-utils rounds vertices to whole pixels and fills the outline in (and a
    ring's hole); we fill pixel centres inside an odd number of contours, or on one (DICOM's XOR rule and C.8.8.6.3).
    So every pixel we fill, rt-utils fills; every pixel only rt-utils fills is on a contour's edge or inside an inner contour."""
    series = tmp_path/'ct'; series.mkdir()
    for f in ('ct_1.dcm', 'ct_2.dcm'): shutil.copy(RTS/'mock_data'/f, series)
    planes = planes_of(sorted(series.glob('*.dcm')))
    ds = pydicom.dcmread(RTS/'mock_data'/rt)
    a = describe_annotation(ds)
    theirs = _rt_utils_masks(series, RTS/'mock_data'/rt)
    mine, _ = painted(RTS/'mock_data'/rt, planes)
    compared = 0
    for s in a.segments:
        roi = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == s.number)
        for k, p in enumerate(planes):
            contours = [p.pixel_of(np.reshape(np.array(c.ContourData, float), (-1, 3)))[:, :2] for c in roi.ContourSequence
                        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == p.sop_uid]
            if not contours: continue
            m, t = mine[k] == s.number, theirs[s.label][p.sop_uid].astype(bool)
            assert m.sum() > 100 and not (m & ~t).any()                                  # ours inside theirs
            union = np.logical_or.reduce([fill_contours([c], p.rows, p.cols) for c in contours])   # rt-utils fills every contour
            assert not ((t & ~m) & ~_near_contour(m.shape, contours, 1.0) & ~(union & ~m)).any()
            compared += 1
    assert compared >= 1


@needs_real
def test_preprocess_writes_masks_beside_images(tmp_path):
    "CT2 plus the overlapping SEG: preprocess writes a mask PNG per labelled frame, equal to highdicom's labels, named in the image rows."
    preprocess(_ct2_with(tmp_path, 'seg_image_ct_binary_overlap.dcm', 'seg.dcm'), tmp_path/'out', n_workers=0, quiet=True)
    rows = query(tmp_path/'out', "select i.sop_uid, i.mask_path, i.thumbnail_path from images i where i.mask_path is not null order by 1")
    assert len(rows) == 4
    segments = dict(query(tmp_path/'out', 'select label, id from segments'))
    seg = hd.seg.segread(SEGS/'seg_image_ct_binary_overlap.dcm')
    theirs = seg.get_pixels_by_source_instance([r[0] for r in rows], combine_segments=False)
    for (_, mask, png), t in zip(rows, theirs, strict=True):
        m = np.array(Image.open(tmp_path/'out'/mask))
        assert m.shape == Image.open(tmp_path/'out'/png).size[::-1]
        expected = np.zeros(m.shape, np.uint8)
        for s, label in enumerate(['first segment', 'second segment']): expected[t[..., s] > 0] = segments[label]
        np.testing.assert_array_equal(m, expected)
    assert query(tmp_path/'out', "select verdict from mask_matches where verdict = 'overlap'") == [('overlap',)]


@needs_real
def test_nifti_label_volume_on_the_volume_grid(tmp_path):
    "rt-utils' CT with its RTSTRUCT: the label volume has the image's shape and affine, and each slice holds our fill of that slice."
    src = tmp_path/'src'/'p'; src.mkdir(parents=True)
    for f in ('ct_1.dcm', 'ct_2.dcm', 'rt.dcm'): shutil.copy(RTS/'mock_data'/f, src)
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    [(out, seg)] = query(tmp_path/'out', 'select output_path, seg_path from volumes where seg_path is not null')
    img, lab = nib.load(tmp_path/'out'/out), nib.load(tmp_path/'out'/seg)
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine) and lab.get_data_dtype() == np.uint8
    vol, lv = img.get_fdata(), np.asarray(lab.dataobj)
    files = sorted(src.glob('ct_*.dcm'))
    planes = planes_of(files)
    mine, _ = painted(src/'rt.dcm', planes)
    rid = query(tmp_path/'out', "select id from segments where label = 'ROI-1'")[0][0]
    for k in range(lv.shape[2]):                           # voxel (i, j, k) is column i, row rows-1-j of slice k, as for the image
        z = (img.affine @ [0, 0, k, 1])[2]                   # RAS and LPS share the z axis
        n = next(n for n, p in enumerate(planes) if abs(p.origin[2] - z) < 1e-3)
        ds = pydicom.dcmread(files[n])
        np.testing.assert_allclose(vol[:, ::-1, k].T, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        np.testing.assert_array_equal(lv[:, ::-1, k].T == rid, mine[n] == 1)
    assert (lv == rid).sum() > 100


def _as_schema_6(out, private):
    "Turn a fresh pseudonymised index back into what schema 6 wrote: no kinds, no mask columns or tables."
    with closing(sqlite3.connect(private)) as p: p.execute('alter table files drop column kind'); p.execute('drop table annotations'); p.commit()
    with closing(sqlite3.connect(out/'dicom_prep.db')) as m:
        m.execute("update meta set value = '6' where key = 'schema_version'")
        for t in ('segments', 'mask_targets', 'mask_matches'): m.execute(f'drop table {t}')
        for table, cols in (('images', ('frame_of_reference', 'mask_path')), ('volumes', ('frame_of_reference', 'seg_path'))):
            for c in cols:
                for (ix,) in m.execute("select name from sqlite_master where type = 'index' and tbl_name = ? and sql like ?", [table, f'%{c}%']).fetchall():
                    m.execute(f'drop index {ix}')
                m.execute(f'alter table {table} drop column {c}')
        m.commit()

def test_a_pseudonymised_index_of_schema_6_upgrades(tmp_path):
    "Schema 7 adds `files.kind` where `files` lives: in the private state of a pseudonymised index (its main file has no `files`)."
    src = tmp_path/'src'/'p1'; src.mkdir(parents=True)
    for f in ct2(): shutil.copy(f, src)
    preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True, pseudonymize=True)
    private = next(tmp_path.glob('*.private.db'))
    _as_schema_6(tmp_path/'out', private)
    r = preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True, pseudonymize=True)
    assert r.status == 'completed'
    with closing(sqlite3.connect(private)) as p: assert {k for (k,) in p.execute('select kind from files')} == {'image'}


def _annotated_tree(root) -> Path:
    "CT2 with the overlapping SEG, and rt-utils' CT with its RTSTRUCT: two series, two annotations."
    for f in ct2(): (root/'p1').mkdir(parents=True, exist_ok=True); shutil.copy(f, root/'p1')
    shutil.copy(SEGS/'seg_image_ct_binary_overlap.dcm', root/'p1'/'seg.dcm')
    (root/'p2').mkdir(); [shutil.copy(RTS/'mock_data'/f, root/'p2') for f in ('ct_1.dcm', 'ct_2.dcm', 'rt.dcm')]
    return root

def _masks(out) -> dict:
    "{mask path: bytes} under a run's masks folder."
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out/'masks').rglob('*.png'))}

def _painted(out) -> list:
    return query(out, "select target, made_at, run_id from mask_targets order by target")

@needs_real
def test_masks_are_incremental(tmp_path):
    "A rerun paints nothing; a changed SEG repaints only its series; a SEG gone takes its masks with it; new settings need --force."
    src, out = _annotated_tree(tmp_path/'src'), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    first, masks = _painted(out), _masks(out)
    assert len(first) == 2 and len(masks) == 5 and query(out, "select count(*) from images where mask_path is not null") == [(5,)]
    preprocess(src, out, n_workers=0, quiet=True)
    assert _painted(out) == first and _masks(out) == masks
    os.utime(src/'p1'/'seg.dcm', ns=(1, 1))
    r = preprocess(src, out, n_workers=0, quiet=True)
    ct2_series = pydicom.dcmread(ct2()[0], stop_before_pixels=True).SeriesInstanceUID
    assert {t: run for t, _, run in _painted(out)} == {t: (r.run_id if t == ct2_series else run) for t, _, run in first}
    assert _masks(out) == masks                                       # the same masks, repainted
    (src/'p1'/'seg.dcm').unlink()
    preprocess(src, out, n_workers=0, quiet=True, prune=True, force=True)
    assert query(out, "select count(*) from images where mask_path like 'masks/p1/%'") == [(0,)]
    assert not (out/'masks'/'p1').exists() or not list((out/'masks'/'p1').glob('*.png'))
    assert list(_masks(out)) == ['masks/p2/ct_1.png']
    with pytest.raises(Exception, match='overlap'): preprocess(src, out, n_workers=0, quiet=True, overlap='first')

@needs_real
def test_overlap_error_refuses_the_target_and_says_why(tmp_path):
    "--overlap error: the series whose segments overlap gets no mask, its mask_targets row says why, the other series is painted."
    src, out = _annotated_tree(tmp_path/'src'), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True, overlap='error')
    rows = dict(query(out, "select status, reason from mask_targets where status != 'ok'"))
    assert list(rows) == ['refused'] and 'overlap' in rows['refused']
    assert query(out, "select count(*) from images where mask_path like 'masks/p1/%'") == [(0,)]
    assert query(out, "select count(*) from images where mask_path like 'masks/p2/%'") == [(1,)]


def test_hostile_annotations_each_give_a_recorded_reason(tmp_path):
    """A SEG declaring a million frames, fractions that cannot be read, a segment number out of range, an RTSTRUCT pointing at
    nothing, an open contour and a contour of 10⁷ points (80 MB): each is recorded with its reason, in bounded time and memory."""
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    src = tmp_path/'src'
    images = synth_series(src/'ct', 8, 64, 64, FrameOfReferenceUID=generate_uid())
    for name, make in dict(many=sl.seg_many_frames, nan=sl.seg_fractional_nan, badnum=sl.seg_bad_segment_number,
                           dangling=partial(sl.rtstruct_dangling, frame=True), open=sl.rtstruct_open_contour,
                           huge=partial(sl.rtstruct_huge_contour, points=10**7)).items():
        make(images, src/f'{name}.dcm')
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', 'import resource, sys; from dicom_prep.preprocess import main; sys.argv[0] = "x"\n'
                        'try: main()\nexcept SystemExit: pass\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)',
                        '--dicom-dir', str(src), '--output-dir', str(tmp_path/'out'), '--workers', '0'], capture_output=True, text=True)
    seconds, peak_mib = time.perf_counter() - t, int(r.stdout.split()[-1]) >> 10
    rows = {a.split('/')[-1]: (v, why) for a, v, why in query(tmp_path/'out', "select annotation, verdict, reason from mask_matches where verdict != 'matched'")}
    assert {k: v for k, (v, _) in rows.items()} == {'many.dcm': 'too large', 'nan.dcm': 'bad values', 'badnum.dcm': 'bad segment number',
                                                   'dangling.dcm': 'reference not found', 'open.dcm': 'open contour', 'huge.dcm': 'too large'}
    assert '10,000,000 points' in rows['huge.dcm'][1] and 'MaximumFractionalValue' in rows['nan.dcm'][1] and 'segment 2' in rows['badnum.dcm'][1]
    assert 'verdicts other than matched (see mask_matches)' in r.stdout
    assert seconds < 60 and peak_mib < 1024, (seconds, peak_mib)     # parsed, the 80 MB contour alone would take 1.2 GB (3·10⁷ strings and floats)


def _many_annotated(root, n_series=24, rows=96) -> Path:
    "`n_series` small CT series, each with a two-segment SEG and a two-ROI RTSTRUCT (a disc and a ring with a hole)."
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    yy, xx = np.mgrid[0:rows, 0:rows]
    for s in range(n_series):
        images = synth_series(root/f'p{s:02d}/ct', 6, rows, rows, FrameOfReferenceUID=generate_uid(), series_number=s + 1)
        ball = np.stack([np.hypot(yy - 40 - k, xx - 30 - s) < 12 + k for k in range(6)])
        sl.synth_seg(images, root/f'p{s:02d}/seg.dcm', [sl.SegmentSpec('Liver', ball), sl.SegmentSpec('Lesion', np.roll(ball, 9, axis=2), type=('SCT', '52988006', 'Lesion'))])
        sl.synth_rtstruct(images, root/f'p{s:02d}/rt.dcm', [sl.RoiSpec('Body', [(k, sl.disc(48, 48, 40)) for k in range(6)]),
                                                          sl.RoiSpec('Ring', [(k, c) for k in (1, 2) for c in sl.ring(50, 50, 20, 8)])])
    return root

def _stage_rows(out) -> tuple:
    "What the masks stage records: the verdicts, the targets and the segment ids."
    return (query(out, 'select * from mask_matches order by 1, 2, 3, 4'), query(out, 'select pipeline, target, sig, status, reason, n_masks from mask_targets order by 2'),
            query(out, 'select id, key, label, category, type, colour from segments order by id'))

def _written(out, pattern) -> dict:
    "{path: bytes} of the files matching `pattern` under a run's output folder."
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob(pattern))}

KILLED = {'preprocess': (preprocess, '*.png', 'masks', 'select filename, mask_path from images order by 1', 24 * 6),
          'nifti': (dicom_to_nifti, '*_seg.nii.gz', 'nifti', 'select id, seg_path from volumes order by 1', 24)}

@pytest.mark.parametrize('script,after', [('preprocess', 1), ('preprocess', 25), ('preprocess', 60), ('nifti', 1), ('nifti', 12)])
def test_a_kill_during_the_masks_stage_then_a_rerun_equals_a_clean_run(tmp_path, script, after):
    "kill -9 once the masks stage has written `after` masks (PNGs, or label volumes); the rerun's masks, rows and ids equal a clean run's."
    run, pattern, folder, paths_sql, n = KILLED[script]
    src = _many_annotated(tmp_path/'src')
    run(src, tmp_path/'clean', n_workers=0, quiet=True)
    cmd = [sys.executable, '-c', f'from dicom_prep.{script} import main; main()', '--dicom-dir', str(src), '--output-dir', str(tmp_path/'out'), '--workers', '1']
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and len(list((tmp_path/'out'/folder).rglob(pattern))) < after: time.sleep(0.002)
    p.kill(); p.wait()
    assert p.returncode == -9, 'the run ended before the kill: the test did not test a kill'
    run(src, tmp_path/'out', n_workers=0, quiet=True)
    state = lambda out: (_written(out/folder, pattern), query(out, paths_sql), _stage_rows(out))
    assert state(tmp_path/'out') == state(tmp_path/'clean') and len(_written(tmp_path/'clean'/folder, pattern)) == n


@pytest.mark.parametrize('step', [2.0, -2.0])                     # -2: slices stored top-down (a flipped stack)
def test_label_voxels_sit_on_their_image_voxels_in_oblique_series(tmp_path, step):
    """An oblique series with non-square pixels, a SEG and an RTSTRUCT: each label voxel's patient position (from the NIfTI
    affine) is the centre of the DICOM pixel it was painted from, and the label map holds exactly the masks put in."""
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    a, b = np.deg2rad(25), np.deg2rad(-15)
    row = np.array([np.cos(a), np.sin(a), 0.]); col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    src, n, rows, cols = tmp_path/'src', 6, 40, 52
    images = synth_series(src/'p/ct', n, rows, cols, iop=tuple(row) + tuple(col), origin=(-20, 10, 30), step=step, spacing=(0.9, 0.6),
                          FrameOfReferenceUID=generate_uid())
    yy, xx = np.mgrid[0:rows, 0:cols]
    ball = np.stack([np.hypot(yy - 15 - k, (xx - 20) * 0.7) < 6 + k for k in range(n)])
    sl.synth_seg(images, src/'p/seg.dcm', [sl.SegmentSpec('Liver', ball)])
    sl.synth_rtstruct(images, src/'p/rt.dcm', [sl.RoiSpec('Lesion', [(k, sl.disc(38, 28, 7)) for k in (1, 3)])])
    dicom_to_nifti(src, tmp_path/'out', n_workers=0, quiet=True)
    [(out, seg)] = query(tmp_path/'out', 'select output_path, seg_path from volumes where seg_path is not null')
    lab = nib.load(tmp_path/'out'/seg); lv = np.asarray(lab.dataobj)
    assert lab.shape == nib.load(tmp_path/'out'/out).shape and np.allclose(lab.affine, nib.load(tmp_path/'out'/out).affine)
    ids = dict(query(tmp_path/'out', 'select label, id from segments'))
    lps = np.diag([-1, -1, 1, 1]) @ lab.affine                          # voxel -> LPS, DICOM's patient axes
    for k, f in enumerate(images):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ipp = np.array(ds.ImagePositionPatient, float)
        s = next(s for s in range(n) if np.allclose((lps @ [0, rows - 1, s, 1])[:3], ipp, atol=1e-3))   # pixel (0, 0) is voxel (0, rows-1)
        for r, c in ((0, 0), (7, 11), (rows - 1, cols - 1)):              # any pixel: its voxel's position is the pixel centre
            np.testing.assert_allclose((lps @ [c, rows - 1 - r, s, 1])[:3], ipp + c * 0.6 * row + r * 0.9 * col, atol=1e-3)
        disc = fill_contours([sl.disc(38, 28, 7)], rows, cols) if k in (1, 3) else np.zeros((rows, cols), bool)
        expected = np.where(disc, ids['Lesion'], np.where(ball[k], ids['Liver'], 0))   # the RTSTRUCT's path sorts first: the SEG paints last
        expected = np.where(ball[k], ids['Liver'], expected)
        np.testing.assert_array_equal(lv[:, ::-1, s].T, expected)
    assert (lv == ids['Liver']).sum() == ball.sum() and (lv == ids['Lesion']).sum() > 0


def test_nnunet_export_of_a_ct_and_its_seg(tmp_path):
    "CT plus a two-segment SEG through dicom_prep_nifti and the nnU-Net export: labelsTr loads, on the image's shape and affine, with dataset.json's values."
    import json
    from pydicom.uid import generate_uid
    from dicom_prep.export import export
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    images = synth_series(tmp_path/'src/p/ct', 8, 32, 40, FrameOfReferenceUID=generate_uid())
    liver = np.zeros((8, 32, 40), bool); liver[2:6, 5:20, 8:30] = True
    lesion = np.zeros_like(liver); lesion[3:5, 10:14, 12:16] = True
    sl.synth_seg(images, tmp_path/'src/p/seg.dcm', [sl.SegmentSpec('Liver', liver), sl.SegmentSpec('Lesion', lesion, type=('SCT', '52988006', 'Lesion'))])
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    export(tmp_path/'out'/'dicom_prep.db', tmp_path/'nn', 'nnunet')
    [lab_path] = list((tmp_path/'nn').rglob('labels*/*.nii.gz')); [img_path] = list((tmp_path/'nn').rglob('images*/*_0000.nii.gz'))
    lab, img = nib.load(lab_path), nib.load(img_path)
    assert lab.shape == img.shape == (40, 32, 8) and np.allclose(lab.affine, img.affine)
    labels = json.loads((tmp_path/'nn'/'dataset.json').read_text())['labels']
    assert set(labels) == {'background', 'Liver', 'Lesion'} and sorted(labels.values()) == [0, 1, 2]
    lv = np.asarray(lab.dataobj)[:, ::-1, :].transpose(2, 1, 0)              # back to (slice, row, column), slices in file order
    expected = np.where(lesion, labels['Lesion'], np.where(liver, labels['Liver'], 0))     # the SEG's later segment over the earlier one
    np.testing.assert_array_equal(lv, expected)


# ---------------------------------------------------------------------------------------------------- hostile review (issue 23)

@needs_real
def test_a_segment_repainted_over_an_overlap_is_not_called_empty():
    "SEG binary, then overlap, then true_fractional on CT2 (their path order): the fractional SEG's segment 1 labels pixels, so no 'empty segment'."
    planes = planes_of(ct2())
    anns = [(SEGS/f'{n}.dcm', describe_annotation(pydicom.dcmread(SEGS/f'{n}.dcm', stop_before_pixels=True)))
            for n in ('seg_image_ct_binary', 'seg_image_ct_binary_overlap', 'seg_image_ct_true_fractional')]
    ids = {s.key: n for n, s in enumerate(anns[1][1].segments, 1)}
    for policy in ('last', 'first'):
        canvas, outcomes = paint_target(anns, planes, ids, policy)
        rows = match_rows(anns, canvas, outcomes, ids)
        assert not [r for r in rows if r.verdict == 'empty segment' and r.annotation == str(anns[2][0])], (policy, rows)
        assert outcomes[str(anns[2][0])].painted[1] > 0

def test_a_label_map_seg_declares_no_background_segment(tmp_path):
    "A label-map SEG's segment 0 (pixel value 0: background) is no label: not a segment, no 'empty segment' verdict, ids from its first real segment."
    from pydicom.uid import generate_uid
    from dicom_prep.synth_labels import SegmentSpec, synth_seg
    files = synth_series(tmp_path/'ct', n=3, rows=8, cols=6, FrameOfReferenceUID=generate_uid())
    m = np.zeros((3, 8, 6), bool); m[1, 2:5, 1:4] = True
    path = synth_seg(files, tmp_path/'seg.dcm', [SegmentSpec('liver', m)], kind='LABELMAP')
    a = describe_annotation(pydicom.dcmread(path, stop_before_pixels=True))
    assert [s.label for s in a.segments] == ['liver']
    mine, rows = painted(path, planes_of(files))
    np.testing.assert_array_equal(mine, m.astype(np.uint8))
    assert [r.verdict for r in rows] == ['matched']

def test_a_seg_cropped_to_frames_that_are_not_byte_aligned(tmp_path):
    "A binary SEG whose 5×7 frames (a crop of the 12×10 images) share bytes in the bit stream: every frame lands where it belongs (pydicom 3.0.2's frame reader misreads them)."
    from pydicom.uid import generate_uid
    from dicom_prep.synth import oblique_orientation, save
    from dicom_prep.synth_labels import SegmentSpec, seg_dataset
    n, (r0, c0, h, w) = 5, (3, 2, 5, 7)
    files = synth_series(tmp_path/'ct', n=n, rows=12, cols=10, iop=oblique_orientation(0.6, -0.3), step=-2.0, spacing=(0.7, 1.1),
                         FrameOfReferenceUID=generate_uid())
    m = np.zeros((n, 12, 10), bool); m[:, r0:r0 + h, c0:c0 + w] = np.random.default_rng(2).random((n, h, w)) < 0.4
    ds = seg_dataset(files, [SegmentSpec('liver', m)])
    iop, ps = (np.array(x, float) for x in (ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                                             ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing))
    for f in ds.PerFrameFunctionalGroupsSequence:      # each frame's corner moved to the crop's, as writers storing a bounding box do
        p = f.PlanePositionSequence[0]
        p.ImagePositionPatient = [f'{v:.6f}' for v in np.array(p.ImagePositionPatient, float) + r0 * ps[0] * iop[3:] + c0 * ps[1] * iop[:3]]
    ds.Rows, ds.Columns = h, w
    bits = np.packbits(m[:, r0:r0 + h, c0:c0 + w].astype(np.uint8).ravel(), bitorder='little').tobytes()
    ds.PixelData = bits + b'\0' * (len(bits) % 2)
    mine, rows = painted(save(ds, tmp_path/'seg.dcm'), planes_of(files))
    np.testing.assert_array_equal(mine, m.astype(np.uint8))
    assert [r.verdict for r in rows] == ['matched']

def test_every_overlap_and_empty_segment_survives_the_tables_key(tmp_path):
    "Three SEGs overlapping pairwise and a SEG with two empty segments: one row per (annotation, verdict), `mask_matches`' key, naming every pair and segment."
    from pydicom.uid import generate_uid
    from dicom_prep.synth_labels import SegmentSpec, synth_seg
    files = synth_series(tmp_path/'ct', n=2, rows=6, cols=6, FrameOfReferenceUID=generate_uid())
    full, none = np.ones((2, 6, 6), bool), np.zeros((2, 6, 6), bool)
    specs = [[SegmentSpec('liver', full)], [SegmentSpec('kidney', full, type=('SCT', '64033007', 'Kidney'))],
             [SegmentSpec('tumour', full, type=('SCT', '108369006', 'Tumor')), SegmentSpec('cyst', none, type=('SCT', '367643001', 'Cyst')),
              SegmentSpec('stone', none, type=('SCT', '56381008', 'Calculus'))]]
    anns = [(p, describe_annotation(pydicom.dcmread(p, stop_before_pixels=True)))
            for p in (synth_seg(files, tmp_path/f'{k}.dcm', s) for k, s in enumerate(specs))]
    ids = {s.key: i for i, s in enumerate((s for _, a in anns for s in a.segments), 1)}
    canvas, outcomes = paint_target(anns, planes_of(files), ids)
    rows = match_rows(anns, canvas, outcomes, ids)
    assert len({(r.annotation, r.verdict) for r in rows}) == len(rows)
    [over] = [r for r in rows if r.verdict == 'overlap']
    assert over.segments == [1, 2, 3] and over.reason.count('overlap on') == 2     # 1|2, then 2|3: the last kept each pixel
    [empty] = [r for r in rows if r.verdict == 'empty segment']
    assert empty.segments == [4, 5] and 'cyst' in empty.reason and 'stone' in empty.reason

def test_a_seg_drawn_on_a_later_time_point_of_a_4d_volume(tmp_path):
    "A SEG whose frames reference the second time point's images lands on the volume's planes (the same grid), not 'reference not found'."
    from pydicom.uid import generate_uid
    from dicom_prep.synth_labels import SegmentSpec, synth_seg
    kw = dict(n=3, rows=8, cols=6, FrameOfReferenceUID=generate_uid(), series_uid=generate_uid(), study_uid=generate_uid(), NumberOfTemporalPositions=2)
    synth_series(tmp_path/'src/ct', TemporalPositionIdentifier=1, **kw)
    later = synth_series(tmp_path/'src/ct', TemporalPositionIdentifier=2, first_instance=4, seed=1, **kw)
    m = np.zeros((3, 8, 6), bool); m[1, 2:6, 1:4] = True
    synth_seg(later, tmp_path/'src/seg.dcm', [SegmentSpec('liver', m)])
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    assert query(tmp_path/'out', 'select verdict from mask_matches') == [('matched',)]
    [(out, seg)] = query(tmp_path/'out', 'select output_path, seg_path from volumes')
    img, lab = nib.load(tmp_path/'out'/out), nib.load(tmp_path/'out'/seg)
    assert img.shape[:3] == lab.shape and np.allclose(img.affine, lab.affine)
    np.testing.assert_array_equal(np.asarray(lab.dataobj)[:, ::-1].transpose(2, 1, 0), m)    # slices ascend as the series does

@needs_real
def test_the_cr_seg_on_its_cr_image_and_a_volume_left_unconverted(tmp_path):
    "highdicom's CR SEG on pydicom's CR1 image (dicomdirtests): the mask equals highdicom's; NIfTI skips the CR (no orientation), and says so, not that the image is missing."
    cr = next(d for d in sample_data_dirs() if (d/'dicomdirtests').is_dir())/'dicomdirtests/77654033/CR1/6154'
    src = tmp_path/'src'/'p1'; src.mkdir(parents=True)
    shutil.copy(cr, src/'cr.dcm'); shutil.copy(SEGS/'seg_image_cr_binary.dcm', src/'cr_seg.dcm')
    preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    [(sop, mask)] = query(tmp_path/'out', 'select sop_uid, mask_path from images')
    theirs = hd.seg.segread(src/'cr_seg.dcm').get_pixels_by_source_instance([sop], combine_segments=True)[0]
    np.testing.assert_array_equal(np.array(Image.open(tmp_path/'out'/mask)), theirs)
    dicom_to_nifti(tmp_path/'src', tmp_path/'nii', n_workers=0, quiet=True)
    [(verdict, reason)] = query(tmp_path/'nii', 'select verdict, reason from mask_matches')
    assert verdict == 'reference not found' and 'converted volume' in reason, reason

def test_annotations_without_references_skip_reformats_of_another_orientation(tmp_path):
    "An RTSTRUCT and a SEG without references, drawn on the axial series: its sagittal reformat (same frame of reference) is not theirs, so no 'off grid' there."
    from dicom_prep.synth_labels import RoiSpec, SegmentSpec, disc, synth_rtstruct, synth_seg
    ax = synth_series(tmp_path/'src/ax', n=8, rows=16, cols=16, FrameOfReferenceUID='1.2.3', spacing=(1, 1), step=1, series_number=1)
    synth_series(tmp_path/'src/sag', n=16, rows=8, cols=16, FrameOfReferenceUID='1.2.3', iop=(0, 1, 0, 0, 0, 1), spacing=(1, 1), step=1, series_number=2)
    synth_rtstruct(ax, tmp_path/'src/rt.dcm', [RoiSpec('gtv', [(k, disc(8, 8, 4)) for k in range(2, 6)])], refs=False)
    synth_seg(ax, tmp_path/'src/seg.dcm', [SegmentSpec('liver', np.ones((8, 16, 16), bool))], refs=False)
    preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    sag = query(tmp_path/'out', "select distinct series_uid from images where filename like 'sag/%'")[0][0]
    assert sorted(query(tmp_path/'out', 'select annotation, verdict from mask_matches where target = ?', [sag])) == [
        ('rt.dcm', 'reference not found'), ('seg.dcm', 'reference not found')]
    assert query(tmp_path/'out', "select count(*) from images where mask_path is not null and filename like 'ax/%'") == [(8,)]

def _dump(db_file) -> bytes:
    with closing(sqlite3.connect(db_file)) as c: return '\n'.join(c.iterdump()).encode()

def test_pseudonymised_masks_equal_plain_ones_and_leak_nothing(tmp_path):
    """--pseudonymize: the same masks and label volumes as a plain run, matched through keyed UIDs; the shared index holds no
    UID, path or name of the sources or annotations (the `annotations` table lives in the private state)."""
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    src = tmp_path/'src'
    images = synth_series(src/'DOE_JOHN/ct', 6, 32, 32, FrameOfReferenceUID=generate_uid(), PatientName='Doe^John', PatientID='MRN777')
    ball = np.zeros((6, 32, 32), bool); ball[1:5, 8:20, 10:24] = True
    sl.synth_seg(images, src/'DOE_JOHN/seg_DOE.dcm', [sl.SegmentSpec('Liver', ball)])
    sl.synth_rtstruct(images, src/'DOE_JOHN/rt_DOE.dcm', [sl.RoiSpec('GTV_DOE_JOHN', [(k, sl.disc(16, 16, 5)) for k in (2, 3)])])   # a label naming the patient
    for kind, run in (('pp', preprocess), ('nii', dicom_to_nifti)):
        run(src, tmp_path/kind, n_workers=0, quiet=True)
        run(src, tmp_path/f'{kind}_p', n_workers=0, quiet=True, pseudonymize=True)
    assert sorted(_masks(tmp_path/'pp').values()) == sorted(_masks(tmp_path/'pp_p').values()) and len(_masks(tmp_path/'pp')) == 4
    segs = [np.asarray(nib.load(next((tmp_path/k/'nifti').rglob('*_seg.nii.gz'))).dataobj) for k in ('nii', 'nii_p')]
    np.testing.assert_array_equal(*segs)
    marks = {str(pydicom.dcmread(f, stop_before_pixels=True).get(k)) for f in [*images, src/'DOE_JOHN/seg_DOE.dcm', src/'DOE_JOHN/rt_DOE.dcm']
             for k in ('SOPInstanceUID', 'SeriesInstanceUID', 'StudyInstanceUID', 'FrameOfReferenceUID')} | {'DOE', 'Doe^John', 'MRN777'}
    for kind in ('pp_p', 'nii_p'):
        shared = _dump(tmp_path/kind/'dicom_prep.db')
        assert [m for m in marks if m.encode() in shared] == [] and b'create table "annotations"' not in shared.lower()
        assert query(tmp_path/kind, "select count(*) from mask_matches where verdict = 'matched'") == [(2,)]
        with closing(sqlite3.connect(tmp_path/f'{kind}.private.db')) as c: assert c.execute('select count(*) from annotations').fetchone() == (2,)
        assert sorted(query(tmp_path/kind, 'select label from segments')) == [('Liver',), ('segment 1',)]


@needs_real
def test_masks_deleted_from_disk_are_remade(tmp_path):
    "A label volume deleted by hand is remade by the next run (as a deleted volume is); mask PNGs deleted by hand, by --verify (as image PNGs are)."
    src = _annotated_tree(tmp_path/'src')
    dicom_to_nifti(src, tmp_path/'nii', n_workers=0, quiet=True)
    segs = [tmp_path/'nii'/p for (p,) in query(tmp_path/'nii', 'select seg_path from volumes where seg_path is not null')]
    before = [np.asarray(nib.load(f).dataobj) for f in segs]
    for f in segs: f.unlink()
    dicom_to_nifti(src, tmp_path/'nii', n_workers=0, quiet=True)
    for f, b in zip(segs, before, strict=True): np.testing.assert_array_equal(np.asarray(nib.load(f).dataobj), b)
    preprocess(src, tmp_path/'pp', n_workers=0, quiet=True)
    clean = _masks(tmp_path/'pp')
    shutil.rmtree(tmp_path/'pp'/'masks')
    preprocess(src, tmp_path/'pp', n_workers=0, quiet=True, verify=True)
    assert _masks(tmp_path/'pp') == clean and clean


def _doe_tree(src) -> tuple[list, Path, Path]:
    "A patient's series with a SEG and an RTSTRUCT, all named after him: (images, seg, rtstruct)."
    from pydicom.uid import generate_uid
    from dicom_prep import synth_labels as sl
    images = synth_series(src/'DOE_JOHN/ct', 6, 32, 32, FrameOfReferenceUID=generate_uid(), PatientName='Doe^John', PatientID='MRN777')
    ball = np.zeros((6, 32, 32), bool); ball[1:5, 8:20, 10:24] = True
    seg = sl.synth_seg(images, src/'DOE_JOHN/seg_DOE.dcm', [sl.SegmentSpec('Liver', ball)])
    return images, seg, sl.synth_rtstruct(images, src/'DOE_JOHN/rt_DOE.dcm', [sl.RoiSpec('Lesion', [(k, sl.disc(16, 16, 5)) for k in (2, 3)])])

def _odd_frame(rt, dest, uid:str, refs:bool=True):
    "A copy of RTSTRUCT `rt` in frame of reference `uid` (any text), with or without its image references."
    from pydicom.uid import generate_uid
    ds = pydicom.dcmread(rt); ds.SOPInstanceUID, ds.FrameOfReferenceUID = generate_uid(), uid
    for it in ds.ReferencedFrameOfReferenceSequence:
        it.FrameOfReferenceUID = uid
        if not refs: it.RTReferencedStudySequence = []
    for it in ds.StructureSetROISequence: it.ReferencedFrameOfReferenceUID = uid
    for cc in (cc for c in ds.ROIContourSequence for cc in c.ContourSequence if not refs and 'ContourImageSequence' in cc): del cc.ContourImageSequence
    ds.save_as(dest)

@pytest.mark.filterwarnings('ignore:Invalid value for VR UI')
def test_pseudonymised_reasons_quote_no_uid_of_an_unusual_form(tmp_path):
    "A frame of reference UID that is not dotted digits ('DOE.JOHN.1', '1.2.3') is named in no reason of a pseudonymised index."
    src = tmp_path/'src'
    _, _, rt = _doe_tree(src)
    _odd_frame(rt, src/'DOE_JOHN/rt_odd.dcm', 'DOE.JOHN.1')             # matched by SOP UID, in another frame of reference
    _odd_frame(rt, src/'DOE_JOHN/rt_lost.dcm', '1.2.3', refs=False)     # matches nothing: its frame of reference is named
    for kind, run in (('pp', preprocess), ('nii', dicom_to_nifti)):
        run(src, tmp_path/kind, n_workers=0, quiet=True, pseudonymize=True)
        verdicts = {v for (v,) in query(tmp_path/kind, 'select verdict from mask_matches')}
        assert {'other frame of reference', 'reference not found'} <= verdicts
        shared = _dump(tmp_path/kind/'dicom_prep.db')
        assert [m for m in ('DOE.JOHN.1', '1.2.3', 'DOE') if m.encode() in shared] == []

@pytest.mark.parametrize('gone', ['annotation', 'image'])
def test_pseudonymised_reasons_quote_no_path_of_a_file_gone_while_painting(tmp_path, monkeypatch, gone):
    "A source file gone between reading the annotations and painting: the error is recorded, its path keyed, in mask_matches or mask_targets."
    from dicom_prep import maskstage
    src = tmp_path/'src'
    images, seg, _ = _doe_tree(src)
    victim = Path(seg if gone == 'annotation' else images[2])
    def refresh(*a, **k):
        n = read(*a, **k); victim.rename(tmp_path/'away'); return n
    read = maskstage.refresh_annotations
    monkeypatch.setattr(maskstage, 'refresh_annotations', refresh)
    for kind, run in (('pp', preprocess), ('nii', dicom_to_nifti)):
        run(src, tmp_path/kind, n_workers=0, quiet=True, pseudonymize=True)
        (tmp_path/'away').rename(victim)
        why = query(tmp_path/kind, "select reason from mask_matches where verdict = 'unreadable' union all "
                                   "select reason from mask_targets where status = 'error'")
        assert len(why) == 1 and 'FileNotFoundError' in why[0][0]
        shared = _dump(tmp_path/kind/'dicom_prep.db')
        assert [m for m in (str(src), 'DOE') if m.encode() in shared] == []

def test_pseudonymised_reasons_quote_no_contour_type_of_the_file(tmp_path):
    "An RTSTRUCT whose ContourGeometricType is free text ('DOEJOHN'): its 'open contour' reason names no text of the file."
    src = tmp_path/'src'
    _, _, rt = _doe_tree(src)
    ds = pydicom.dcmread(rt)
    for cc in (cc for c in ds.ROIContourSequence for cc in c.ContourSequence): cc.ContourGeometricType = 'DOEJOHN'
    ds.save_as(rt)
    preprocess(src, tmp_path/'pp', n_workers=0, quiet=True, pseudonymize=True)
    assert query(tmp_path/'pp', "select count(*) from mask_matches where verdict = 'open contour'") == [(1,)]
    assert b'DOE' not in _dump(tmp_path/'pp'/'dicom_prep.db')

def test_pseudonymised_reasons_quote_no_value_a_library_error_read(tmp_path):
    "A SEG whose PhotometricInterpretation is free text ('DOEJOHN'): pydicom's error quotes it; a pseudonymised index keeps the error, not the value."
    src = tmp_path/'src'
    _, seg, _ = _doe_tree(src)
    ds = pydicom.dcmread(seg); ds.PhotometricInterpretation = 'DOEJOHN'; ds.save_as(seg)
    preprocess(src, tmp_path/'pp', n_workers=0, quiet=True, pseudonymize=True)
    why = query(tmp_path/'pp', "select reason from mask_matches where verdict = 'unreadable'")
    assert len(why) == 1 and 'Photometric Interpretation' in why[0][0]
    assert b'DOE' not in _dump(tmp_path/'pp'/'dicom_prep.db')


def test_a_seg_whose_pixel_data_is_cut_short_is_refused_not_padded(tmp_path):
    "A SEG whose pixel data holds half its frames: one 'unreadable' row saying how short it is, and no mask (a reader would pad the rest)."
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_series
    from dicom_prep import synth_labels as sl
    images = synth_series(tmp_path/'src/p/ct', 4, 32, 32, FrameOfReferenceUID=generate_uid())
    seg = sl.synth_seg(images, tmp_path/'src/p/seg.dcm', [sl.SegmentSpec('Liver', np.ones((4, 32, 32), bool))])
    ds = pydicom.dcmread(seg); ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]; ds.save_as(seg)
    preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    assert query(tmp_path/'out', 'select verdict, reason from mask_matches') == [('unreadable', 'its pixel data holds 256 bytes of the 512 its 4 frames need')]
    assert query(tmp_path/'out', 'select count(*) from images where mask_path is not null') == [(0,)]
