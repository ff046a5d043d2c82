"End-to-end: a synthesised corpus plus pydicom's own test files through the real `dicom_prep_preprocess`."
import os, re, shutil, sqlite3, subprocess, warnings
from pathlib import Path
import numpy as np, pydicom, pytest
from PIL import Image
from pydicom.uid import RLELossless
from dicom_prep.sources import sample_data_dirs, find_dicoms
from conftest import ro, source_file
from dicom_prep.read import NON_IMAGE_KINDS, object_kind
from dicom_prep.db import FINAL_OK
from dicom_prep.synth import synth_dicom

IMAGE_SIZE = 64

def _rgb(path, frames=2, rows=40, cols=30):
    "A multi-frame RGB file."
    ds = pydicom.dcmread(synth_dicom(path, rows=rows, cols=cols))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, 'RGB', 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 8, 8, 7, frames
    ds.PixelData = np.random.default_rng(1).integers(0, 255, (frames, rows, cols, 3), dtype='uint8').tobytes()
    ds.save_as(path, enforce_file_format=True)

def _rle(path):
    "An RLE Lossless compressed multi-frame file."
    ds = pydicom.dcmread(synth_dicom(path, frames=3, rows=50, cols=70))
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    "Nested studies, extension-less files, multi-frame mono/RGB, RLE, MONOCHROME1, junk, empty and pydicom's test files."
    root = tmp_path_factory.mktemp('corpus')/'export'
    synth_dicom(root/'study_001/series_1/IM000001', rows=300, cols=200, patient='P1')
    synth_dicom(root/'study_001/series_1/IM000002', rows=300, cols=200, patient='P1')
    synth_dicom(root/'study_001/cine.dcm', frames=5, patient='P1')
    synth_dicom(root/'study_002/mono1.dcm', photometric='MONOCHROME1', patient='P2')
    synth_dicom(root/'study_002/mono2_twin.dcm', photometric='MONOCHROME2', patient='P2')
    synth_dicom(root/'study_002/small.dcm', rows=20, cols=10, patient='P2')
    _rgb(root/'study_003/rgb_multi.dcm'); _rle(root/'study_003/rle.dcm')
    (root/'study_004').mkdir(parents=True)
    (root/'study_004/junk.dcm').write_bytes(np.random.default_rng(7).bytes(2000))
    (root/'study_004/empty.dcm').write_bytes(b'')
    (root/'study_004/notes.txt').write_text('not a DICOM')
    synth_dicom(root/'top_level.dcm', patient='P3')
    shutil.copytree(sample_data_dirs()[0], root/'pydicom')
    return root

def _decodable_frames(path) -> int | None:
    "Frames pydicom itself decodes from `path` (None if it cannot decode them all)."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            ds = pydicom.dcmread(path, force=True)
            return sum(1 for _ in pydicom.pixels.iter_pixels(ds)) if 'PixelData' in ds else 0
        except Exception: return None

def _kind(path) -> str:
    "What pydicom's own reading of `path`'s SOP class (or Modality) says it holds, through `object_kind`."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return object_kind(pydicom.dcmread(path, stop_before_pixels=True, force=True))

def _run(*args):
    "Run the console script; return the completed process."
    return subprocess.run(['dicom_prep_preprocess', *map(str, args)], capture_output=True, text=True, timeout=600)

@pytest.fixture(scope='module')
def first_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    r = _run('--dicom-dir', corpus, '--output-dir', out, '--workers', 2, '--image-size', IMAGE_SIZE)
    assert r.returncode == 0, r.stderr
    return out, r

_db = ro

def test_every_decodable_frame_has_one_image_and_row(corpus, first_run):
    out, _ = first_run
    conn = _db(out)
    per_src = {}
    for r in conn.execute('select source_path, count(*) n from images group by source_path'): per_src[r['source_path']] = r['n']
    checked = not_images = 0
    for path, _ in find_dicoms(corpus):
        n = _decodable_frames(path)
        rel = os.path.relpath(path, corpus)      # source paths are stored relative to the root
        if n and _kind(path) != 'image':         # a SEG's frames, a dose grid: no training image (issue 23)
            assert rel not in per_src, f"{path}: a {_kind(path)} became {per_src[rel]} images"; not_images += 1
        elif n: assert per_src.get(rel) == n, f"{path}: pydicom decodes {n} frames, we wrote {per_src.get(rel)}"; checked += 1
    assert checked > 50 and not_images >= 5
    dup = conn.execute('select count(*) from (select thumbnail_path from images group by thumbnail_path having count(*) > 1)').fetchone()[0]
    assert dup == 0

