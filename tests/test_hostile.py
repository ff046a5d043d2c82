"""Issue 5 — one bad file never costs the batch: worker crash and hang isolation, resource guards, hostile-input
fuzzing of the real CLI, safe and injective names, PHI hygiene and symlink policy.

Faults are injected *inside the worker processes*: the pool forks, so a `monkeypatch` of the `frame_image` name that
`process_dicom` resolves at call time is inherited by every child, which then really segfaults, exits, is SIGKILLed
or hangs mid-file. Run with `pytest -s tests/test_hostile.py` to see the fuzz figures (files tried, statuses by kind,
worker crashes survived, wall time)."""
import faulthandler, json, multiprocessing, os, random, re, shutil, signal, sqlite3, struct, subprocess, sys, threading, time
from contextlib import closing
import unicodedata
from collections import Counter
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings, strategies as st
import numpy as np
from PIL import Image
from dicom_prep.sources import sample_file
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)

import dicom_prep.parallel, dicom_prep.pixels, dicom_prep.preprocess
from conftest import console_script, ro
from dicom_prep.core import MAX_COMPONENT, atomic_path, safe_component
from dicom_prep.sources import find_dicoms
from dicom_prep.pixels import frame_image
from dicom_prep.parallel import TaskFailure, run_tasks
from dicom_prep.options import ImageOptions
from dicom_prep.preprocess import preprocess, process_dicom, source_id
from dicom_prep.synth import synth_dicom

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')   # pydicom warns about the broken files on purpose

STATUSES = {'ok', 'no_pixels', 'not_image', 'unreadable', 'decode_error', 'too_large', 'crashed', 'timeout', 'error'}
PNG_CHUNKS_ALLOWED = {b'IHDR', b'PLTE', b'IDAT', b'IEND'}   # no tEXt/iTXt/zTXt/eXIf/iCCP/tIME: images carry no metadata


# ---------------------------------------------------------------------------------------------------------------- helpers
_db = ro

def _rel(src, path) -> str:
    "How the index stores source file `path` of the tree at `src`: relative to the source root."
    return os.path.relpath(path, src)

def _files(out) -> dict:
    "`files` rows by source path (relative to the source root)."
    with _db(out) as c: return {r['path']: dict(r) for r in c.execute('select * from files')}

def _images(out) -> list[dict]:
    "`images` rows ordered by filename."
    with _db(out) as c: return [dict(r) for r in c.execute('select * from images order by filename')]

def _png_chunks(path) -> list[bytes]:
    "Chunk types of the PNG at `path`, in order."
    data, pos, types = Path(path).read_bytes(), 8, []
    assert data[:8] == b'\x89PNG\r\n\x1a\n', f"{path} is not a PNG"
    while pos < len(data):
        n, typ = struct.unpack('>I4s', data[pos:pos + 8])
        types.append(typ); pos += 12 + n
    return types

def _inside(p, root) -> bool: return Path(p).resolve().is_relative_to(Path(root).resolve())

def _snapshot(root, skip) -> dict:
    "path -> (size, mtime_ns) of every file under `root` except below `skip`."
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        if _inside(dirpath, skip): dirs[:] = []; continue
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p); snap[p] = (st.st_size, st.st_mtime_ns)
    return snap

def _cli() -> list[str]: return console_script('dicom_prep_preprocess')

def _marked(ds, *markers) -> str|None:
    "The fault marker in the name of the file `ds` was read from, if any."
    name = Path(str(getattr(ds, 'filename', '') or '')).name
    return next((m for m in markers if m in name), None)

@pytest.fixture
def forked_workers():
    "Faults are patched into the parent and must reach the children: the pool's start method has to be fork."
    if multiprocessing.get_start_method() != 'fork': pytest.skip("worker fault injection needs the fork start method")


# ------------------------------------------------------------------------------------------- 1. crash isolation
_real_frame_image, _real_save_png = dicom_prep.pixels.frame_image, dicom_prep.pixels.save_png

def _crashing_frame_image(ds, index=0, **kw):
    "A decoder that really kills its worker process for marked files (mid-file for the multi-frame one)."
    m = _marked(ds, 'SEGV', 'EXIT3', 'OOMKILL', 'MEMERR', 'MIDSEGV')
    if m == 'MIDSEGV' and index < 2: m = None            # frames 0 and 1 are written, then the worker dies
    if m in ('SEGV', 'MIDSEGV'): faulthandler.disable(); os.kill(os.getpid(), signal.SIGSEGV)
    if m == 'EXIT3': os._exit(3)
    if m == 'OOMKILL': os.kill(os.getpid(), signal.SIGKILL)   # what the kernel's OOM killer does
    if m == 'MEMERR': raise MemoryError('cannot allocate 40 GB')
    return _real_frame_image(ds, index, **kw)

def _crash_tree(src) -> dict:
    "Good files interleaved with faulty ones; returns expected frames per good file name."
    good = {}
    for i in range(18):
        name = f"good{i:02d}.dcm"; n = 3 if i % 6 == 0 else 1
        synth_dicom(src/f"st{i % 3}"/name, frames=n, seed=i, patient=f"P{i % 4}"); good[name] = n
    for i, m in enumerate(['SEGV', 'EXIT3', 'OOMKILL', 'MEMERR']): synth_dicom(src/f"st{i % 3}"/f"good{4*i+1:02d}_{m}.dcm", seed=100 + i)
    synth_dicom(src/'st0'/'good09_MIDSEGV.dcm', frames=4, seed=200)
    return good

def test_worker_crashes_cost_only_their_file(tmp_path, monkeypatch, forked_workers):
    "SIGSEGV (also mid-file), exit(3), SIGKILL and MemoryError in workers: only that file fails, with its cause."
    assert dicom_prep.preprocess.process_dicom.__globals__['frame_image'] is dicom_prep.preprocess.frame_image
    src, out = tmp_path/'src', tmp_path/'out'
    good = _crash_tree(src)
    monkeypatch.setattr(dicom_prep.preprocess, 'frame_image', _crashing_frame_image)
    t0 = time.perf_counter()
    r = preprocess(src, out, n_workers=2, file_timeout=60, quiet=True)
    wall = time.perf_counter() - t0
    files = {Path(p).name: v for p, v in _files(out).items()}
    assert r.status == 'completed'
    assert len(files) == len(find_dicoms(src)) == len(good) + 5
    expect = {'SEGV': ('crashed', 'SIGSEGV'), 'MIDSEGV': ('crashed', 'SIGSEGV'), 'EXIT3': ('crashed', 'exited with code 3'),
              'OOMKILL': ('crashed', 'SIGKILL'), 'MEMERR': ('too_large', 'MemoryError')}      # out of memory: too large for the worker
    for m, (status, why) in expect.items():
        rec = files[next(n for n in files if n.endswith(f"_{m}.dcm"))]
        assert rec['status'] == status and why in rec['error'], (m, rec)
    imgs = _images(out)
    for name, n in good.items():
        assert files[name]['status'] == 'ok' and files[name]['n_frames'] == n, files[name]
        rows = [i for i in imgs if Path(i['source_path']).name == name]
        assert len(rows) == n and all((out/i['thumbnail_path']).is_file() for i in rows)
    assert not [i for i in imgs if Path(i['source_path']).name not in good], "failed files have no image rows"
    crashes = sum(v['status'] == 'crashed' for v in files.values())
    print(f"\n[crash isolation] {len(files)} files, {crashes} worker crashes survived "
          f"(SIGSEGV x2, exit 3, SIGKILL), statuses {dict(Counter(v['status'] for v in files.values()))}, {wall:.1f}s")
    monkeypatch.undo()                                    # the faults were the workers', not the files': a retry heals them
    r2 = preprocess(src, out, n_workers=2, retry_failed=True, quiet=True)
    assert r2.status == 'completed' and {v['status'] for v in _files(out).values()} == {'ok'}
    assert len(_images(out)) == sum(good.values()) + 4 + 4


def _killed_mid_write(img, path, compress_level=6, **kw):
    "PNG writer whose worker is SIGKILLed (e.g. by the OOM killer) halfway through writing a marked file."
    if 'MIDWRITE' in Path(path).name:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b'\x89PNG\r\n\x1a\n half a PNG'); os.kill(os.getpid(), signal.SIGKILL)
    return _real_save_png(img, path, compress_level=compress_level, **kw)

