"""Faults that still corrupted, lost or leaked: decompression bombs (a codestream claiming another size than its
header, a deflated dataset of zeros) refused quickly and in little memory; a memory cap per pool worker; workers that
die with a `kill -9`ed driver; outputs that follow the umask.

The bombs are real: pydicom's own JPEG, JPEG-LS, JPEG 2000 and JP2 test files with their codestream's size patched to
65535x65535 (unguarded, the JPEG one drives pylibjpeg to the memory cap in seconds, see `test_the_bombs_are_real`), and
a deflated dataset whose 64x64 header hides 1 GiB of zeros in a 1 MB file. Memory is measured as the peak RSS of the
processes that handle them (`ru_maxrss`). Run with `pytest -s tests/test_faults.py` to see the figures."""
import faulthandler, json, os, signal, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from dicom_prep.sources import sample_file
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from conftest import console_script, query
from dicom_prep.guards import check_size, codestream_size
from dicom_prep.read import read_dicom
from dicom_prep.parallel import TaskFailure, run_tasks
from dicom_prep.pixels import decode_frame
from dicom_prep.faults import BOMB_SIZE, BOMBS, cine_bomb, codestream_bomb, deflate_bomb
from dicom_prep.synth import synth_clones, synth_dicom, synth_series

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')

MIB = 1 << 20

def _testfile(name): return dcmread(sample_file(name))

NORMAL = ['SC_rgb_jpeg_dcmtk.dcm', 'MR_small_jpeg_ls_lossless.dcm', 'MR_small_jp2klossless.dcm', 'GDCMJ2K_TextGBR.dcm',
          'JPEGLSNearLossless_08.dcm', 'examples_jpeg2k.dcm', 'SC_rgb_small_odd_jpeg.dcm', 'image_dfl.dcm']


# ---------------------------------------------------------------------------------------------------------- bombs
def bomb_folder(d) -> dict:
    "Every bomb, in folder `d`: name → path."
    bombs = {name: codestream_bomb(d/f'{name}.dcm', name) for name in BOMBS}
    bombs['jpeg_mismatch'] = codestream_bomb(d/'jpeg_mismatch.dcm', 'jpeg', [(b'\xff\xc0', 5, '>HH', (20000, 20000))])
    bombs['cine_frame2'] = cine_bomb(d/'cine_frame2.dcm')
    bombs['deflate'] = deflate_bomb(d/'deflate.dcm', 1024)
    return bombs

# this process's own peak RSS in MiB (ru_maxrss would count the pytest process it was spawned from)
_PEAK = "PEAK = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"

_GUARDED = _PEAK + """
import json, sys, time, warnings
warnings.simplefilter('ignore')
from dicom_prep.read import read_dicom
from dicom_prep.guards import check_size, frame_count, TooLargeError, CodestreamMismatch
from dicom_prep.pixels import decode_frame, PixelDecodeError
out = {}
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    try:
        ds = read_dicom(path); check_size(ds)                      # what the preprocessing worker does, in order
        for i in range(frame_count(ds)): decode_frame(ds, i)
        status, why = 'decoded', ''
    except TooLargeError as e: status, why = 'too_large', str(e)
    except (CodestreamMismatch, PixelDecodeError) as e: status, why = 'mismatch', str(e)
    out[path] = (status, why, time.perf_counter() - t0)
print(json.dumps(dict(results=out, maxrss_mib=PEAK())))
"""