def test_names_follow_the_rule(first_run):
    out, _ = first_run
    names = {r['filename']: r for r in _db(out).execute('select * from images')}
    assert 'study_001/series_1/IM000001' in names and 'study_002/mono1' in names and '~root/top_level' in names
    assert [f'study_001/cine_frame{i:04d}' for i in range(5)] == sorted(n for n in names if n.startswith('study_001/cine'))
    for n, r in names.items():
        assert r['thumbnail_path'] == f'images/{n}.png'
        m = re.search(r'_frame(\d{4})$', n)
        assert (m is not None) == (r['num_frames'] > 1) and (not m or int(m[1]) == r['frame_number'])

def test_every_png_opens_within_size(first_run):
    out, _ = first_run
    rows = list(_db(out).execute('select thumbnail_path, photometric from images'))
    assert rows
    for r in rows:
        with Image.open(out/r['thumbnail_path']) as im:
            im.load()
            assert max(im.size) <= IMAGE_SIZE and im.mode in ('L', 'RGB')
    pngs = {p.relative_to(out).as_posix() for p in (out/'images').rglob('*.png')}
    assert pngs == {r['thumbnail_path'] for r in rows}          # nothing stray, nothing missing

def test_colour_and_monochrome1(first_run):
    out, _ = first_run
    with Image.open(out/'images/study_003/rgb_multi_frame0001.png') as im: assert im.mode == 'RGB'
    # MONOCHROME1: high stored values are dark, so the image is the inverse of its MONOCHROME2 twin
    a1 = np.asarray(Image.open(out/'images/study_002/mono1.png'), dtype=float)
    a2 = np.asarray(Image.open(out/'images/study_002/mono2_twin.png'), dtype=float)
    assert a1.std() > 10 and np.abs(a1 + a2 - 255).mean() < 2

def test_failures_are_rows_with_reasons(corpus, first_run):
    out, _ = first_run
    rows = list(_db(out).execute('select * from files'))
    assert sorted(r['path'] for r in rows) == sorted(os.path.relpath(p, corpus) for p, _ in find_dicoms(corpus))
    assert all(r['status'] for r in rows)
    files = {Path(r['path']).name: r for r in rows}
    for name in ('junk.dcm', 'empty.dcm'):
        assert files[name]['status'] == 'unreadable' and files[name]['error'], files[name]
    assert files['MR_truncated.dcm']['status'] == 'decode_error' and 'less than expected' in files['MR_truncated.dcm']['error']
    assert (files['rtplan.dcm']['status'], files['rtplan.dcm']['kind']) == ('not_image', 'rtplan')    # was no_pixels before issue 23
    assert 'notes.txt' not in files

def test_splits_are_by_patient(first_run):
    out, _ = first_run
    rows = list(_db(out).execute('select patient_id, count(distinct split) k from images where patient_id is not null group by patient_id'))
    assert rows and all(r['k'] == 1 for r in rows)

def test_second_run_adds_nothing_and_reencodes_nothing(corpus, first_run):
    out, _ = first_run
    conn = _db(out)
    before = conn.execute('select count(*) from images').fetchone()[0]
    mtimes = {p: p.stat().st_mtime_ns for p in (out/'images').rglob('*.png')}
    r = _run('--dicom-dir', corpus, '--output-dir', out, '--workers', 2, '--image-size', IMAGE_SIZE)
    assert r.returncode == 0, r.stderr
    assert _db(out).execute('select count(*) from images').fetchone()[0] == before
    assert {p: p.stat().st_mtime_ns for p in (out/'images').rglob('*.png')} == mtimes
    assert 'Resuming:' in r.stdout and 'Processing:' not in r.stdout and 'Traceback' not in r.stderr   # an empty phase is hidden (issue 29)

