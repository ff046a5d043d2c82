"""Issue 3: crash-safe resume and fast incremental runs — the database is the state.

End-to-end: the `dicom_prep_preprocess` console script runs as a subprocess (in its own process group) on a
synthesised corpus and is really interrupted — SIGKILL at several points, SIGINT/SIGTERM, a second Ctrl+C — then
rerun plainly; the final DB rows and image set must equal those of one clean, uninterrupted run.
Incremental behaviour (stat-only reruns, --force, --retry-failed, --verify, --prune, settings guard, corrupt DBs,
the single-writer lock, `dicom_prep_status`) is checked on small corpora.
"""
import builtins, csv, hashlib, inspect, os, re, shlex, shutil, signal, sqlite3, subprocess, sys, time
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from dicom_prep.db import FAILED, FINAL_OK, SCHEMA_VERSION
from conftest import query
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom
import dicom_prep.sources, dicom_prep.preprocess

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')

CLI = shutil.which('dicom_prep_preprocess')
STATUS = shutil.which('dicom_prep_status')
SLOW_N = 128                       # 256x256 files (+2 odd ones) in batches of 10: about 14 commits to interrupt between
SLOW_ARGS = ('--workers', '2', '--batch-size', '10')
IMAGE_COLS = ('filename, study_id, patient_id, study_uid, series_uid, sop_uid, modality, frame_number, num_frames, '
              'rows, columns, photometric, window, thumbnail_path, source_path, split, burned_in')
FILE_COLS = 'path, study_id, size, mtime_ns, status, error, n_frames'


def test_console_scripts_installed():
    assert CLI and STATUS, "dicom_prep_preprocess / dicom_prep_status not on PATH: pip install -e ."

# ----------------------------------------------------------------------------------------------------------------------
# Corpora, runs and snapshots

def make_corpus(root:Path, n:int, size:int, multi_every=40, frames=6) -> Path:
    "`n` synthetic DICOMs in 8 studies (nested folders, extensionless names, multi-frame files) + one junk, one no-pixel file."
    bad = root/'study_00'/'000_broken.dcm'
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b'this is not a DICOM file ' * 20)                     # -> unreadable (sorted first: early batch)
    synth_dicom(root/'study_00'/'001_nopix.dcm', pixels=False)              # an SR -> not_image (issue 23)
    for i in range(n):
        sub = 'series1/' if i % 8 == 3 else ''
        name = f'IM{i:04d}' if i % 8 == 5 else f'im{i:04d}.dcm'
        synth_dicom(root/f'study_{i % 8:02d}'/f'{sub}{name}', size, size, frames=frames if i % multi_every == 7 else 1,
                    modality=('CT', 'MR', 'CR')[i % 3], patient=f'P{i % 11}', seed=i)
    return root

def n_sources(root) -> int: return sum(1 for p in Path(root).rglob('*') if p.is_file())

def cli_args(src, out, *extra, exe=None):
    return [*(exe or [CLI]), '--dicom-dir', str(src), '--output-dir', str(out), *extra]

def run_cli(src, out, *extra, exe=None, timeout=120) -> subprocess.CompletedProcess:
    "Run the preprocess CLI to completion."
    return subprocess.run(cli_args(src, out, *extra, exe=exe), capture_output=True, text=True, timeout=timeout)

def count(out, sql) -> int:
    "Result of a count query on a possibly still-being-created DB (-1 when not readable yet)."
    try: return query(out, sql)[0][0]
    except sqlite3.Error: return -1

def n_files(out) -> int: return count(out, 'select count(*) from files')
def rel(src, path) -> str: return os.path.relpath(path, src)     # how the index stores a source path
def run_recorded(out) -> bool: return count(out, 'select count(*) from runs') > 0

def pngs(out) -> dict:
    "Every file under `out/images` (hidden temp files included), relative path -> sha1 of the bytes."
    return {p.relative_to(out).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted((Path(out)/'images').rglob('*')) if p.is_file()}

def snapshot(out) -> dict:
    "What a run leaves behind that must not depend on interruptions: image rows, file rows, image files."
    return dict(images=sorted(query(out, f'select {IMAGE_COLS} from images')),
                files=sorted(query(out, f'select {FILE_COLS} from files')), pngs=pngs(out))

def check_consistent(out):
    "No temp files, every row has its PNG, every PNG has its row and decodes, no run left 'running'."
    snap = snapshot(out)
    stray = [p for p in snap['pngs'] if Path(p).name.startswith('.')]
    real = {p: h for p, h in snap['pngs'].items() if p not in stray}
    rows = {r[13] for r in snap['images']}
    assert rows == set(real), f"rows without PNG: {sorted(rows - set(real))[:5]}; PNGs without row: {sorted(set(real) - rows)[:5]}"
    for p in real:
        with Image.open(Path(out)/p) as im: im.load()
    assert not query(out, "select id from runs where status='running'")
    assert {p for p, in query(out, 'select distinct source_path from images')} <= {p for p, in query(out, 'select path from files')}
    assert not stray, f"temp files left in images/: {stray}"
    return snap