def _faulty_run(tmp_path, monkeypatch, n, marked, name, fault):
    "A corpus of `n` good files plus one `marked` file, `name` in dicom_prep.preprocess replaced by `fault`; returns (src, out)."
    src, out = tmp_path/'src', tmp_path/'out'
    for i in range(n): synth_dicom(src/'s'/f"f{i}.dcm", seed=i)
    synth_dicom(src/'s'/marked, seed=99)
    monkeypatch.setattr(dicom_prep.preprocess, name, fault)
    return src, out

def test_worker_killed_mid_write_leaves_no_temp_files(tmp_path, monkeypatch, forked_workers):
    "A worker killed while writing a PNG leaves no half-written temp file (`.name.png.XXXX.png`) in the output."
    src, out = _faulty_run(tmp_path, monkeypatch, 6, 'f2_MIDWRITE.dcm', 'save_png', _killed_mid_write)
    r = preprocess(src, out, n_workers=2, quiet=True)
    files = {Path(p).name: v['status'] for p, v in _files(out).items()}
    assert r.status == 'completed' and files.pop('f2_MIDWRITE.dcm') == 'crashed' and set(files.values()) == {'ok'}
    left = [p.relative_to(out).as_posix() for p in (out/'images').rglob('*') if p.is_file() and p.name.startswith('.')]
    assert not left, f"half-written temp files left in the output dir: {left}"