def test_summary_block(first_run):
    _, r = first_run
    s = r.stdout
    assert 'SUMMARY' in s and re.search(r'Discover: [\d,]+ items in', s) and re.search(r'Processing: [\d,]+ items in', s)
    assert re.search(r'Total in database: [\d,]+ images', s) and 'Images: ' in s

def test_bad_arguments_exit_nonzero_with_one_line(tmp_path):
    r = _run('--dicom-dir', tmp_path/'missing', '--output-dir', tmp_path/'o')
    assert r.returncode == 2 and 'DICOM folder not found' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path/'file').write_text('x')
    r = _run('--dicom-dir', tmp_path, '--output-dir', tmp_path/'file'/'sub')
    assert r.returncode == 2 and 'not writable' in r.stderr
    r = _run('--dicom-dir', tmp_path, '--output-dir', tmp_path/'o2', '--splits', 'eighty/twenty')
    assert r.returncode == 2 and 'cannot parse splits' in r.stderr
    r = _run('--dicom-dir', tmp_path, '--output-dir', tmp_path/'o3', '--window', 'brian')
    assert r.returncode == 2 and 'brian' in r.stderr

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "`dicom_prep_preprocess --test` run in a fresh folder: (its output folder, the completed process)."
    cwd = tmp_path_factory.mktemp('demo')
    r = subprocess.run(['dicom_prep_preprocess', '--test', '--workers', '2'], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return cwd/'dicom_prep_sample', r

def test_demo_runs_on_bundled_data(demo):
    out, r = demo
    n = sqlite3.connect(out/'dicom_prep.db').execute("select count(*) from images").fetchone()[0]
    assert n > 100 and 'Traceback' not in r.stderr

def test_demo_makes_no_image_of_a_non_image_object(demo):
    "Every SEG, RTSTRUCT, RTDOSE, RTPLAN, SR... of the sample data is in `files` with its kind and status not_image, and has no image row or PNG (issue 23)."
    out, r = demo
    conn = ro(out)
    files = {row['path']: row for row in conn.execute('select path, status, kind from files')}
    images = {row[0] for row in conn.execute('select distinct source_path from images')}
    expected = {p: k for p in files if files[p]['status'] in FINAL_OK and (k := _kind(source_file(out, p))) != 'image'}
    assert {Path(p).name for p in expected} >= {'liver.dcm', 'liver_1frame.dcm', 'rtstruct.dcm', 'rtdose.dcm', 'rtplan.dcm', 'test-SR.dcm'}
    assert {p: (files[p]['status'], files[p]['kind']) for p in expected} == {p: ('not_image', k) for p, k in expected.items()}
    assert not images & set(expected) and {row['kind'] for row in files.values() if row['status'] == 'not_image'} <= NON_IMAGE_KINDS
    assert all(row['kind'] == 'image' for p, row in files.items() if p in images)
    pngs = {p.relative_to(out).as_posix() for p in (out/'images').rglob('*.png')}
    assert pngs == {t for (t,) in conn.execute('select thumbnail_path from images')}       # no PNG without its (image) row
    assert re.search(rf"{len(expected)} non-image objects indexed, not images: .*\bseg\b", r.stdout), r.stdout[-2000:]

def test_sheet_without_its_entry_point_stops_before_the_run(tmp_path, monkeypatch, capsys):
    "An install whose metadata lacks the `sheet` follow-up (an editable install from before it existed) says so in one line, exit 2, before any work."
    import importlib.metadata
    from dicom_prep.preprocess import main
    monkeypatch.setattr(importlib.metadata, 'entry_points', lambda **kw: [])
    src = tmp_path/'in'; synth_dicom(src/'a.dcm')
    with pytest.raises(SystemExit) as e: main(['--dicom-dir', str(src), '--output-dir', str(tmp_path/'o'), '--workers', '0', '--sheet'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'no follow-up' in err[0], err
    assert not (tmp_path/'o'/'dicom_prep.db').exists()

def test_db_path_is_still_the_third_positional_argument(tmp_path):
    "`preprocess(src, out, db)` and `dicom_to_nifti(src, out, db)`, as before the options object, write the index at `db`."
    from dicom_prep.preprocess import preprocess
    from dicom_prep.nifti import dicom_to_nifti
    src = tmp_path/'in'; synth_dicom(src/'a.dcm')
    r = preprocess(src, tmp_path/'o', tmp_path/'index.db', n_workers=0, quiet=True)
    assert Path(r.db_path) == tmp_path/'index.db' and sqlite3.connect(tmp_path/'index.db').execute('select count(*) from images').fetchone()[0] == 1
    r = dicom_to_nifti(src, tmp_path/'o', tmp_path/'index.db', n_workers=0, quiet=True)
    assert Path(r.db_path) == tmp_path/'index.db' and not (tmp_path/'o'/'dicom_prep.db').exists()


def test_signatures_offer_only_what_a_caller_sets():
    "The run sets the pseudonym key and the de-identification rules: `preprocess`'s signature, which lists every option, leaves them out."
    import inspect
    from dicom_prep.preprocess import preprocess
    params = inspect.signature(preprocess).parameters
    assert {'window', 'n_workers', 'splits', 'pseudonymize'} <= set(params) and not {'key', 'deidentify', 'voi', 'fractions'} & set(params)


def _pngs(out) -> set:
    "The PNGs under a run's images folder, relative to it."
    return {p.relative_to(out).as_posix() for p in (out/'images').rglob('*.png')}

def test_an_index_made_before_object_kinds_is_set_right_by_a_rerun(tmp_path, monkeypatch):
    """An index the previous version made (a SEG's frames and a dose grid windowed into images, `files.kind` empty) loses those
    images, rows and PNGs, at the next run, which then equals a clean run; the run after it has nothing to do."""
    import dicom_prep.preprocess as pp
    from dicom_prep.sources import sample_file
    src = tmp_path/'src'; (src/'s').mkdir(parents=True)
    for name in ('liver_1frame.dcm', 'rtdose.dcm', 'CT_small.dcm', 'rtstruct.dcm'): shutil.copy(sample_file(name), src/'s'/name)
    synth_dicom(src/'s/cine.dcm', frames=3)
    with monkeypatch.context() as m:     # the previous version: every object with pixels was an image, and no kind was recorded
        m.setattr(pp, 'object_kind', lambda ds: 'image')
        pp.preprocess(src, tmp_path/'old', n_workers=0, quiet=True)
    with sqlite3.connect(tmp_path/'old/dicom_prep.db') as c: c.execute('update files set kind = null'); c.execute('update images set frame_of_reference = null')
    old = {r[0] for r in ro(tmp_path/'old').execute('select source_path from images')}
    assert {'s/liver_1frame.dcm', 's/rtdose.dcm'} <= old and any('liver_1frame' in p for p in _pngs(tmp_path/'old'))
    r = pp.preprocess(src, tmp_path/'old', n_workers=0, quiet=True)
    clean = pp.preprocess(src, tmp_path/'clean', n_workers=0, quiet=True)
    assert r.counts == clean.counts == dict(ok=2, not_image=3), (r.counts, clean.counts)
    assert 'files indexed by an older version were read again' in r.summary()
    rows = lambda out: sorted(tuple(x) for x in ro(out).execute('select filename, source_path, frame_of_reference from images'))
    files = lambda out: sorted(tuple(x) for x in ro(out).execute('select path, status, kind from files'))
    assert rows(tmp_path/'old') == rows(tmp_path/'clean') and files(tmp_path/'old') == files(tmp_path/'clean')
    assert _pngs(tmp_path/'old') == _pngs(tmp_path/'clean') and not any('liver' in p or 'rtdose' in p for p in _pngs(tmp_path/'old'))
    assert {p: k for p, _, k in files(tmp_path/'old')}['s/liver_1frame.dcm'] == 'seg'
    ct = ro(tmp_path/'old').execute("select frame_of_reference from images where source_path = 's/CT_small.dcm'").fetchone()[0]
    assert ct == pydicom.dcmread(src/'s/CT_small.dcm').FrameOfReferenceUID
    again = pp.preprocess(src, tmp_path/'old', n_workers=0, quiet=True)
    assert again.counts == dict(unchanged=5) and 'older version' not in again.summary()