def assert_same_state(out, ref):
    "`out` holds exactly the reference run's rows and images (byte for byte)."
    snap = snapshot(out)
    assert snap['files'] == ref['files']
    assert len(snap['images']) == len(ref['images'])
    assert snap['images'] == ref['images']
    images = {p: h for p, h in snap['pngs'].items() if not Path(p).name.startswith('.')}    # temp files: check_consistent
    extra, missing = set(images) - set(ref['pngs']), set(ref['pngs']) - set(images)
    assert not extra and not missing, f"extra images {sorted(extra)[:5]}, missing {sorted(missing)[:5]}"
    assert images == ref['pngs'], f"different bytes: {[p for p in images if images[p] != ref['pngs'][p]][:5]}"
    check_consistent(out)

def ok(r: subprocess.CompletedProcess):
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}"
    return r

def processed(r) -> int:
    "How many files a run said it would process."
    return int(re.search(r'Processing ([\d,]+) files', r.stdout)[1].replace(',', ''))

# ----------------------------------------------------------------------------------------------------------------------
# Interruptible runs

FAULTS = '''"A preprocess CLI with an injected SIGKILL of the whole run (test helper; needs its own process group)."
import os, signal, sys, time
from pathlib import Path
LEADER = os.getpid()
assert os.getpgid(0) == LEADER, "must run as a process-group leader"
def die(): os.killpg(LEADER, signal.SIGKILL); time.sleep(60)
mode, arg = os.environ.get('DP_FAULT', 'none:').split(':', 1)
import dicom_prep.preprocess as pp
if mode == 'commit':      # inside the transaction of batch number `arg`, after its image rows are written
    upsert_images, seen = pp._upsert_images, []
    def patched(db, rows):
        upsert_images(db, rows)               # the batch's image rows are written, its file rows and commit not yet
        seen.append(1)
        if len(seen) == int(arg): die()
    pp._upsert_images = patched
if mode == 'halfwrite':   # the first write to the PNG named `arg` (under its name or a temporary's) stops half-way, killed
    real_write = os.write
    def write(fd, data):
        try: name = os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))
        except OSError: name = ''
        if name == arg + '.png' or name.startswith(f'.{arg}.png.'): real_write(fd, bytes(data)[:len(data) // 2]); die()
        return real_write(fd, data)
    os.write = write
from dicom_prep.core import atomic_path
save_png = pp.save_png
def patched_save(img, path, compress_level=6, **kw):
    if mode == 'png' and Path(path).stem == arg:    # half-way through writing this PNG
        with atomic_path(path) as tmp:
            img.save(tmp, format='PNG'); tmp.write_bytes(tmp.read_bytes()[:60]); die()
    if mode == 'slow' and os.path.exists(arg): time.sleep(3)    # slow workers once the flag file exists
    if mode == 'delay': time.sleep(float(arg))                  # every file takes this long more: the run lasts long enough to stop
    if mode == 'crash' and Path(path).stem == arg: os.kill(os.getpid(), signal.SIGSEGV)   # this file kills its worker
    if mode == 'crashframe' and Path(path).stem.endswith(arg): os.kill(os.getpid(), signal.SIGSEGV)   # after its first frames
    return save_png(img, path, compress_level, **kw)
pp.save_png = patched_save
sys.exit(pp.main())
'''

@pytest.fixture(scope='module')
def faulty(tmp_path_factory):
    "Command prefix of the fault-injecting CLI."
    p = tmp_path_factory.mktemp('faults')/'dicom_prep_faulty.py'
    p.write_text(FAULTS)
    return [sys.executable, str(p)]

class Run:
    "A CLI run in its own process group, polled until a condition holds."
    def __init__(self, src, out, *extra, exe=None, env=None):
        self.out, self.t0 = Path(out), time.monotonic()
        self.log = self.out.parent/f'{self.out.name}.{int(self.t0*1e6)}'
        with open(f'{self.log}.out', 'w') as o, open(f'{self.log}.err', 'w') as e:
            self.p = subprocess.Popen(cli_args(src, out, *extra, exe=exe), stdout=o, stderr=e, start_new_session=True,
                                      env=env and {**os.environ, **env})
    def wait_for(self, cond, timeout=60) -> bool:
        "Poll `cond(out)` until it holds (True) or the run ends (False)."
        while self.p.poll() is None and time.monotonic() - self.t0 < timeout:
            if cond(self.out): return True
            time.sleep(0.003)
        return False
    def kill(self, sig=signal.SIGKILL, group=True):
        (os.killpg if group else os.kill)(self.p.pid, sig)
    def wait(self, timeout=60) -> int: return self.p.wait(timeout)
    def group_gone(self, timeout=3) -> bool:
        "True once no process of the run's group (driver or worker) is left."
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try: os.killpg(self.p.pid, 0)
            except ProcessLookupError: return True
            time.sleep(0.05)
        return False
    @property
    def stdout(self): return Path(f'{self.log}.out').read_text()
    @property
    def stderr(self): return Path(f'{self.log}.err').read_text()
    def cleanup(self):
        "Kill whatever is left of the run's process group (orphaned workers included)."
        try: os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        self.p.wait(10)