def test_decoder_panic_is_a_decode_error(tmp_path):
    "A decoder raising a BaseException (pylibjpeg-rle's Rust panic on a damaged RLE file) is a decode_error, not a dead run."
    good = Path(sample_file('MR_small_RLE.dcm')).read_bytes()
    bad = tmp_path/'src'/'s'/'rle_panic.dcm'; bad.parent.mkdir(parents=True)
    bad.write_bytes(good[:4200] + b'\x00' * 100 + good[4300:])       # 100 zeroed bytes inside the RLE segments
    synth_dicom(tmp_path/'src'/'s'/'fine.dcm')
    r = process_dicom(bad, 's', tmp_path/'direct')
    assert r.status == 'decode_error' and r.error, r
    p = subprocess.run(_cli() + ['--dicom-dir', str(tmp_path/'src'), '--output-dir', str(tmp_path/'out'), '--workers', '2'],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert {Path(k).name: v['status'] for k, v in _files(tmp_path/'out').items()} == {'rle_panic.dcm': 'decode_error', 'fine.dcm': 'ok'}

def _unpicklable_panic(ds, index=0, **kw):
    "Raise, for marked files, a BaseException whose class cannot be pickled back to the parent (like pyo3's PanicException)."
    class PanicException(BaseException): pass
    if _marked(ds, 'PANIC'): raise PanicException('index out of bounds')
    return _real_frame_image(ds, index, **kw)

def test_unpicklable_worker_exception_costs_only_its_file(tmp_path, monkeypatch, forked_workers):
    "Whatever a worker raises (even a BaseException that cannot be pickled), the run records it and goes on."
    src, out = _faulty_run(tmp_path, monkeypatch, 6, 'f3_PANIC.dcm', 'frame_image', _unpicklable_panic)
    r = preprocess(src, out, n_workers=2, quiet=True)
    files = {Path(p).name: v for p, v in _files(out).items()}
    assert r.status == 'completed' and len(files) == 7
    assert files['f3_PANIC.dcm']['status'] in ('decode_error', 'error') and 'PanicException' in files['f3_PANIC.dcm']['error']
    assert all(v['status'] == 'ok' for n, v in files.items() if n != 'f3_PANIC.dcm')

def _quick(x): return x

def test_fast_tasks_are_never_reported_as_timeouts():
    "Tasks taking microseconds never come back as `timeout` (the hang check must not see a task's pid before its start time)."
    res = Counter(r.status if isinstance(r, TaskFailure) else 'ok'
                  for _, r in run_tasks(_quick, range(20_000), workers=8, timeout=30))
    assert res == {'ok': 20_000}, res


# -------------------------------------------------------------------------------------------- 2. hang isolation
def _hanging_frame_image(ds, index=0, **kw):
    "A decoder that never returns for files marked HANG."
    if _marked(ds, 'HANG'): time.sleep(120)
    return _real_frame_image(ds, index, **kw)

def test_hung_worker_times_out(tmp_path, monkeypatch, forked_workers):
    "A file whose worker hangs is `timeout` after --file-timeout; its worker is replaced and the run completes."
    src, out = _faulty_run(tmp_path, monkeypatch, 8, 'f3_HANG.dcm', 'frame_image', _hanging_frame_image)
    t0 = time.perf_counter()
    r = preprocess(src, out, n_workers=2, file_timeout=2, quiet=True)
    wall = time.perf_counter() - t0
    files = {Path(p).name: v for p, v in _files(out).items()}
    assert r.status == 'completed' and len(files) == 9
    assert files['f3_HANG.dcm']['status'] == 'timeout' and '2s' in files['f3_HANG.dcm']['error']
    assert all(v['status'] == 'ok' for n, v in files.items() if n != 'f3_HANG.dcm')
    assert len(_images(out)) == 8
    assert wall < 30, f"the hung worker was not replaced promptly ({wall:.1f}s)"


# ------------------------------------------------------------------------------- 3. resource guards before decoding
def _with_header(path, **tags):
    "Rewrite the header of `path` with `tags` (pixel data untouched)."
    ds = pydicom.dcmread(path)
    for k, v in tags.items(): setattr(ds, k, v)
    ds.save_as(path)
    return path

def test_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    "Absurd Rows/Columns/NumberOfFrames/SamplesPerPixel → `too_large`, and the decoder is never called for them."
    calls = []
    def spy(ds, index=0, **kw): calls.append(Path(ds.filename).name); return _real_frame_image(ds, index, **kw)
    monkeypatch.setattr(dicom_prep.preprocess, 'frame_image', spy)
    d = tmp_path/'s'
    huge = {'rows_cols.dcm': dict(Rows=65535, Columns=65535), 'frames.dcm': dict(NumberOfFrames=10**9),
            'samples.dcm': dict(Rows=2048, Columns=2048, SamplesPerPixel=3, NumberOfFrames=2)}
    for name, tags in huge.items():
        r = process_dicom(_with_header(synth_dicom(d/name), **tags), 's', tmp_path/'out', ImageOptions(max_pixels=2**22))
        assert r.status == 'too_large' and 'max_pixels' in r.error and not r.frames, r
    assert calls == [] and not (tmp_path/'out').exists()
    lying = _with_header(synth_dicom(d/'lying.dcm'), Rows=1024, Columns=1024)    # under the limit, data far too short
    r = process_dicom(lying, 's', tmp_path/'out', ImageOptions(max_pixels=2**22))
    assert r.status == 'decode_error' and calls == ['lying.dcm']
    assert process_dicom(synth_dicom(d/'fine.dcm', rows=64, cols=64), 's', tmp_path/'out', ImageOptions(max_pixels=64*64)).status == 'ok'
    assert process_dicom(d/'fine.dcm', 's', tmp_path/'out2', ImageOptions(max_pixels=64*64 - 1)).status == 'too_large'

def _swap_vr(path, tag, vr):
    "Replace the VR bytes of `tag` in an explicit-VR little-endian file (same layout: short VR for short VR)."
    data = bytearray(Path(path).read_bytes())
    i = data.find(struct.pack('<HH', *tag), 132)
    assert i > 0 and bytes(data[i + 4:i + 6]) in VRS
    data[i + 4:i + 6] = vr
    Path(path).write_bytes(bytes(data))
    return path

@pytest.mark.parametrize('tag,vr', [((0x0028, 0x0010), b'ZZ'), ((0x0028, 0x0002), b'FL'), ((0x0010, 0x0020), b'FD')],
                         ids=['Rows-unknown-VR', 'SamplesPerPixel-as-FL', 'PatientID-as-FD'])
def test_process_dicom_never_raises_on_wrong_vrs(tmp_path, tag, vr):
    "Header elements with a wrong VR give a status (never an exception), and a failed file leaves no PNG behind."
    p = _swap_vr(synth_dicom(tmp_path/'src'/'s'/'f.dcm', frames=2), tag, vr)
    r = process_dicom(p, 's', tmp_path/'out')
    pngs = list((tmp_path/'out').rglob('*.png'))
    if r.status == 'ok': assert len(r.frames) == len(pngs) == 2
    else: assert r.status in ('unreadable', 'decode_error') and r.error and not pngs, (r, pngs)

def test_multi_valued_metadata_does_not_fail_the_run(tmp_path):
    "A multi-valued SliceThickness or --tags value is stored as JSON text: before, it failed the whole batch's commit."
    ds = pydicom.dcmread(sample_file('CT_small.dcm'))
    ds.SliceThickness, ds.WindowCenter = ['1.0', '2.5'], ['40', '400']
    (tmp_path/'src').mkdir(); ds.save_as(tmp_path/'src'/'two.dcm')
    p = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', tmp_path/'src', '--output-dir', tmp_path/'out',
                       '--tags', 'WindowCenter,ImageType', '--workers', '0'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with closing(sqlite3.connect(tmp_path/'out'/'dicom_prep.db')) as db:
        row = db.execute('select slice_thickness, WindowCenter, ImageType from images').fetchone()
    assert (json.loads(row[0]), json.loads(row[1]), json.loads(row[2])) == ([1, 2.5], [40, 400], ['ORIGINAL', 'PRIMARY', 'AXIAL'])

@pytest.mark.parametrize('compressed', [False, True], ids=['native', 'rle'])
def test_pillow_bomb_check_on_and_frames_decoded_one_by_one(tmp_path, monkeypatch, compressed):
    "Importing dicom_prep leaves Pillow's decompression-bomb guard on; multi-frame files are decoded frame by frame."
    assert Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS <= 2**28
    seen = []
    name = 'pixel_array' if compressed else '_native_frame'      # uncompressed frames are read from their bytes, the rest by pydicom
    real = getattr(dicom_prep.pixels, name)
    def spy(src, *a, **kw): seen.append(kw.get('index', a[0] if a else None)); return real(src, *a, **kw)
    monkeypatch.setattr(dicom_prep.pixels, name, spy)
    f = synth_dicom(tmp_path/'s'/'mf.dcm', frames=5)
    if compressed:
        ds = pydicom.dcmread(f); ds.compress(RLELossless); ds.save_as(f, enforce_file_format=True)
    r = process_dicom(f, 's', tmp_path/'out')
    assert r.status == 'ok' and len(r.frames) == 5 and seen == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ 3b. files cut short in their header
CUT_SEEDS = ['CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm', 'MR_small_bigendian.dcm', 'JPEG2000.dcm',   # images
             'SC_rgb_rle_2frame.dcm', 'rtplan.dcm', 'test-SR.dcm', 'rtstruct.dcm']                             # and objects without pixels

def _header_cuts(path) -> dict[int, str]:
    "Offsets inside the header of `path`, after its first element: what lies there (inside an element's header or value, between two)."
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    raws = sorted((e for e in ds._dict.values() if isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF), key=lambda e: e.value_tell)
    image = 'Image Storage' in ds.SOPClassUID.name
    cuts = {}
    for e in raws[2::max(len(raws) // 5, 1)]:
        cuts[e.value_tell - 3] = 'an element header'
        if e.length > 1: cuts[e.value_tell + e.length // 2] = 'a value'
        if image: cuts[e.value_tell + e.length] = 'between two elements'      # a pixel-less object cut there reads as whole
    if 'PixelData' in pydicom.dcmread(path, force=True): cuts[Path(path).read_bytes().rfind(b'\xe0\x7f\x10\x00' if ds.original_encoding[1] else b'\x7f\xe0\x00\x10') + 4] = 'the pixel data header'
    return cuts

def _cut_corpus(src) -> dict[Path, tuple[int, str]]:
    "Pydicom's sample files cut at several offsets inside their header (and pydicom's deflated one inside its deflate stream): path -> (offset, where)."
    made = {}
    for name in CUT_SEEDS:
        data = sample_file(name).read_bytes()
        for at, where in _header_cuts(sample_file(name)).items():
            (p := src/'cut'/f"{Path(name).stem}_{at}.dcm").parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data[:at]); made[p] = (at, where)
    dfl = sample_file('image_dfl.dcm').read_bytes()
    start = dfl.find(b'1.2.840.10008.1.2.1.99') + 24                          # the deflate stream follows the meta group
    for at in (start + 16, start + 64, start + 160):
        (p := src/'cut'/f"image_dfl_{at}.dcm").write_bytes(dfl[:at]); made[p] = (at, 'the deflate stream')
    return made

def test_a_file_cut_in_its_header_is_a_failure_and_retried(tmp_path):
    "Real files cut inside their header are `unreadable` with where they stop, not `no_pixels`; --retry-failed retries them; whole SR/RT objects are not_image (issue 23)."
    src, out = tmp_path/'src', tmp_path/'out'
    cuts = _cut_corpus(src)
    assert len(cuts) >= 60 and {w for _, w in cuts.values()} == {'an element header', 'a value', 'between two elements', 'the pixel data header', 'the deflate stream'}
    (src/'whole').mkdir()
    whole = [shutil.copy(sample_file(n), src/'whole'/n) for n in ('rtplan.dcm', 'test-SR.dcm', 'rtstruct.dcm', 'CT_small.dcm')]
    first = preprocess(src, out, n_workers=0, quiet=True)
    files = _files(out)
    got = {p: (files[_rel(src, p)]['status'], files[_rel(src, p)]['error']) for p in cuts}
    assert {status for status, _ in got.values()} == {'unreadable'}, Counter(status for status, _ in got.values())
    off = {p.name: (cuts[p], error) for p, (_, error) in got.items() if not (error.startswith('truncated') and f'byte {cuts[p][0]:,}' in error)}
    assert all(error.startswith('truncated: a sequence stops before its end') for _, error in off.values()), off   # inside a sequence
    assert {Path(p).name: f['status'] for p, f in files.items() if p.startswith('whole/')} == {
        'rtplan.dcm': 'not_image', 'test-SR.dcm': 'not_image', 'rtstruct.dcm': 'not_image', 'CT_small.dcm': 'ok'}
    again = preprocess(src, out, n_workers=0, quiet=True, retry_failed=True)          # failures are retried: the cut files are read again
    rows = _files(out)
    assert again.counts == {'unreadable': len(cuts), 'unchanged': len(whole)}
    assert {rows[_rel(src, p)]['run_id'] for p in cuts} == {again.run_id} and {rows[_rel(src, p)]['run_id'] for p in whole} == {first.run_id}
    one = next(p for p in cuts if p.name.startswith('CT_small_'))
    shutil.copy(sample_file('CT_small.dcm'), one)                                       # its copy completes: it is whole again
    assert preprocess(src, out, n_workers=0, quiet=True).counts == {'ok': 1, 'unchanged': len(whole)}
    print(f"\n[cut short] {len(cuts)} cuts of {len(CUT_SEEDS) + 1} sample files, all unreadable, e.g. {got[one][1]}"
          f"{f'; {len(off)} inside a sequence' if off else ''}")


# ---------------------------------------------------------------------------------------- 4. hostile-input fuzzing
FUZZ_N, FUZZ_SEED = 1100, 20240515
SAMPLE_SEEDS = ['CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm', 'MR_small_bigendian.dcm',   # native LE/BE
                'SC_rgb_jpeg_dcmtk.dcm', 'SC_rgb_small_odd_jpeg.dcm',                               # JPEG baseline
                'SC_rgb_jpeg_gdcm.dcm',                                                             # JPEG lossless
                'MR_small_jp2klossless.dcm', 'SC_rgb_gdcm_KY.dcm', '693_J2KI.dcm',                  # JPEG 2000
                'MR_small_jpeg_ls_lossless.dcm', 'JPEGLSNearLossless_08.dcm',                       # JPEG-LS
                'MR_small_RLE.dcm', 'SC_rgb_rle_2frame.dcm', 'rtdose_rle.dcm',                      # RLE (multi-frame)
                'image_dfl.dcm', 'rtplan.dcm']                                                      # deflated; no pixels
VRS = [b'AE', b'AS', b'AT', b'CS', b'DA', b'DS', b'DT', b'FL', b'FD', b'IS', b'LO', b'LT', b'OB', b'OD', b'OF', b'OL',
       b'OV', b'OW', b'PN', b'SH', b'SL', b'SQ', b'SS', b'ST', b'SV', b'TM', b'UC', b'UI', b'UL', b'UN', b'UR', b'US',
       b'UT', b'UV']
LONG_VRS = {b'OB', b'OD', b'OF', b'OL', b'OV', b'OW', b'SQ', b'UC', b'UN', b'UR', b'UT', b'SV', b'UV'}
KEY_TAGS = [(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0008), (0x0028, 0x0002), (0x0028, 0x0100), (0x0028, 0x0101),
            (0x0028, 0x0004), (0x0028, 0x0103), (0x7FE0, 0x0010), (0x0002, 0x0010), (0x0010, 0x0020), (0x0020, 0x000D),
            (0x0028, 0x1050), (0x0028, 0x1053), (0x0028, 0x0006)]

def _seeds(tmp) -> dict[str, bytes]:
    "Valid starting files: synthetic variants (incl. multi-frame) and pydicom's compressed test files."
    seeds = {}
    variants = dict(syn_mono=dict(), syn_multi=dict(frames=4, rows=16, cols=16), syn_mono1=dict(photometric='MONOCHROME1'),
                    syn_win=dict(WindowCenter=2000, WindowWidth=1000, RescaleSlope=2, RescaleIntercept=-1024))
    for i, (name, kw) in enumerate(variants.items()):
        uids = {k: f"1.2.826.0.1.3680043.10.1{i}.{j}" for j, k in enumerate(['SOPInstanceUID', 'StudyInstanceUID', 'SeriesInstanceUID'])}
        ds = pydicom.dcmread(synth_dicom(Path(tmp)/f"{name}.dcm", seed=i, **uids, **kw))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID     # no random UIDs: the corpus is reproducible
        buf = BytesIO(); ds.save_as(buf, enforce_file_format=True); seeds[name] = buf.getvalue()
    for name in SAMPLE_SEEDS:
        p = sample_file(name)
        assert p, f"{name} missing from pydicom's test_files"
        seeds[Path(name).stem] = Path(p).read_bytes()
    return seeds

def _elements(data: bytes) -> list[tuple[int, int, int, str]]:
    "(tag offset, length-field offset, length-field size, byte order) of the key tags found in `data`."
    found = []
    for g, e in KEY_TAGS:
        for order in '<>':
            i = data.find(struct.pack(f'{order}HH', g, e), 128 if g == 2 else 132)
            if i < 0: continue
            vr = data[i + 4:i + 6]
            found.append((i, i + 8, 4, order) if vr in LONG_VRS else (i, i + 6, 2, order) if vr in VRS else (i, i + 4, 4, order))
            break
    return found

def _bitflips(rng, data, lo, hi, n):
    "`data` with `n` random bits flipped in `[lo, hi)`."
    b = bytearray(data)
    for _ in range(n):
        if hi > lo: i = rng.randrange(lo, hi); b[i] ^= 1 << rng.randrange(8)
    return bytes(b)

def _pixel_offset(data) -> int:
    "Offset of the Pixel Data element (the end of the header), or the file length."
    i = max(data.rfind(b'\xe0\x7f\x10\x00'), data.rfind(b'\x7f\xe0\x00\x10'))
    return i if i > 132 else len(data)

def _via_pydicom(data, edit) -> bytes:
    "Apply `edit(ds)` to the parsed `data` and re-encode it as the original was."
    ds = pydicom.dcmread(BytesIO(data), force=True)
    edit(ds)
    buf = BytesIO(); ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()

def m_truncate(rng, data, seeds): return data[:rng.randrange(0, len(data))]
def m_flip_header(rng, data, seeds): return _bitflips(rng, data, 128, _pixel_offset(data), rng.randint(1, 8))
def m_flip_anywhere(rng, data, seeds): return _bitflips(rng, data, 0, len(data), rng.randint(1, 32))

def m_absurd_length(rng, data, seeds):
    "A length field of a key element set to something absurd (undefined, huge, odd, past EOF)."
    els = _elements(data)
    if not els: return m_flip_header(rng, data, seeds)
    _, at, size, order = rng.choice(els)
    vals = [0, 1, 0xFFFF, 0xFFFE, 0x7FFF, len(data) * 3 + 1] if size == 2 else \
           [0, 3, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000001, len(data) * 3 + 1]
    v = rng.choice(vals) & (0xFFFF if size == 2 else 0xFFFFFFFF)
    return data[:at] + struct.pack(f"{order}{'H' if size == 2 else 'I'}", v) + data[at + size:]

def m_wrong_vr(rng, data, seeds):
    "The VR bytes of an explicit-VR key element replaced by another VR (or junk)."
    els = [e for e in _elements(data) if data[e[0] + 4:e[0] + 6] in VRS]
    if not els:                                           # implicit VR: re-encode with a wrong VR instead
        tag = rng.choice([0x00280010, 0x00280011, 0x00280100, 0x00280008])
        vr, val = rng.choice([('LO', 'not a number'), ('DS', '12.5'), ('FD', 1e300), ('SQ', []), ('OB', b'\x01\x02\x03')])
        return _via_pydicom(data, lambda ds: ds.__setitem__(tag, DataElement(tag, vr, val)))
    i = rng.choice(els)[0]
    return data[:i + 4] + rng.choice(VRS + [b'\x00\x00', b'ZZ', b'\xff\xff']) + data[i + 6:]

HUGE = dict(Rows=[0, 1, 0x8000, 0xFFFF], Columns=[0, 1, 0x8000, 0xFFFF], NumberOfFrames=[0, -1, 2**31, 10**9, 7],
            SamplesPerPixel=[0, 3, 4, 255], BitsAllocated=[0, 1, 7, 13, 64], BitsStored=[0, 40], HighBit=[63],
            PixelRepresentation=[1, 7], PlanarConfiguration=[1, 2],
            PhotometricInterpretation=['PALETTE COLOR', 'YBR_FULL_422', 'RGB', 'HSV', ''],
            RescaleSlope=[0, -1e300, 1e300], WindowWidth=[0, -5], WindowCenter=[1e308])

def m_huge_header(rng, data, seeds):
    "Absurd image-geometry tags: huge Rows/Columns/NumberOfFrames, odd samples, bits, photometric, LUT values."
    keys = rng.sample(sorted(HUGE), rng.randint(1, 3))
    if rng.random() < .4: keys = ['Rows', 'Columns', 'NumberOfFrames']
    def edit(ds):
        for k in keys: setattr(ds, k, rng.choice(HUGE[k]))
    try: return _via_pydicom(data, edit)
    except Exception: return m_absurd_length(rng, data, seeds)

def m_drop_tag(rng, data, seeds):
    "A tag the decoder needs, removed."
    k = rng.choice(['Rows', 'Columns', 'BitsAllocated', 'PixelData', 'PhotometricInterpretation', 'SamplesPerPixel'])
    try: return _via_pydicom(data, lambda ds: delattr(ds, k) if k in ds else None)
    except Exception: return m_truncate(rng, data, seeds)

COMPRESSED = [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEG2000Lossless, JPEG2000, JPEGLSLossless,
              JPEGLSNearLossless, RLELossless]

def m_garbage_pixels(rng, data, seeds):
    "Encapsulated frames replaced by garbage (random, truncated, bit-flipped, empty) under a compressed syntax."
    ds = pydicom.dcmread(BytesIO(data), force=True)
    if 'PixelData' not in ds: return m_flip_anywhere(rng, data, seeds)
    ts = ds.file_meta.get('TransferSyntaxUID')
    if ts is None or not ts.is_compressed:               # native data: claim a compressed syntax it is not in
        ts = ds.file_meta.TransferSyntaxUID = rng.choice(COMPRESSED)
        n = int(ds.get('NumberOfFrames') or 1)
        frames = [bytes(ds.PixelData)[:200]] * n
    else: frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get('NumberOfFrames') or 1)))
    how = rng.choice(['random', 'truncate', 'flip', 'empty', 'keep_head'])
    def spoil(f):
        if how == 'random': return rng.randbytes(rng.randint(1, 4000))
        if how == 'truncate': return f[:rng.randint(0, len(f))]
        if how == 'flip': return _bitflips(rng, f, 0, len(f), rng.randint(1, 64))
        if how == 'empty': return b''
        return f[:rng.randint(2, 40)] + rng.randbytes(rng.randint(0, 2000))
    out = Dataset({e.tag: e for e in ds})               # decoded elements, free to re-encode as explicit little endian
    out.file_meta, out.preamble = ds.file_meta, ds.preamble
    out.PixelData = _encapsulate([spoil(f) for f in frames] or [b''])
    out['PixelData'].VR, out['PixelData'].is_undefined_length = 'OB', True
    if rng.random() < .3: out.NumberOfFrames = rng.choice([len(frames) + 3, 1000])
    buf = BytesIO(); out.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buf.getvalue()