def _guarded(paths) -> dict:
    "Read, size-check and decode `paths` the worker's way in a fresh process: {'results': {path: (status, why, s)}, 'maxrss_mib'}."
    r = subprocess.run([sys.executable, '-c', _GUARDED, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)

def test_bombs_are_refused_quickly_in_little_memory(tmp_path):
    "Each bomb is refused before decoding: too_large (or a mismatch for a size within the limit), in < 5 s, under 500 MB."
    bombs = bomb_folder(tmp_path/'bombs')
    for name in BOMBS: assert codestream_size(next(generate_frames(dcmread(bombs[name]).PixelData, number_of_frames=1))).rows == BOMB_SIZE
    got = _guarded(bombs.values())
    res = {name: got['results'][str(p)] for name, p in bombs.items()}
    expect = {name: 'too_large' for name in bombs} | {'jpeg_mismatch': 'mismatch'}
    assert {k: v[0] for k, v in res.items()} == expect, res
    assert all(s < 5 for _, _, s in res.values()), res
    assert got['maxrss_mib'] < 500, got['maxrss_mib']
    assert 'JPEG-LS codestream' in res['jpeg_ls'][1] and 'JPEG 2000 codestream' in res['jp2'][1]
    assert res['cine_frame2'][1].startswith('frame 2:') and 'inflates past' in res['deflate'][1]
    assert 'DICOM header says 100x100' in res['jpeg_mismatch'][1]
    sizes = {name: p.stat().st_size for name, p in bombs.items()}
    print(f"\n[bombs] peak RSS {got['maxrss_mib']:.0f} MiB for all {len(bombs)}; "
          + ', '.join(f"{k} ({sizes[k]:,} B): {v[0]} in {1000 * v[2]:.1f} ms" for k, v in res.items()))


def test_a_lying_deflated_header_is_refused_by_the_header(tmp_path):
    "A deflated file whose header honestly declares more than max_pixels is refused before its pixel data is inflated."
    big = deflate_bomb(tmp_path/'honest.dcm', 1024, rows=32768, cols=32768)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match='exceeds max_pixels'): read_dicom(big, max_pixels=2**24)
    assert time.perf_counter() - t0 < 1
    assert read_dicom(big, headers_only=True).Rows == 32768


def test_normal_compressed_files_still_decode_identically():
    "The guards pass honest JPEG, JPEG-LS, JPEG 2000, JP2 and deflated files, and decoding gives what pydicom gives."
    for name in NORMAL:
        ours, theirs = read_dicom(sample_file(name)), _testfile(name)
        assert check_size(ours) == ours.Rows * ours.Columns * ours.get('SamplesPerPixel', 1) * int(ours.get('NumberOfFrames', 1) or 1)
        a, b = decode_frame(ours), pixel_array(theirs, index=0)
        assert a.shape == b.shape, name
        if ours.get('PhotometricInterpretation', '').startswith('YBR') and 'JPEG' in theirs.file_meta.TransferSyntaxUID.name:
            assert np.abs(a.astype(int) - b).mean() < 1, name                  # libjpeg's own colour transform
        else: assert np.array_equal(a, b), name


def test_the_bombs_are_real(tmp_path):
    "Unguarded, pydicom decodes the JPEG bomb until a 512 MiB cap stops it: what the guards save."
    bomb = codestream_bomb(tmp_path/'jpeg.dcm', 'jpeg')
    code = _PEAK + ("import sys, warnings; warnings.simplefilter('ignore'); from pydicom import dcmread\n"
                    "from dicom_prep.parallel import limit_memory; limit_memory(512 << 20)\n"
                    "try: dcmread(sys.argv[1]).pixel_array\nexcept Exception as e: print(e)\n"
                    "print(int(PEAK()))")
    r = subprocess.run([sys.executable, '-c', code, str(bomb)], capture_output=True, text=True, timeout=120)
    *msg, peak = r.stdout.split('\n')[:-1]
    assert 'memory' in '\n'.join(msg).lower() and int(peak) > 400, r.stdout
    print(f"\n[unguarded JPEG bomb] {bomb.stat().st_size:,} B file: peak RSS {peak} MiB before the 512 MiB cap stopped it")


def _peak_cli(args) -> tuple[subprocess.CompletedProcess, float]:
    "Run a console script in a wrapper process; (its result, the peak RSS in MiB of the script and its workers)."
    code = ("import json, resource, subprocess, sys\nr = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps([r.returncode, r.stdout, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    rc, out, err, peak = json.loads(subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True,
                                                   text=True, timeout=300, check=True).stdout)
    return subprocess.CompletedProcess(args, rc, out, err), peak / 1024