@pytest.fixture
def runs():
    started = []
    def start(*a, **kw):
        r = Run(*a, **kw); started.append(r); return r
    yield start
    for r in started: r.cleanup()

@pytest.fixture(scope='module')
def slow_src(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp('slow')/'src', SLOW_N, 256)

@pytest.fixture(scope='module')
def reference(slow_src, tmp_path_factory):
    "Snapshot of one clean, uninterrupted run over the slow corpus."
    out = tmp_path_factory.mktemp('ref')/'out'
    run = Run(slow_src, out, *SLOW_ARGS)
    assert run.wait_for(run_recorded), run.stdout
    t0 = time.monotonic()
    assert run.wait() == 0, run.stderr
    snap = check_consistent(out)
    snap['active_s'] = time.monotonic() - t0        # run row recorded -> process exit: the span a timed kill aims into
    assert len(snap['files']) == n_sources(slow_src) == SLOW_N + 2
    assert {f[4] for f in snap['files']} == {'ok', 'not_image', 'unreadable'}
    assert len(snap['images']) > SLOW_N and len(snap['pngs']) == len(snap['images'])
    return snap

def rerun_completes(src, out, ref, n_recorded):
    "A plain rerun finishes, does only the files not yet recorded, and reaches the reference state."
    r = ok(run_cli(src, out, *SLOW_ARGS))
    assert processed(r) == len(ref['files']) - n_recorded, r.stdout
    assert_same_state(out, ref)
    statuses = [s for s, in query(out, 'select status from runs order by id')]
    assert statuses[-1] == 'completed' and set(statuses[:-1]) <= {'interrupted'}, statuses
    return r

# ----------------------------------------------------------------------------------------------------------------------
# kill -9 at any instant → a plain rerun gives exactly the clean run's state

def _first_png_before_commit(out):
    return next((Path(out)/'images').rglob('*.png'), None) is not None and n_files(out) <= 0

def _timed(seconds):
    "True `seconds` after the run has recorded its start (an arbitrary instant, not aligned with any event)."
    t = []
    def cond(out):
        if not t and run_recorded(out): t.append(time.monotonic())
        return bool(t) and time.monotonic() - t[0] >= seconds
    return cond

KILL_POINTS = {
    'db_created': lambda out: (Path(out)/'dicom_prep.db').exists(),
    'mid_first_batch': _first_png_before_commit,
    'after_first_commit': lambda out: n_files(out) >= 10,
    'midway': lambda out: n_files(out) >= SLOW_N // 2,
    'near_end': lambda out: n_files(out) >= SLOW_N - 20,
}
TIMED = {'timed_20%': 0.2, 'timed_45%': 0.45}   # fractions of the reference run's active span: scales with the machine

@pytest.mark.parametrize('point', [*KILL_POINTS, *TIMED])
def test_sigkill_then_plain_rerun_equals_clean_run(point, slow_src, reference, tmp_path, runs):
    out = tmp_path/'out'
    run = runs(slow_src, out, *SLOW_ARGS)
    cond = KILL_POINTS[point] if point in KILL_POINTS else _timed(TIMED[point] * reference['active_s'])
    assert run.wait_for(cond), f"run ended before kill point {point}:\n{run.stdout}"
    run.kill()
    assert run.wait() == -signal.SIGKILL
    rerun_completes(slow_src, out, reference, max(n_files(out), 0))

@pytest.mark.parametrize('batch', [1, 3])
def test_sigkill_inside_commit_transaction(batch, slow_src, reference, tmp_path, runs, faulty):
    "Killed after a batch's image rows are written but before the transaction commits: none of that batch survives."
    out = tmp_path/'out'
    run = runs(slow_src, out, *SLOW_ARGS, exe=faulty, env={'DP_FAULT': f'commit:{batch}'})
    assert run.wait() == -signal.SIGKILL, run.stderr
    assert n_files(out) == 10 * (batch - 1)
    done = {r[0] for r in query(out, 'select path from files')}
    orphans = {r[0] for r in query(out, 'select distinct source_path from images')} - done
    rerun_completes(slow_src, out, reference, 10 * (batch - 1))
    assert not orphans, f"image rows of the killed batch were committed without their files rows: {len(orphans)} files"

def test_sigkill_while_writing_a_png(slow_src, reference, tmp_path, runs, faulty):
    "Killed with a half-written PNG temp file on disk: the rerun leaves no temp file and no truncated PNG."
    out = tmp_path/'out'
    run = runs(slow_src, out, *SLOW_ARGS, exe=faulty, env={'DP_FAULT': 'png:im0040'})
    assert run.wait() == -signal.SIGKILL, run.stderr
    assert any(Path(p).name.startswith('.im0040.png') for p in pngs(out)), "fault not injected"
    rerun_completes(slow_src, out, reference, n_files(out))