def _encapsulate(frames) -> bytes:
    "Encapsulated pixel data (empty offset table, one fragment per frame) that allows empty and odd fragments."
    item = lambda f: b'\xfe\xff\x00\xe0' + struct.pack('<I', len(f) + len(f) % 2) + f + b'\x00' * (len(f) % 2)
    return item(b'') + b''.join(item(f) for f in frames)

def m_wrong_syntax(rng, data, seeds):
    "The Transfer Syntax UID swapped for another one (compressed ↔ native ↔ big endian)."
    i = data.find(b'\x02\x00\x10\x00')
    if i < 0: return m_flip_header(rng, data, seeds)
    n = struct.unpack('<H', data[i + 6:i + 8])[0]
    uid = rng.choice(COMPRESSED + [ExplicitVRLittleEndian, '1.2.840.10008.1.2', '1.2.840.10008.1.2.2', '1.2.3.4.5'])
    v = str(uid).encode() + b'\x00' * (len(str(uid)) % 2)
    return data[:i + 6] + struct.pack('<H', len(v)) + v + data[i + 8 + n:]

def m_empty_dataset(rng, data, seeds):
    "Bytes that pydicom reads as an (almost) empty dataset, at most with a warning."
    return rng.choice([b'', b'hello, not a DICOM file\n', b'\x00' * 128 + b'DICM', b'\x00' * rng.randint(1, 600),
                       b'\xff' * rng.randint(10, 600), data[:rng.randint(128, 140)], b'\x00' * 128 + b'DICM' + rng.randbytes(40)])