def test_codestream_bombs_through_the_cli(tmp_path):
    "A real preprocess run over the codestream bombs and honest files: bombs too_large, the rest ok, all under 500 MB."
    src, out = tmp_path/'src', tmp_path/'out'
    bombs = {name: codestream_bomb(src/'bombs'/f'{name}.dcm', name) for name in BOMBS} | {'cine_frame2': cine_bomb(src/'bombs'/'cine.dcm')}
    (src/'fine').mkdir()
    for name in NORMAL[:4]: _testfile(name).save_as(src/'fine'/name)
    t0 = time.perf_counter()
    r, peak = _peak_cli(console_script('dicom_prep_preprocess') + ['--dicom-dir', src, '--output-dir', out, '--workers', '2'])
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    status = dict(query(out, 'select path, status from files'))
    assert {Path(p).name: s for p, s in status.items() if p.startswith('bombs/')} == {p.name: 'too_large' for p in bombs.values()}
    assert {s for p, s in status.items() if p.startswith('fine/')} == {'ok'} and len(status) == len(bombs) + 4
    assert peak < 500 and wall < 60, (peak, wall)
    print(f"\n[bombs via CLI] {len(bombs)} bombs too_large, 4 honest files ok; peak RSS {peak:.0f} MiB, {wall:.1f}s")


def test_deflate_bomb_through_the_cli(tmp_path):
    "A deflate bomb in a real preprocess run is recorded too_large, and no process passes 500 MB."
    src, out = tmp_path/'src', tmp_path/'out'
    deflate_bomb(src/'s'/'deflate.dcm', 1024); synth_dicom(src/'s'/'fine.dcm')
    r, peak = _peak_cli(console_script('dicom_prep_preprocess') + ['--dicom-dir', src, '--output-dir', out, '--workers', '2'])
    status = {Path(p).name: (s, e) for p, s, e in query(out, 'select path, status, error from files')}
    assert peak < 500, peak
    assert status['fine.dcm'][0] == 'ok' and status['deflate.dcm'][0] == 'too_large', status


_HEADERS = _PEAK + """
import json, sys, warnings
warnings.simplefilter('ignore')
from dicom_prep.read import read_dicom
from dicom_prep.guards import TooLargeError
out = {}
for path in sys.argv[1:]:
    try: read_dicom(path, headers_only=True); out[path] = 'read'
    except TooLargeError as e: out[path] = str(e)
print(json.dumps(dict(results=out, maxrss_mib=PEAK())))
"""

def test_deflate_bombs_past_the_old_guard_are_too_large(tmp_path):
    "A transfer syntax UID moved past byte 8,192 by a 9,000-byte meta element, and zeros hidden in a non-pixel element: too_large, naming the limit, in < 400 MB."
    src, out = tmp_path/'src', tmp_path/'out'
    bombs = {'far': deflate_bomb(src/'s'/'far.dcm', 512, meta_pad=9000),                     # 531 KB, 512 MiB in the pixel data
             'hidden': deflate_bomb(src/'s'/'hidden.dcm', 512, inside='element'),            # 512 MiB in a private element
             'far_hidden': deflate_bomb(src/'s'/'far_hidden.dcm', 512, inside='element', meta_pad=9000),
             'nested': deflate_bomb(src/'s'/'nested.dcm', 512, inside='sequence')}      # in an item of a sequence
    synth_dicom(src/'s'/'fine.dcm'); deflate_bomb(src/'s'/'fine_deflated.dcm', 2, inside='element')   # 2 MiB besides its pixels: fine
    assert all(bombs[k].read_bytes().find(b'1.2.840.10008.1.2.1.99') > 8192 for k in ('far', 'far_hidden'))
    r, peak = _peak_cli(console_script('dicom_prep_preprocess') + ['--dicom-dir', src, '--output-dir', out, '--workers', '1'])
    assert r.returncode == 0, r.stderr
    status = {Path(p).stem: (s, e) for p, s, e in query(out, 'select path, status, error from files')}
    assert {k: s for k, (s, _) in status.items()} == {k: 'too_large' for k in bombs} | {'fine': 'ok', 'fine_deflated': 'ok'}, status
    assert status['far'][1].endswith('(4,096 bytes of pixel data, as its header declares, + 64 MiB for its other elements)'), status['far']
    assert all(status[k][1].endswith('bytes before its pixel data (at most 64 MiB besides the pixel data)') for k in ('hidden', 'far_hidden', 'nested')), status
    assert peak < 400, peak
    got = json.loads(subprocess.run([sys.executable, '-c', _HEADERS, *map(str, bombs.values())], capture_output=True, text=True,
                                    timeout=120, check=True).stdout)                     # the header-only reads of the NIfTI pipeline
    hidden = 'bytes before its pixel data (at most 64 MiB besides the pixel data)'
    assert {Path(p).stem: why if why == 'read' else why.endswith(hidden) for p, why in got['results'].items()} == {
        'far': 'read', 'hidden': True, 'far_hidden': True, 'nested': True}, got                           # the header alone is fine unless it holds the bomb
    assert got['maxrss_mib'] < 300, got['maxrss_mib']
    print(f"\n[deflate bombs past the old guard] {', '.join(f'{k} ({p.stat().st_size:,} B)' for k, p in bombs.items())}: too_large; "
          f"peak RSS {peak:.0f} MiB (CLI), {got['maxrss_mib']:.0f} MiB (header-only reads)")