def test_sigkill_while_verify_rewrites_a_missing_png(slow_src, reference, tmp_path, runs, faulty):
    "--verify redoes a file whose PNG went missing and is killed half-way through writing it: no row names a truncated PNG."
    out = tmp_path/'out'
    ok(run_cli(slow_src, out, *SLOW_ARGS))
    name = next(p for p in reference['pngs'] if '_frame' not in p)              # a single-frame file's PNG
    (out/name).unlink()
    run = runs(slow_src, out, *SLOW_ARGS, '--verify', exe=faulty, env={'DP_FAULT': f'halfwrite:{Path(name).stem}'})
    assert run.wait() == -signal.SIGKILL, run.stderr
    assert query(out, 'select count(*) from images where thumbnail_path = ?', [name])[0][0] == 1     # its row is still there
    for p, in query(out, 'select thumbnail_path from images'):
        if (out/p).exists():
            with Image.open(out/p) as im: im.load()          # every PNG a row names is whole (a truncated one would raise)
    ok(run_cli(slow_src, out, *SLOW_ARGS, '--verify'))
    assert_same_state(out, reference)

def test_interrupted_forced_rebuild_is_completed_by_plain_rerun(slow_src, reference, tmp_path, runs, faulty):
    "image_size 64 → --force 256 killed after 2 batches → a plain 256 rerun must finish the rebuild (no 64px leftovers)."
    out = tmp_path/'out'
    ok(run_cli(slow_src, out, *SLOW_ARGS, '--image-size', '64'))
    run = runs(slow_src, out, *SLOW_ARGS, '--force', exe=faulty, env={'DP_FAULT': 'commit:3'})
    assert run.wait() == -signal.SIGKILL, run.stderr
    ok(run_cli(slow_src, out, *SLOW_ARGS))
    small = [p for p in pngs(out) if not Path(p).name.startswith('.') and max(Image.open(out/p).size) < 256]
    assert not small, f"{len(small)} images still at the old size after the rerun, e.g. {small[:3]}"
    assert_same_state(out, reference)

# ----------------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: finish in-flight work, commit, mark the run interrupted, print how to resume, exit 130

@pytest.mark.parametrize('sig,group', [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=['ctrl_c_to_group', 'sigterm_to_driver'])
def test_graceful_interrupt_and_printed_resume_command(sig, group, slow_src, reference, tmp_path, runs, faulty):
    "Files take 40 ms more each, so the run (128 files, 2 workers) lasts seconds and the signal lands in its middle."
    out = tmp_path/'out'
    run = runs(slow_src, out, *SLOW_ARGS, exe=faulty, env={'DP_FAULT': 'delay:0.04'})
    assert run.wait_for(lambda o: n_files(o) >= 20), run.stdout
    run.kill(sig, group=group)
    assert run.wait(timeout=20) == 130, run.stderr
    assert 'finishing files in flight' in run.stderr
    assert run.group_gone(), "workers left running after the run exited"
    [(status, finished, counts)] = query(out, 'select status, finished_at, counts from runs')
    assert status == 'interrupted' and finished and counts
    done = n_files(out)
    assert 20 <= done < len(reference['files'])
    check_consistent(out)
    m = re.search(r'INTERRUPTED after ([\d,]+) of ([\d,]+) files; progress saved\. Resume with:\n\s+(.+)', run.stdout)
    assert m, run.stdout
    assert int(m[1].replace(',', '')) == done and int(m[2].replace(',', '')) == len(reference['files'])
    cmd = shlex.split(m[3])
    assert cmd[1:] == cli_args(slow_src, out, *SLOW_ARGS)[1:]            # the run's own arguments (its program: the fault injector)
    r = ok(subprocess.run([Path(CLI).name, *cmd[1:]], capture_output=True, text=True, timeout=120))
    # the resumed run counts the whole corpus and starts at what is already done
    n_ok, n_failed = (count(out, f"select count(*) from files where status in {tuple(s)} and run_id=1") for s in (FINAL_OK, FAILED))
    assert n_ok + n_failed == done
    total = len(reference['files'])
    head = f"Resuming: {done:,} of {total:,} files already processed" + (f", {n_failed:,} failed earlier" if n_failed else '\n')
    assert head in r.stdout, r.stdout
    assert ('(use --retry-failed)' in r.stdout) == (n_failed > 0)
    assert processed(r) == total - done
    ticks = [tuple(int(x.replace(',', '')) for x in t) for t in re.findall(r'^\s+([\d,]+)/([\d,]+) files', r.stdout, re.M)]
    assert ticks and {t[1] for t in ticks} == {total} and ticks[0][0] > done and ticks[-1][0] == total
    assert_same_state(out, reference)

def test_a_worker_crash_inside_a_chunk_costs_only_its_file(slow_src, reference, tmp_path, faulty):
    "Small files travel in chunks; a file that kills its worker late in the run (inside a chunk) is recorded crashed, alone."
    out, victim = tmp_path/'out', 'im0100.dcm'
    r = subprocess.run(cli_args(slow_src, out, *SLOW_ARGS, exe=faulty), capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'DP_FAULT': f'crash:{Path(victim).stem}'}, start_new_session=True)
    assert r.returncode == 0, r.stderr
    got = {Path(p).name: (st, err) for p, st, err in query(out, 'select path, status, error from files')}
    want = {Path(f[0]).name: f[4] for f in reference['files']}
    assert got[victim][0] == 'crashed' and got[victim][1].startswith('worker process killed by SIGSEGV'), got[victim]
    assert {k: st for k, (st, _) in got.items() if k != victim} == {k: st for k, st in want.items() if k != victim}
    check_consistent(out)