def m_splice(rng, data, seeds):
    "The head of this file glued to the tail of another."
    other = seeds[rng.choice(sorted(seeds))]
    return data[:rng.randrange(len(data))] + other[rng.randrange(len(other)):]

def m_cut_or_repeat(rng, data, seeds):
    "A random span deleted, duplicated or zeroed."
    i = rng.randrange(len(data)); j = min(len(data), i + rng.randint(1, 512))
    return rng.choice([data[:i] + data[j:], data[:j] + data[i:], data[:i] + b'\x00' * (j - i) + data[j:]])

MUTATIONS = [m_truncate, m_flip_header, m_flip_anywhere, m_absurd_length, m_wrong_vr, m_huge_header, m_drop_tag,
             m_garbage_pixels, m_wrong_syntax, m_empty_dataset, m_splice, m_cut_or_repeat]

def fuzz_corpus(dest, n=FUZZ_N, seed=FUZZ_SEED) -> Counter:
    "Write `n` mutated DICOMs (reproducible from `seed`) under `dest`; return how many of each mutation."
    seeds, kinds = _seeds(Path(dest).parent/'seeds'), Counter()
    names = sorted(seeds)
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        mutate, base = MUTATIONS[i % len(MUTATIONS)], names[(i // len(MUTATIONS)) % len(names)]
        try: data = mutate(rng, seeds[base], seeds)
        except Exception: data = m_truncate(rng, seeds[base], seeds)   # an edit pydicom refused: truncate instead
        kinds[mutate.__name__[2:]] += 1
        study = ['s0', 's1', 'study 2', 'étude_3', 'S4', ''][i % 6]                        # '' : top-level files
        name = f"{mutate.__name__[2:]}--{base}--{i:04d}" + ('' if i % 25 == 7 else '.dcm')  # some rely on the DICM magic
        p = Path(dest)/study/name; p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (Path(dest)/'s0'/'README.txt').write_text('not a DICOM file\n')
    return kinds

def test_fuzz_corpus_is_reproducible(tmp_path):
    "The same seed gives byte-identical files; a different seed gives different ones."
    a, b, c = (tmp_path/x for x in 'abc')
    fuzz_corpus(a, n=60); fuzz_corpus(b, n=60); fuzz_corpus(c, n=60, seed=1)
    read = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}
    assert read(a) == read(b) and read(a) != read(c)

def test_fuzz_cli_survives_hostile_inputs(tmp_path):
    "≥1,000 mutated DICOMs through the real CLI: exit 0, one `files` row each, no traceback, nothing written outside."
    src, out, cwd, tmp = tmp_path/'src', tmp_path/'out', tmp_path/'cwd', tmp_path/'tmp'
    for d in (cwd, tmp): d.mkdir()
    kinds = fuzz_corpus(src)
    before = _snapshot(tmp_path, skip=out)
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONWARNINGS='ignore')
    t0 = time.perf_counter()
    p = subprocess.run(_cli() + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '2', '--file-timeout', '20',
                                 '--max-pixels', str(2**22), '--batch-size', '200', '--image-size', '64'],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=170)
    wall = time.perf_counter() - t0
    said = p.stdout + p.stderr
    assert p.returncode == 0, said[-3000:]
    assert 'Traceback' not in said, said[said.find('Traceback') - 500:][:4000]
    files, found = _files(out), find_dicoms(src)
    assert len(found) >= 1000
    assert sorted(files) == sorted(_rel(src, f) for f, _ in found), "exactly one files row per discovered file"
    statuses = Counter(r['status'] for r in files.values())
    assert set(statuses) <= STATUSES, statuses
    assert all(r['error'] for r in files.values() if r['status'] not in ('ok', 'no_pixels', 'not_image'))
    imgs = _images(out)
    assert imgs and statuses['ok'] > 50 and len({i['filename'] for i in imgs}) == len(imgs)
    for i in imgs:
        png = out/i['thumbnail_path']
        assert _inside(png, out/'images') and png.is_file(), i
        assert files[i['source_path']]['status'] in ('ok', 'decode_error')   # decode_error: frames before the bad one
        assert set(_png_chunks(png)) <= PNG_CHUNKS_ALLOWED, png
    assert _snapshot(tmp_path, skip=out) == before, "files were written (or changed) outside the output dir"
    on_disk = {p.relative_to(out).as_posix() for p in (out/'images').rglob('*') if p.is_file()}
    orphans = on_disk - {i['thumbnail_path'] for i in imgs}
    with _db(out) as c: run = dict(c.execute('select * from runs order by id desc limit 1').fetchone())
    assert run['status'] == 'completed' and run['n_files'] == len(found)
    # the closing-note figures
    by_kind = Counter((f.name.split('--')[0], files[_rel(src, f)]['status']) for f, _ in found)
    table = _status_table(by_kind)
    report = (f"\n[fuzz] files generated {sum(kinds.values()):,}, files tried (discovered) {len(found):,}, images {len(imgs):,}\n"
              f"[fuzz] statuses: {dict(statuses.most_common())}\n"
              f"[fuzz] worker crashes survived: {statuses['crashed']}, timeouts: {statuses['timeout']}, "
              f"partial decode_error files with images: {len({i['source_path'] for i in imgs if files[i['source_path']]['status'] != 'ok'})}, "
              f"files in images/ without a row: {len(orphans)} ({sum(Path(o).name.startswith('.') for o in orphans)} temp)\n"
              f"[fuzz] wall time (CLI, 2 workers): {wall:.1f}s\n{table}")
    print(report)
    (tmp_path/'fuzz_report.txt').write_text(report)