def test_worker_memory_caps_each_file_with_workers_0(tmp_path):
    "--workers 0 runs files in the driver under --worker-memory: a file that needs more is too_large naming the cap; the run and its DB go on."
    src, out = tmp_path/'src', tmp_path/'out'
    deflate_bomb(src/'s'/'big.dcm', 64, rows=8192, cols=8192)          # honest: 64 MiB of 8-bit pixels, whose decoding needs more
    synth_dicom(src/'s'/'fine.dcm'); synth_dicom(src/'s'/'report.dcm', pixels=False)
    args = ['--dicom-dir', src, '--output-dir', out, '--workers', '0', '--worker-memory', '256']
    r, peak = _peak_cli(console_script('dicom_prep_preprocess') + args)
    assert r.returncode == 0, r.stderr
    status = {Path(p).name: (s, e) for p, s, e in query(out, 'select path, status, error from files')}
    assert status['big.dcm'][0] == 'too_large' and 'memory limit (256 MiB, --worker-memory) exceeded in the driver' in status['big.dcm'][1], status
    assert (status['fine.dcm'][0], status['report.dcm'][0]) == ('ok', 'not_image')      # an SR: no image (issue 23)
    assert query(out, 'select status from runs') == [('completed',)] and query(out, 'select count(*) from images') == [(1,)]
    assert peak < 256 + 160, peak
    print(f"\n[--workers 0 --worker-memory 256] big.dcm: {status['big.dcm'][1][:90]}...; peak RSS {peak:.0f} MiB")