def test_pseudonymised_file_crashing_midway_leaves_no_image(slow_src, tmp_path, faulty):
    "A worker killed after writing a multi-frame file's first frame: with --pseudonymize its names are the worker's, yet no PNG is left."
    out = tmp_path/'out'
    r = subprocess.run(cli_args(slow_src, out, *SLOW_ARGS, '--pseudonymize', '--salt', 'x' * 32, exe=faulty), capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'DP_FAULT': 'crashframe:_frame0001'}, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert 'images left by files whose worker crashed' in r.stdout, r.stdout
    on_disk = {str(p.relative_to(out)) for p in (out/'images').rglob('*.png')}
    assert on_disk == {t for t, in query(out, 'select thumbnail_path from images')}

def test_second_ctrl_c_quits_at_once_and_state_stays_consistent(slow_src, reference, tmp_path, runs, faulty):
    out, flag = tmp_path/'out', tmp_path/'slow.flag'
    run = runs(slow_src, out, *SLOW_ARGS, exe=faulty, env={'DP_FAULT': f'slow:{flag}'})
    assert run.wait_for(lambda o: n_files(o) >= 10), run.stdout
    flag.touch()                                  # from now on every PNG takes 3 s: the first Ctrl+C has to wait for them
    time.sleep(0.3)
    run.kill(signal.SIGINT)
    assert run.wait_for(lambda o: 'finishing files in flight' in run.stderr, timeout=30), run.stderr
    t = time.monotonic()
    run.kill(signal.SIGINT)
    assert run.wait(timeout=10) == 130
    assert time.monotonic() - t < 2.5, "second Ctrl+C did not quit at once"
    assert 'resume with' in run.stderr.lower(), run.stderr
    assert run.group_gone(), "workers left running after the run exited"
    assert [s for s, in query(out, 'select status from runs')] == ['interrupted']
    flag.unlink()
    rerun_completes(slow_src, out, reference, n_files(out))

# ----------------------------------------------------------------------------------------------------------------------
# One writer

def test_second_run_refused_while_one_is_active_and_no_stale_lock_after_kill(slow_src, reference, tmp_path, runs, faulty):
    out, flag = tmp_path/'out', tmp_path/'slow.flag'
    first = runs(slow_src, out, *SLOW_ARGS, exe=faulty, env={'DP_FAULT': f'slow:{flag}'})
    assert first.wait_for(lambda o: n_files(o) >= 10), first.stdout
    flag.touch()                                  # keep the first run busy while the second one tries
    t = time.monotonic()
    second = run_cli(slow_src, out, *SLOW_ARGS)
    assert second.returncode != 0 and time.monotonic() - t < 10
    assert 'in use by another run' in second.stderr and str(out/'dicom_prep.db') in second.stderr, second.stderr
    assert first.p.poll() is None, "the first run should still be running"
    assert len(query(out, 'select id from runs')) == 1, "the refused run must not touch the database"
    first.kill()
    assert first.wait() == -signal.SIGKILL
    flag.unlink()
    rerun_completes(slow_src, out, reference, n_files(out))

def test_no_stale_lock_after_kill_9_of_the_driver_only(slow_src, reference, tmp_path, runs):
    "`kill -9 PID` of the driver (its pool workers are not signalled) must not leave the DB locked."
    out = tmp_path/'out'
    first = runs(slow_src, out, *SLOW_ARGS)
    assert first.wait_for(lambda o: n_files(o) >= 10), first.stdout
    first.kill(group=False)
    assert first.wait() == -signal.SIGKILL
    time.sleep(0.5)
    r = run_cli(slow_src, out, *SLOW_ARGS)
    assert 'in use by another run' not in r.stderr, f"stale lock after kill -9 of the driver: {r.stderr.strip()}"
    ok(r)
    assert_same_state(out, reference)

# ----------------------------------------------------------------------------------------------------------------------
# Incremental runs on a small corpus

SMALL_N = 12

@pytest.fixture
def small(tmp_path):
    "A small corpus (12 images incl. one 3-frame file, plus a junk and a no-pixel file) and an output folder."
    return make_corpus(tmp_path/'src', SMALL_N, 32, multi_every=12, frames=3), tmp_path/'out'

def run_small(src, out, *extra):
    return run_cli(src, out, '--workers', '0', *extra)

def inodes(out) -> dict:
    "PNG path -> (inode, mtime_ns): changes whenever a PNG is (re)written."
    return {p: ((out/p).stat().st_ino, (out/p).stat().st_mtime_ns) for p in pngs(out)}