def _status_table(by_kind: Counter) -> str:
    "Mutation × status counts as a text table."
    kinds, stats = sorted({k for k, _ in by_kind}), sorted({s for _, s in by_kind})
    rows = [f"{'mutation':<16}" + ''.join(f"{s:>13}" for s in stats)]
    rows += [f"{k:<16}" + ''.join(f"{by_kind[(k, s)]:>13}" for s in stats) for k in kinds]
    return '\n'.join(rows)


# ------------------------------------------------------------------------------------------ 5. safe, unique names
EVIL = ['a_b/c.dcm', 'a/b_c.dcm', 'a b.dcm', 'a_b.dcm', 'é.dcm', 'e\u0301.dcm', '日本語 画像.dcm', 'x' * 200 + '.dcm',
        'CON.dcm', 'con', 'nul.txt.dcm', 'nl\nx.dcm', 'tab\tx.dcm', 'x.dcm', 'x', 'img_frame0003.dcm', 'img.dcm',
        '-rf.dcm', '..dcm', 'a..b.dcm', 'back\\slash.dcm', 'c:colon.dcm', ' lead.dcm', 'trail.dcm ', 'z~abc.dcm',
        '\x1b[31mred.dcm', 'LPT1/q.dcm', 'a b/q.dcm']
CLEAN = {'a_b/c.dcm': 'a_b/c', 'a/b_c.dcm': 'a/b_c', 'a_b.dcm': 'a_b', 'é.dcm': 'é', '日本語 画像.dcm': None, 'a..b.dcm': 'a..b'}

def _evil_tree(src) -> dict:
    "Evil and colliding names in one study folder (plus evil study folders); returns frames per source path."
    frames = {}
    for i, n in enumerate(EVIL): frames[synth_dicom(src/'study 1'/n, frames=5 if n == 'img.dcm' else 1, seed=i)] = 5 if n == 'img.dcm' else 1
    for i, s in enumerate(['study_1', 'CON', 'S' * 240, 'ünï cødé', 'tab\tstudy']):
        frames[synth_dicom(src/s/'a_b.dcm', seed=50 + i)] = 1
    frames[synth_dicom(src/'top.dcm')] = 1
    return frames

RESERVED = {'CON', 'PRN', 'AUX', 'NUL', *(f'COM{i}' for i in range(1, 10)), *(f'LPT{i}' for i in range(1, 10))}

def _check_component(c):
    "A single, portable path component: no separators, dots-only, control/space characters, leading dot/dash; capped."
    assert c and c not in ('.', '..') and len(c) <= MAX_COMPONENT, c
    assert not any(ch in c for ch in '/\\:\x00') and not any(unicodedata.category(ch)[0] in 'CZ' for ch in c), repr(c)
    assert not c.startswith(('.', '-')), c

def _is_device_name(c) -> bool:
    "Windows treats `CON`, `nul.txt`, `Aux.tar.gz`... as devices: the part before the first dot decides."
    return c.split('.')[0].upper() in RESERVED

def test_names_are_safe_unique_readable_and_stable(tmp_path):
    "Colliding and evil folder/file names map to distinct, sanitised PNG paths inside the output dir; reruns keep them."
    src, out = tmp_path/'src', tmp_path/'out'
    frames = _evil_tree(src)
    r = preprocess(src, out, n_workers=2, quiet=True)
    assert r.status == 'completed' and set(r.counts) == {'ok'}, r.counts
    imgs = _images(out)
    assert len(imgs) == sum(frames.values())
    assert len({i['filename'] for i in imgs}) == len(imgs), "two source frames share a name"
    assert len({(out/i['thumbnail_path']).resolve() for i in imgs}) == len(imgs)
    by_src = Counter(i['source_path'] for i in imgs)
    assert by_src == Counter({_rel(src, p): n for p, n in frames.items()})
    for i in imgs:
        png = out/i['thumbnail_path']
        assert png.is_file() and _inside(png, out/'images') and i['thumbnail_path'] == f"images/{i['filename']}.png"
        assert i['filename'].startswith(i['study_id'] + '/')
        for c in i['filename'].split('/'): _check_component(c)
    name_of = {i['source_path']: i['filename'] for i in imgs if i['num_frames'] == 1}
    s1 = next(i['study_id'] for i in imgs if Path(i['source_path']).parent.name == 'study 1')
    for evil, readable in CLEAN.items():                 # clean names are kept as they are (readable, no hash)
        if readable: assert name_of[f'study 1/{evil}'] == f"{s1}/{readable}"
    assert name_of['study_1/a_b.dcm'] == 'study_1/a_b' and s1 != 'study_1'
    assert name_of['top.dcm'] == '~root/top'                    # files directly under the root: the reserved study
    assert {i['filename'] for i in imgs if Path(i['source_path']).name == 'img.dcm'} == {f"{s1}/img_frame{k:04d}" for k in range(5)}
    assert len(name_of['study 1/' + 'x' * 200 + '.dcm'].split('/')[-1]) <= MAX_COMPONENT
    # a rerun is a no-op, and a forced rebuild gives exactly the same names
    assert preprocess(src, out, n_workers=2, quiet=True).counts == {'unchanged': len(frames)}
    r3 = preprocess(src, out, n_workers=2, force=True, quiet=True)
    key = lambda rows: [(i['filename'], i['source_path'], i['thumbnail_path'], i['frame_number']) for i in rows]
    assert r3.status == 'completed' and key(_images(out)) == key(imgs)
    assert sorted(p.relative_to(out).as_posix() for p in (out/'images').rglob('*.png')) == sorted(i['thumbnail_path'] for i in imgs)

def test_new_colliding_file_keeps_existing_names(tmp_path):
    "A later file whose name collides with an already indexed one gets a hashed name; the old name and PNG stay."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_dicom(src/'s'/'scan.dcm', seed=1)
    preprocess(src, out, n_workers=0, quiet=True)
    old = {i['filename']: i['source_path'] for i in _images(out)}
    assert old == {'s/scan': 's/scan.dcm'}                 # source paths are stored relative to the source root
    png = (out/'images'/'s'/'scan.png').read_bytes()
    synth_dicom(src/'s'/'scan', seed=2)                   # no extension, same stem
    preprocess(src, out, n_workers=0, quiet=True)
    now = {i['filename']: i['source_path'] for i in _images(out)}
    assert now['s/scan'] == 's/scan.dcm' and (out/'images'/'s'/'scan.png').read_bytes() == png
    assert len(now) == 2 and len({*now.values()}) == 2

def test_non_utf8_file_names_do_not_sink_the_run(tmp_path):
    "A file or folder name that is not valid UTF-8 (old Latin-1 archives) costs at most that file, never the run."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_dicom(src/'s1'/'ok.dcm')
    os.rename(synth_dicom(src/'s1'/'tmp.dcm', seed=1), os.fsencode(src/'s1') + b'/caf\xe9.dcm')
    os.makedirs(os.fsencode(src) + b'/\xff\xfestudy')
    os.rename(synth_dicom(src/'tmp.dcm', seed=2), os.fsencode(src) + b'/\xff\xfestudy/a.dcm')
    p = subprocess.run(_cli() + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '2'],
                       cwd=tmp_path, capture_output=True, text=True, errors='replace', timeout=60)
    assert p.returncode == 0 and 'Traceback' not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert _files(out)['s1/ok.dcm']['status'] == 'ok'

@settings(max_examples=300, deadline=None, database=None)
@given(st.text(min_size=0, max_size=300), st.text(min_size=0, max_size=300))
def test_safe_component_is_safe_and_injective(a, b):
    "Any text → a safe component; distinct inputs → distinct components (hash added whenever sanitising changed it)."
    sa, sb = safe_component(a), safe_component(b)
    _check_component(sa)
    assert safe_component(a) == sa                        # stable
    if a != b: assert sa != sb, (a, b, sa)
    assert '..' not in Path(sa).parts and not Path(sa).is_absolute()

@pytest.mark.parametrize('name', ['../../x', '/etc/passwd', '..', '.', '', 'C:\\Windows', 'a/../../b', 'COM1.txt',
                                  '\x00nul', 'x' * 5000, '\u202egnp.exe', ' ', '~', 'prn', 'Aux.dcm'])
def test_safe_component_on_evil_tag_values(name):
    "Tag values used as names (e.g. by other modules) cannot escape or smuggle separators."
    _check_component(safe_component(name))
    assert safe_component(name) != name                  # every one of these had to change, so it carries a hash