# --------------------------------------------------------------------------------------------- memory per worker
def _allocate(mib:int) -> int:
    "Touch `mib` MiB (a worker task)."
    return int(np.ones(mib * MIB, np.uint8).sum() // MIB)

def _decode_unguarded(path) -> str:
    "Decode `path` with pydicom alone, no size guard (a worker task)."
    faulthandler.disable()                                  # a decoder that aborts need not dump pytest's stack
    return str(dcmread(path).pixel_array.shape)

def test_worker_memory_cap_fails_only_that_item(tmp_path):
    "With `memory`, a task past the cap is too_large (MemoryError) or crashed (a decoder that aborts); the others finish."
    cap = 384 * MIB
    res = dict(run_tasks(_allocate, [10, 2048, 20, 4096, 30], workers=2, memory=cap))
    assert [res[k] for k in (10, 20, 30)] == [10, 20, 30]
    for k in (2048, 4096):
        assert res[k] == TaskFailure('too_large', res[k].message) and res[k].message.startswith('worker memory limit (384 MiB) exceeded'), res[k]
    bombs = [codestream_bomb(tmp_path/f'{n}.dcm', n) for n in ('jpeg', 'jpeg_ls')]
    fine = tmp_path/'fine.dcm'; _testfile('MR_small_jpeg_ls_lossless.dcm').save_as(fine)
    t0 = time.perf_counter()
    res = dict(run_tasks(_decode_unguarded, [bombs[0], fine, bombs[1]], workers=2, memory=cap, timeout=60))
    assert res[fine] == '(64, 64)' and time.perf_counter() - t0 < 60
    for b in bombs: assert isinstance(res[b], TaskFailure) and res[b].status in ('too_large', 'error', 'crashed'), res[b]
    print(f"\n[memory cap {cap // MIB} MiB] unguarded bombs: " + '; '.join(f"{b.name}: {res[b].status} ({res[b].message[:70]})" for b in bombs))


def test_dask_local_cluster_gets_the_memory_limit():
    "On Dask, `memory` becomes the LocalCluster workers' memory_limit."
    pytest.importorskip('distributed')
    from dicom_prep.dask_backend import dask_client
    with dask_client('local', 1, memory=700 * MIB) as c:
        assert {w['memory_limit'] for w in c.scheduler_info()['workers'].values()} == {700 * MIB}


# ------------------------------------------------------------------------------------------------- orphan workers
def _state(pid:int) -> str|None:
    "The process state letter of `pid` (R, S, Z, ...), None if gone."
    try: return Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()[0]
    except (FileNotFoundError, ProcessLookupError): return None

def _children(pid:int) -> list[int]:
    "Live (not zombie) child processes of `pid`."
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: fields = (p/'stat').read_text().rpartition(')')[2].split()
        except OSError: continue
        if int(fields[1]) == pid and fields[0] != 'Z': out.append(int(p.name))
    return out

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_workers_die_with_a_killed_driver(tmp_path):
    "kill -9 of the driver alone: its workers are gone within 2 s, its stdout pipe reaches EOF, and a rerun can take the lock."
    src, out = synth_clones(tmp_path/'src', 1500, size=256), tmp_path/'out'
    cmd = console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '2']
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(workers := _children(driver.pid)) < 2 and time.time() - t0 < 60: time.sleep(0.05)
    assert len(workers) >= 2, 'workers never started'
    time.sleep(0.5)                                            # let them get busy
    assert all(_state(w) not in (None, 'Z') for w in workers)
    os.kill(driver.pid, signal.SIGKILL); driver.wait(); killed = time.time()
    while any(_state(w) not in (None, 'Z') for w in workers) and time.time() - killed < 10: time.sleep(0.02)
    gone = time.time() - killed
    eof = threading.Event()
    threading.Thread(target=lambda: (driver.stdout.read(), eof.set()), daemon=True).start()
    assert gone < 2, f"workers outlived their driver by {gone:.1f}s"
    assert eof.wait(5), 'the pipe never reached EOF: something still holds the driver stdout'
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    print(f"\n[orphans] {len(workers)} workers gone {gone:.2f}s after kill -9 of the driver; pipe EOF; rerun completed")


# ---------------------------------------------------------------------------------------------------------- umask
def _modes(root, pattern) -> set:
    return {oct(p.stat().st_mode & 0o777) for p in Path(root).rglob(pattern)}

@pytest.mark.parametrize('umask,mode', [(0o022, '0o644'), (0o077, '0o600'), (0o002, '0o664')])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    "PNGs (preprocess) and NIfTI files (nifti) get 0o666 less the umask, as any other program's files would."
    src = tmp_path/'src'
    for i in range(3): synth_dicom(src/'st'/f'{i}.dcm', seed=i)
    synth_series(src/'vol'/'s1')
    run = lambda name, out: subprocess.run(console_script(name) + ['--dicom-dir', str(src), '--output-dir', str(out)],
                                            capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    for name, out, pattern in (('dicom_prep_preprocess', tmp_path/'png', '*.png'), ('dicom_prep_nifti', tmp_path/'nii', '*.nii.gz')):
        r = run(name, out)
        assert r.returncode == 0, r.stderr
        assert _modes(out, pattern) == {mode}, (name, _modes(out, pattern))