def test_rerun_only_stats_unchanged_files(small, monkeypatch):
    "An unchanged, recorded file is skipped without being opened; a touched one is reprocessed."
    src, out = small
    preprocess(src, out, n_workers=0, quiet=True)
    touched = next(src.rglob('im0004.dcm'))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    opened, real_open, real_is_dicom, real_read = [], builtins.open, dicom_prep.sources.is_dicom, dicom_prep.preprocess.read_dicom
    def spy(f, name):
        def wrapper(p, *a, **kw):
            if Path(str(p)).is_relative_to(src): opened.append((name, Path(p)))
            return f(p, *a, **kw)
        return wrapper
    monkeypatch.setattr(builtins, 'open', spy(real_open, 'open'))
    monkeypatch.setattr(dicom_prep.sources, 'is_dicom', spy(real_is_dicom, 'is_dicom'))
    monkeypatch.setattr(dicom_prep.preprocess, 'read_dicom', spy(real_read, 'read_dicom'))
    r = preprocess(src, out, n_workers=0, quiet=True)
    assert {p for _, p in opened} == {touched}, opened
    assert ('read_dicom', touched) in opened
    assert r.counts == {'ok': 1, 'unchanged': n_sources(src) - 2}          # the junk file stays failed, unopened

def test_batch_size_sets_files_per_commit(small, monkeypatch):
    src, out = small
    sizes, real = [], dicom_prep.preprocess.write_batch
    def spy(db, batch, *a, **kw): sizes.append(len(batch)); return real(db, batch, *a, **kw)
    monkeypatch.setattr(dicom_prep.preprocess, 'write_batch', spy)
    preprocess(src, out, n_workers=0, quiet=True, batch_size=5)
    assert sizes == [5, 5, 4]
    assert inspect.signature(preprocess).parameters['batch_size'].default == 100
    assert re.search(r'--batch-size \(int\)\s+Files per database commit \[default: 100\]',
                     subprocess.run([CLI, '--help'], capture_output=True, text=True).stdout)

def test_changed_new_and_gone_files(small):
    "Changed file: old rows and PNGs replaced; new file: added; gone file: reported, then forgotten with --prune."
    src, out = small
    ok(run_small(src, out))
    before = snapshot(out)
    changed = next(src.rglob('im0002.dcm'))
    synth_dicom(changed, 32, 32, frames=3, seed=99)                        # one frame → three frames
    synth_dicom(src/'study_07'/'new.dcm', 32, 32, seed=100)
    gone = next(src.rglob('im0004.dcm')); gone_name = f"images/{gone.parent.name}/im0004.png"
    assert gone_name in before['pngs']
    gone.unlink()
    r = ok(run_small(src, out))
    assert processed(r) == 2
    assert '1 recorded files are gone from disk (use --prune to forget them)' in r.stdout
    stem = f"images/{changed.parent.name}/im0002"
    after = pngs(out)
    assert f"{stem}.png" not in after and all(f"{stem}_frame{i:04d}.png" in after for i in range(3))
    assert query(out, 'select count(*), max(num_frames) from images where source_path=?', [rel(src, changed)]) == [(3, 3)]
    assert "images/study_07/new.png" in after
    assert gone_name in after and query(out, 'select status from files where path=?', [rel(src, gone)]) == [('ok',)]
    check_consistent(out)
    r = ok(run_small(src, out, '--prune'))
    assert processed(r) == 0 and 'Pruned 1 files' in r.stdout
    assert gone_name not in pngs(out)
    assert not query(out, 'select 1 from files where path=?', [rel(src, gone)])
    assert not query(out, 'select 1 from images where source_path=?', [rel(src, gone)])
    check_consistent(out)

def test_touched_source_is_reprocessed_and_others_untouched(small):
    src, out = small
    ok(run_small(src, out))
    before, ino = snapshot(out), inodes(out)
    f = next(src.rglob('im0006.dcm'))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 5 * 10**9))
    r = ok(run_small(src, out))
    assert processed(r) == 1 and 'Resuming: 13 of 14 files already processed, 1 failed earlier (use --retry-failed)' in r.stdout
    after = inodes(out)
    redone = {p for p in ino if ino[p] != after[p]}
    assert redone == {f"images/{f.parent.name}/im0006.png"}
    assert snapshot(out)['images'] == before['images']
    assert query(out, 'select mtime_ns from files where path=?', [rel(src, f)]) == [(f.stat().st_mtime_ns,)]

def test_force_reprocesses_everything(small):
    src, out = small
    ok(run_small(src, out))
    before, ino = snapshot(out), inodes(out)
    r = ok(run_small(src, out, '--force'))
    assert processed(r) == n_sources(src)
    after = inodes(out)
    assert all(ino[p] != after[p] for p in ino), "--force must rewrite every image"
    assert snapshot(out) == before

def test_failed_files_are_kept_unless_retry_failed(small):
    src, out = small
    big = next(src.rglob('im0009.dcm'))
    synth_dicom(big, 64, 64, seed=9)
    ok(run_small(src, out, '--max-pixels', '3500'))                       # 64x64 > 3500 >= 32x32x3: too_large
    assert query(out, 'select status from files where path=?', [rel(src, big)]) == [('too_large',)]
    n = n_sources(src)
    r = ok(run_small(src, out))
    assert processed(r) == 0
    assert f'Resuming: {n} of {n} files already processed, 2 failed earlier (use --retry-failed)' in r.stdout
    assert query(out, 'select status from files where path=?', [rel(src, big)]) == [('too_large',)]
    r = ok(run_small(src, out, '--retry-failed'))
    assert processed(r) == 2                                             # the too-large file and the junk file
    assert query(out, 'select status from files where path=?', [rel(src, big)]) == [('ok',)]
    assert 'Resuming:' in r.stdout and 'failed earlier' not in r.stdout     # they are being retried: none is kept failed
    check_consistent(out)