def test_safe_component_avoids_reserved_device_names():
    "Reserved device names are renamed, also when followed by an extension (`nul.txt` is the NUL device on Windows)."
    names = ['CON', 'prn', 'con.', 'Aux.dcm', 'nul.txt', 'COM1.tar.gz', 'lpt9.2019']
    assert not [(n, safe_component(n)) for n in names if _is_device_name(safe_component(n))]

def test_pipeline_names_avoid_reserved_device_names(tmp_path):
    "Study folders and file stems like `CON.2019` or `nul.txt.dcm` never become a device name on disk."
    src, out = tmp_path/'src', tmp_path/'out'
    for n in ['CON.2019/a.dcm', 's/nul.txt.dcm', 's/CON.dcm', 's/aux', 'LPT1/b.dcm']: synth_dicom(src/n)
    preprocess(src, out, n_workers=0, quiet=True)
    bad = [c for i in _images(out) for c in i['filename'].split('/') if _is_device_name(c)]
    assert not bad, bad


# -------------------------------------------------------------------------------------------------- 6. PHI hygiene
def _phi_tree(src):
    "Two patients over three studies named after them; one file with burned-in annotation."
    files = {}
    for i, (study, pat) in enumerate([('Smith_John_1961', 'PID-SMITH-001'), ('Smith_John_1961', 'PID-SMITH-001'),
                                      ('Doe_Jane_1975', 'PID-DOE-002'), ('Doe_Jane_1975_b', 'PID-DOE-002')]):
        extra = dict(BurnedInAnnotation='YES') if i == 2 else dict(BurnedInAnnotation='NO') if i == 3 else {}
        files[synth_dicom(src/study/f"im{i}.dcm", patient=pat, seed=i, frames=2 if i == 1 else 1,
                          PatientName='Smith^John' if 'Smith' in study else 'Doe^Jane', **extra)] = pat
    return files

def test_pngs_carry_no_metadata_and_burned_in_is_recorded(tmp_path):
    "PNGs have only IHDR/PLTE/IDAT/IEND chunks; BurnedInAnnotation is kept per image."
    src, out = tmp_path/'src', tmp_path/'out'
    _phi_tree(src)
    synth_dicom(src/'mono1'/'m1.dcm', photometric='MONOCHROME1', seed=9)
    assert preprocess(src, out, n_workers=0, quiet=True).status == 'completed'
    pngs = list((out/'images').rglob('*.png'))
    assert len(pngs) == 6                                 # 5 single-frame files + one with two frames
    for p in pngs: assert set(_png_chunks(p)) <= PNG_CHUNKS_ALLOWED and _png_chunks(p)[0] == b'IHDR', (p, _png_chunks(p))
    burned = {Path(i['source_path']).name: i['burned_in'] for i in _images(out)}
    assert burned['im2.dcm'] == 'YES' and burned['im3.dcm'] == 'NO' and burned['im0.dcm'] is None

def _private_key(path) -> str:
    "The pseudonym key kept in a private state file."
    with closing(sqlite3.connect(path)) as c: return c.execute("select value from meta where key='key'").fetchone()[0]

def _run_pseudo(src, out, salt=None):
    "Run the CLI with --pseudonymize (and `salt`) into `out`; its image rows."
    args = ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '2', '--pseudonymize'] + (['--salt', salt] if salt else [])
    p = subprocess.run(_cli() + args, capture_output=True, text=True, timeout=60, cwd=out.parent)
    assert p.returncode == 0 and 'Traceback' not in p.stdout + p.stderr, p.stdout + p.stderr
    return _images(out)

def test_pseudonymize_hashes_identifiers_stably_and_keeps_patient_splits(tmp_path):
    "--pseudonymize: no PatientID/UIDs/study folder names in the images table or names; stable per salt; splits per patient."
    src = tmp_path/'src'
    files = _phi_tree(src)
    raw = {str(p): pydicom.dcmread(p) for p in files}
    secrets = {v for ds in raw.values() for v in (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    folders = {p.parent.name for p in files}
    a = _run_pseudo(src, tmp_path/'a', salt='pepper')
    assert len(a) == 5
    for i in a:
        row = {k: v for k, v in i.items() if k != 'source_path'}          # the source path is how files are found again
        text = json.dumps(row, ensure_ascii=False)
        assert not any(s in text for s in secrets | folders | {'Smith', 'Doe'}), row
        assert i['patient_id'].startswith('pat_') and i['filename'].startswith('study_') and i['study_id'].startswith('study_')
        assert all(re.fullmatch(r'[0-9a-f]{16}', i[k]) for k in ('study_uid', 'series_uid', 'sop_uid'))
    on_disk = [p.relative_to(tmp_path/'a').as_posix() for p in (tmp_path/'a'/'images').rglob('*')]
    assert not [p for p in on_disk if 'Smith' in p or 'Doe' in p]
    key = 'pepper'                                                            # a user's salt is the key (never stored)
    pat = {Path(p).name: next(i['patient_id'] for i in a if i['source_path'] == source_id(_rel(src, p), key)) for p in files}
    assert pat['im0.dcm'] == pat['im1.dcm'] and pat['im2.dcm'] == pat['im3.dcm'] != pat['im0.dcm']
    assert len({i['sop_uid'] for i in a}) == 4                                # 4 files (one with two frames)
    splits = {}
    for i in a: splits.setdefault(i['patient_id'], set()).add(i['split'])
    assert all(len(s) == 1 for s in splits.values()), splits
    b = _run_pseudo(src, tmp_path/'b', salt='pepper')
    assert [(i['filename'], i['patient_id'], i['sop_uid'], i['split']) for i in a] == \
           [(i['filename'], i['patient_id'], i['sop_uid'], i['split']) for i in b]
    c = _run_pseudo(src, tmp_path/'c')                                        # a random key, kept in the private state
    assert not {i['patient_id'] for i in c} & {i['patient_id'] for i in a}
    with _db(tmp_path/'c') as conn: assert not conn.execute("select 1 from meta where key like '%salt%' or key like '%key%'").fetchall()
    assert len(_private_key(tmp_path/'c.private.db')) * 4 >= 128           # the key: at least 128 bits, never in the shared index
    shutil.rmtree(tmp_path/'c'/'images')                                    # rebuilt with the key kept in the private state
    p = subprocess.run(_cli() + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'c'), '--pseudonymize', '--verify'],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted((i['filename'], i['patient_id']) for i in _images(tmp_path/'c')) == sorted((i['filename'], i['patient_id']) for i in c)


# ------------------------------------------------------------------------------------------------------- 7. symlinks
def _link_tree(tmp):
    "A root with a loop, links to a folder and a file outside it, a dangling link; the outside links back in."
    src, ext = tmp/'src', tmp/'ext'
    synth_dicom(src/'s1'/'inside.dcm', seed=1)
    synth_dicom(ext/'outside.dcm', seed=2)
    (src/'s1'/'loop').symlink_to(src, target_is_directory=True)             # inside the root, loops back
    (src/'s1'/'ext_dir').symlink_to(ext, target_is_directory=True)          # a folder outside the root
    (src/'s1'/'ext_file.dcm').symlink_to(ext/'outside.dcm')                # a file outside the root
    (ext/'back').symlink_to(src, target_is_directory=True)                  # outside, looping back in
    (src/'s1'/'dangling.dcm').symlink_to(src/'s1'/'gone.dcm')
    return src

def test_symlinks_outside_root_not_followed_by_default(tmp_path):
    "Links leaving the root are skipped and reported; loops terminate; nothing outside is read."
    src = _link_tree(tmp_path)
    r = preprocess(src, tmp_path/'out', n_workers=0, quiet=True)
    assert r.status == 'completed'
    assert sorted(Path(p).name for p in _files(tmp_path/'out')) == ['inside.dcm']
    notes = ' '.join(r.notes)
    assert re.search(r'2 symlink outside', notes) and 'loop' in notes, r.notes
    p = subprocess.run(_cli() + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'out2'), '--workers', '0'],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and 'symlink outside' in p.stdout, p.stdout + p.stderr