def test_verify_regenerates_missing_and_broken_images(small):
    src, out = small
    ok(run_small(src, out))
    before, ino = snapshot(out), inodes(out)
    names = sorted(before['pngs'])
    truncated = next(p for p in names if '_frame0001' in p)                 # one frame of a 3-frame file
    deleted, garbage = names[0], [p for p in names if '_frame' not in p][-1]
    (out/deleted).unlink()
    (out/truncated).write_bytes((out/truncated).read_bytes()[:40])
    (out/garbage).write_bytes(b'\0' * 100)
    r = ok(run_small(src, out))
    assert processed(r) == 0, "a plain rerun only stats the sources"
    r = ok(run_small(src, out, '--verify'))
    assert processed(r) == 3 and '--verify: 3 files had missing or broken images and were redone' in r.stdout
    assert snapshot(out) == before
    after = inodes(out)
    redone = {deleted, garbage} | {p for p in ino if p.startswith(truncated.split('_frame')[0])}
    assert {p for p in ino if ino[p] != after[p]} == redone, "only the bad files are redone"
    check_consistent(out)

def test_verify_counts_only_files_it_redoes(small):
    "A broken image whose source is gone is not counted as redone (--prune forgets it, --verify does not redo it)."
    src, out = small
    ok(run_small(src, out))
    rows = query(out, "select source_path, thumbnail_path from images where num_frames = 1 order by filename")[:3]
    for _, png in rows: (out/png).unlink()
    (src/rows[0][0]).unlink()                                             # that file left the tree
    r = ok(run_small(src, out, '--verify', '--prune'))
    assert processed(r) == 2 and '--verify: 2 files had missing or broken images and were redone' in r.stdout, r.stdout
    check_consistent(out)

# ----------------------------------------------------------------------------------------------------------------------
# Settings guard

def test_settings_change_is_refused_with_both_values_and_both_ways_out(small):
    src, out = small
    ok(run_small(src, out, '--image-size', '16'))
    before, ino = snapshot(out), inodes(out)
    r = run_small(src, out, '--image-size', '24')
    assert r.returncode == 2 and not r.stdout.count('Processing')
    msg = r.stderr
    assert 'image_size: 16 in the database, 24 now' in msg and '--force' in msg and '--output-dir' in msg and '--db' in msg, msg
    assert len(msg.strip().splitlines()) == 1
    assert snapshot(out) == before and inodes(out) == ino and len(query(out, 'select id from runs')) == 1
    r = ok(run_small(src, out, '--image-size', '24', '--force'))
    assert processed(r) == n_sources(src)
    assert {max(Image.open(out/p).size) for p in pngs(out)} == {24}
    assert processed(ok(run_small(src, out, '--image-size', '24'))) == 0      # the new settings are now the recorded ones                     # the new settings are now the recorded ones

def test_different_source_root_is_refused(small, tmp_path):
    src, out = small
    ok(run_small(src, out))
    other = tmp_path/'other'
    shutil.copytree(src, other)
    r = run_small(other, out)
    assert r.returncode == 2
    assert f'source root: {src} in the database, {other} now' in r.stderr and '--force' in r.stderr, r.stderr
    assert len(query(out, 'select id from runs')) == 1

# ----------------------------------------------------------------------------------------------------------------------
# Corrupt or foreign state

def _random_bytes(db): db.write_bytes(os.urandom(db.stat().st_size))
def _truncated(db): db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
def _damaged_pages(db):
    b = bytearray(db.read_bytes()); b[4096:] = os.urandom(len(b) - 4096); db.write_bytes(bytes(b))
def _foreign_sqlite(db):
    "Another tool's SQLite file that also keeps a schema_version in a meta table."
    db.unlink()
    with closing(sqlite3.connect(db)) as c, c:
        c.execute('create table meta(key text primary key, value text)'); c.execute("insert into meta values ('schema_version', '\"2.1\"')")

@pytest.mark.parametrize('damage', [_random_bytes, _truncated, _damaged_pages, _foreign_sqlite],   # a newer schema is refused: test_paths
                         ids=lambda f: f.__name__.strip('_'))
def test_corrupt_db_is_moved_aside_and_rebuilt(damage, small):
    src, out = small
    ok(run_small(src, out))
    db = out/'dicom_prep.db'
    assert not Path(f'{db}-wal').exists() or Path(f'{db}-wal').stat().st_size == 0
    before, ino = snapshot(out), inodes(out)
    damage(db)
    bad = db.read_bytes()
    r = ok(run_small(src, out))
    aside = list(out.glob('dicom_prep.db.corrupt-*'))
    assert [p.name for p in aside if not p.name.endswith(('-wal', '-shm'))], f"nothing moved aside: {r.stderr}"
    assert any(p.read_bytes() == bad for p in aside)
    assert 'moved aside' in r.stderr and 'dicom_prep.db' in r.stderr
    assert snapshot(out) == before                                           # the same images, byte for byte ...
    after = inodes(out)                                                      # ... written again: no row vouches for the old ones
    assert after.keys() == ino.keys() and all(after[k] != ino[k] for k in ino), "an image without its row must not be trusted"
    assert query(out, 'PRAGMA quick_check') == [('ok',)]
    assert query(out, "select value from meta where key='schema_version'") == [(str(SCHEMA_VERSION),)]

def test_damage_deep_in_the_db_fails_one_run_then_is_moved_aside(small):
    "A damaged page the open check does not read (an index's): the run that meets it fails in one line, the next rebuilds."
    src, out = small
    ok(run_small(src, out))
    db = out/'dicom_prep.db'
    with closing(sqlite3.connect(db)) as c:
        root, size = c.execute("select rootpage from sqlite_master where name = 'sqlite_autoindex_files_1'").fetchone()[0], c.execute('PRAGMA page_size').fetchone()[0]
    b = bytearray(db.read_bytes()); b[(root - 1) * size:root * size] = os.urandom(size); db.write_bytes(bytes(b))
    r = run_small(src, out)
    assert r.returncode == 1 and 'is damaged' in r.stderr and r.stderr.strip().count('\n') == 0, r.stderr
    assert Path(f'{db}.suspect').exists()
    r = ok(run_small(src, out))
    assert 'moved aside' in r.stderr and not Path(f'{db}.suspect').exists()
    assert query(out, 'PRAGMA quick_check') == [('ok',)]
    check_consistent(out)

# ----------------------------------------------------------------------------------------------------------------------
# dicom_prep_status

def test_status_reports_counts_runs_errors_and_exports_csv(small, tmp_path):
    src, out = small
    ok(run_small(src, out))
    touched = next(src.rglob('im0001.dcm'))
    os.utime(touched, ns=(0, 10**18))
    ok(run_small(src, out))
    db = out/'dicom_prep.db'
    mtime = db.stat().st_mtime_ns
    r = ok(subprocess.run([STATUS, '--db', str(db), '--errors', '--csv', str(tmp_path/'files.csv')], capture_output=True, text=True))
    text = r.stdout
    for status, n in query(out, 'select status, count(*) from files group by status'): assert f'  {status}: {n:,}' in text
    for split, n in query(out, 'select split, count(*) from images group by split'): assert f'  {split}: {n:,}' in text
    for mod, n in query(out, 'select modality, count(*) from images group by modality'): assert f'  {mod}: {n:,}' in text
    for st, n in query(out, 'select study_id, count(*) from images group by study_id'): assert f'  {st}: {n:,}' in text
    assert re.search(r'#2 preprocess .* completed, \d+s, 1 files read', text) and re.search(r'#1 preprocess .* completed, \d+s, 14 files read, [\d.]+ files/s', text), text
    [(path, status, error)] = query(out, f'select path, status, error from files where status in {FAILED}')
    assert f'1 × {status}: {error}' in text
    assert f'  {path}: {status}: {error}' in text.split('Failed files:')[1]
    with open(tmp_path/'files.csv') as f: rows = list(csv.DictReader(f))
    assert sorted(r['path'] for r in rows) == sorted(p for p, in query(out, 'select path from files'))
    assert {r['path']: r['status'] for r in rows}[path] == status
    assert db.stat().st_mtime_ns == mtime, "status must not write to the database"


# ----------------------------------------------------------------------------------------------------------------------
# Every output written on purpose: a PNG without its row is never trusted (kill -9, then the sources change)

def test_kill_then_edit_and_delete_sources_leaves_no_stale_or_orphan_image(tmp_path, runs):
    "PNGs written before a kill -9 have no rows; after their sources are edited or deleted, the rerun's images are exactly a clean run's."
    src = make_corpus(tmp_path/'src', 60, 256)
    out = tmp_path/'out'
    run = runs(src, out, '--workers', '2', '--batch-size', '1000')            # nothing is committed before the kill
    assert run.wait_for(lambda o: len(list((o/'images').rglob('*.png'))) >= 20), run.stderr
    run.kill(); run.wait()
    written = {p.relative_to(out/'images').as_posix() for p in (out/'images').rglob('*.png')}
    assert written and count(out, 'select count(*) from images') in (0, -1)  # PNGs on disk, no rows
    changed = 0
    for p in sorted(src.rglob('*')):
        name = f"{p.relative_to(src).parent}/{p.name.removesuffix('.dcm')}.png"
        if name in written and p.is_file():
            if changed % 2: p.unlink()                                         # deleted source: its PNG is an orphan
            else: synth_dicom(p, 256, 256, seed=10_000 + changed)              # edited source: its PNG is stale
            changed += 1
    assert changed >= 4
    ok(run_cli(src, out, '--workers', '2'))
    clean = tmp_path/'clean'
    ok(run_cli(src, clean, '--workers', '2'))
    assert pngs(out) == pngs(clean)
    assert sorted(query(out, f'select {IMAGE_COLS} from images')) == sorted(query(clean, f'select {IMAGE_COLS} from images'))