def test_follow_symlinks_follows_outside_links_and_stays_loop_safe(tmp_path):
    "--follow-symlinks reads linked folders/files outside the root, still without looping."
    src = _link_tree(tmp_path)
    t0 = time.perf_counter()
    r = preprocess(src, tmp_path/'out', n_workers=0, follow_symlinks=True, quiet=True)
    assert time.perf_counter() - t0 < 30 and r.status == 'completed'
    files = _files(tmp_path/'out')
    rel = sorted(files)                                               # stored relative to the source root
    assert rel == ['s1/ext_dir/outside.dcm', 's1/ext_file.dcm', 's1/inside.dcm'], rel
    assert {v['status'] for v in files.values()} == {'ok'}
    assert len({i['filename'] for i in _images(tmp_path/'out')}) == 3



def _dies_late_on_13(x):
    "Quick task; item 13 kills its worker process after 0.3 s."
    if x == 13: time.sleep(0.3); os._exit(3)
    return x * x


def test_a_crash_between_submissions_loses_nothing(monkeypatch):
    """A worker dies while the driver is submitting (its pool breaks between two submissions): no BrokenProcessPool
    escapes, and every item comes back once. The death is real; the driver's fifth submission is only delayed so
    that it lands after the pool broke, the interleaving that quick tasks hit about once in 200 runs."""
    real, calls = dicom_prep.parallel._Pool.submit, []
    def late_submit(self, fn, chunk):
        calls.append(chunk)
        if len(calls) == 5: time.sleep(1.0)
        return real(self, fn, chunk)
    monkeypatch.setattr(dicom_prep.parallel._Pool, 'submit', late_submit)
    items = [1, 13, *range(2, 13), *range(14, 30)]
    res = dict(run_tasks(_dies_late_on_13, items, workers=2))
    assert sorted(res) == sorted(items) and len(calls) > 5
    assert isinstance(res[13], TaskFailure) and res[13].status == 'crashed' and 'code 3' in res[13].message
    assert all(res[i] == i * i for i in items if i != 13)


def _exit0(x):
    "Task 2 ends its worker with exit code 0, as a library calling sys.exit(0) would."
    if x == 2: os._exit(0)
    return x


def test_worker_exiting_with_code_0_is_a_crash_not_a_hang():
    "A worker that exits cleanly mid-task is noticed at once (pebble, tried as a replacement pool, hangs here forever)."
    res = dict(run_tasks(_exit0, range(5), workers=2, timeout=None))
    assert res[2] == TaskFailure('crashed', 'worker process exited with code 0') and all(res[i] == i for i in (0, 1, 3, 4))


def _killed_while_sending(x):
    "Task 1 is SIGKILLed (as by the OOM killer) while its large result streams back to the driver."
    if x == 1:
        threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGKILL)), daemon=True).start()
        return b'x' * 400_000_000
    time.sleep(0.5); return x


def test_worker_killed_while_sending_its_result_costs_only_its_file():
    "Only the killed task fails, quickly (pebble stalls two minutes here and loses an innocent file)."
    t0 = time.time(); res = dict(run_tasks(_killed_while_sending, range(8), workers=2))
    assert res.pop(1).status == 'crashed' and res == {i: i for i in range(8) if i != 1}
    assert time.time() - t0 < 30


def test_pseudonymized_output_folder_is_safe_to_hand_over(tmp_path):
    "A name and a PatientID planted in tags, folder and file names appear nowhere in the output folder: names, DB dump, PNGs, sheets."
    from dicom_prep.sheet import caption, sample_images
    src, out = tmp_path/'src', tmp_path/'out'
    planted = ['DOE_JOHN', 'Doe^John', 'Doe John', 'PID7654321', 'Dr^Who', '19580704']
    for i in range(4):
        synth_dicom(src/'DOE_JOHN_CT'/f'DOE_JOHN_{i:03d}.dcm', patient='PID7654321', seed=i, frames=2 if i == 0 else 1,
                    PatientName='Doe^John', ReferringPhysicianName='Dr^Who', StudyDescription='CT of Doe John', PatientBirthDate='19580704')
    synth_dicom(src/'PID7654321.dcm', patient='PID7654321', PatientName='Doe^John')           # a top-level file named after him
    p = subprocess.run(_cli() + ['--dicom-dir', str(src), '--output-dir', str(out), '--pseudonymize', '--all-tags', '--sheet',
                                 '--workers', '2'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = [str(q.relative_to(out)) for q in out.rglob('*')]
    with closing(sqlite3.connect(out/'dicom_prep.db')) as c: dump = '\n'.join(c.iterdump())
    blobs = [dump.encode()] + [q.read_bytes() for q in out.rglob('*') if q.is_file() and q.suffix != '.db']
    captions = [line for r in sample_images(out/'dicom_prep.db', n=0)[0] for line in caption(r)]
    for s in planted + [x.lower() for x in planted]:
        assert not any(s in n for n in names) and not any(s.encode() in b for b in blobs) and not any(s in c for c in captions), s
    assert len(names) > 10 and len(captions) == 2 * 5   # a tile per file (issue 29): the 2-frame file is one
    private = tmp_path/'out.private.db'                                   # the private state: beside the folder, not in it
    assert private.is_file() and not list(out.rglob('*.private.db'))
    with closing(sqlite3.connect(private)) as c:
        assert c.execute("select count(*) from files where path like '%DOE_JOHN%'").fetchone()[0] == 4
        key = c.execute("select value from meta where key='key'").fetchone()[0]
    assert len(key) * 4 >= 128 and not any(key.encode() in b for b in blobs)


def test_names_cannot_meet(tmp_path):
    "Root name reused by a subfolder, a file beside a folder named like its image, names differing only in case: every file its own image."
    src = tmp_path/'R'
    cases = {src/'IM.dcm': 1, src/'R/IM.dcm': 2,                                  # top-level file vs the study named like the root
             src/'S2/clash.dcm': 3, src/'S2/clash.png/y.dcm': 4,                  # a file and a folder claiming clash.png
             src/'c/IM.dcm': 5, src/'c/im.dcm': 6, src/'C/im.dcm': 7}             # one on a case-insensitive disk
    for p, seed in cases.items(): synth_dicom(p, 16, 16, seed=seed)
    r = preprocess(src, tmp_path/'out', n_workers=2, quiet=True)
    assert r.status == 'completed' and r.counts == {'ok': 7}, r.counts
    rows = _images(tmp_path/'out')
    assert len(rows) == 7 and len({r['thumbnail_path'].lower() for r in rows}) == 7
    for row in rows:                                                              # each row shows its own file's pixels
        want = np.asarray(frame_image(pydicom.dcmread(src/row['source_path']))[0])
        assert np.array_equal(np.asarray(Image.open(tmp_path/'out'/row['thumbnail_path'])), want), row['source_path']


AMBIGUOUS = r'''
import sys, warnings, pydicom
from dicom_prep.read import read_dicom
warnings.simplefilter('ignore')
plain, quick = pydicom.dcmread(sys.argv[1], force=True), read_dicom(sys.argv[1])
print(repr(plain.get('SmallestImagePixelValue', 'absent')), repr(quick.get('SmallestImagePixelValue', 'absent')))
'''

def test_quick_get_answers_the_default_like_pydicom(tmp_path):
    "An ambiguous-VR element pydicom cannot settle (US/SS without PixelRepresentation): `get` gives the default, as pydicom's."
    ds = Dataset(); ds.SOPInstanceUID = '1.2.3'; ds.Modality = 'OT'; ds.BitsAllocated = 16
    ds.SmallestImagePixelValue = 0; ds['SmallestImagePixelValue'].VR = 'US'; ds.PixelRepresentation = 0; ds.PixelData = b'\0' * 8
    ds.file_meta = pydicom.dataset.FileMetaDataset(); ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = BytesIO(); pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    raw = buf.getvalue(); pr = b'\x28\x00\x03\x01\x02\x00\x00\x00\x00\x00'          # (0028,0103) US 0, implicit VR LE
    assert raw.count(pr) == 1
    (tmp_path/'ambiguous.dcm').write_bytes(raw.replace(pr, b''))
    out = subprocess.run([sys.executable, '-c', AMBIGUOUS, tmp_path/'ambiguous.dcm'], capture_output=True, text=True)   # a fresh pydicom
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["'absent'", "'absent'"], out.stdout
