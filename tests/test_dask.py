"""The Dask executor end to end, on a real LocalCluster (2 worker processes, 1 thread each): same DB and images as
the fastcore path, lost workers retried, a worker-killing file recorded `crashed`, hung files, back-pressure,
interrupt + resume through the CLI, and a library that imports without Dask. Every test runs under a deadline:
past it, it fails, and the processes it started and the cluster's workers are killed (section "no test hangs the suite")."""
import faulthandler, hashlib, itertools, os, signal, sqlite3, subprocess, sys, tempfile, threading, time, uuid
from collections import Counter
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager, suppress
from pathlib import Path

import cloudpickle, dask, numpy as np, psutil, pydicom, pytest
import nibabel as nib
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from dicom_prep.nifti import dicom_to_nifti
from conftest import console_script, query
from dicom_prep.synth import synth_series
from dicom_prep.dask_backend import _KEEP_LOST_WORKERS, dask_client
from dicom_prep.parallel import Chunker, TaskFailure, run_tasks
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker plugins defined here reach the workers by value
DASK_EXTRA = "pip install 'dicom_prep[dask]'"

# ---------------------------------------------------------------- corpora and snapshots

def ct_corpus(root, n, size=64):
    "`n` single-frame CT files of `size`² spread over 4 studies and 2 series each."
    for i in range(n): synth_dicom(root/f"study_{i % 4:02d}/series{i % 2}/IM{i:04d}.dcm", rows=size, cols=size, seed=i, patient=f"P{i % 4}")
    return root

def mixed_corpus(root):
    "CT, multi-frame MR, MONOCHROME1 CR, and one file of each failure a worker reports as data."
    ct_corpus(root, 30)
    for i in range(3): synth_dicom(root/f"study_mr/cine{i}.dcm", rows=48, cols=40, frames=3, modality='MR', patient='P9', seed=100 + i)
    synth_dicom(root/'study_cr/chest.dcm', rows=80, cols=64, modality='CR', photometric='MONOCHROME1', patient='P8')
    synth_dicom(root/'study_cr/report.dcm', pixels=False, patient='P8')
    (root/'study_cr/garbage.dcm').write_bytes(b'not a dicom file' * 8)
    bad = synth_dicom(root/'study_cr/truncated.dcm', rows=32, cols=32, patient='P8')
    ds = pydicom.dcmread(bad); ds.PixelData = ds.PixelData[:100]; ds.save_as(bad)
    return root

VOLATILE = {'created_at', 'processed_at', 'run_id'}

def rows(db_path, table, drop=VOLATILE) -> list:
    "Sorted rows of `table`, as (column, value) tuples, without the columns in `drop` (those that differ between two runs)."
    with closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        return sorted(tuple((k, r[k]) for k in r.keys() if k not in drop) for r in db.execute(f'select * from {table}'))

def snapshot(out) -> dict:
    "What a preprocess run leaves: `files` and `images` rows, and a digest of every (non-temporary) PNG by relative path."
    db = Path(out)/'dicom_prep.db'
    pngs = {p.relative_to(out).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in (Path(out)/'images').rglob('*.png') if not p.name.startswith('.')}
    return dict(files=rows(db, 'files'), images=rows(db, 'images'), pngs=pngs)


def n_files_recorded(db_path) -> int:
    "Rows in `files` so far (0 before the DB exists); safe to call while a run writes (WAL)."
    try: return query(db_path, 'select count(*) from files')[0][0]
    except sqlite3.OperationalError: return 0

@pytest.fixture(scope='module')
def corpus(tmp_path_factory): return mixed_corpus(tmp_path_factory.mktemp('mixed'))

@pytest.fixture(scope='module')
def fastcore_out(corpus, tmp_path_factory):
    "The reference: `corpus` preprocessed on the default executor (fastcore pool, 2 workers)."
    out = tmp_path_factory.mktemp('fastcore')
    assert preprocess(corpus, out, quiet=True).status == 'completed'
    return out

# ---------------------------------------------------------------- no test hangs the suite
# Each test runs under a deadline (the autouse `_deadline`). Past it the watchdog, a SIGALRM handler, prints every
# thread's stack to the test's stderr, SIGKILLs the processes the test started and this process's Dask workers, condemns
# the module's cluster (the next test gets a fresh one) and raises `DeadlineExceeded` in the test, again every few
# seconds should a `finally` on its way out block too. A test still not unwound `LAST_RESORT` s later (its main thread
# deaf to signals) ends the session, as pytest-timeout would: the stacks go to the terminal, the processes are killed.

DEADLINE = float(os.environ.get('DICOM_PREP_TEST_DEADLINE', 120))       # seconds per test, about 10x the slowest's
LAST_RESORT = float(os.environ.get('DICOM_PREP_TEST_LAST_RESORT', 60))  # then the session ends
CLOSE_WITHIN = 30.                                                      # seconds Dask gets to close the module's cluster

class DeadlineExceeded(SystemExit):
    "A test ran past its deadline. A SystemExit, which pytest reports as the test's failure, and which neither an"
    " `except Exception` nor the product's catch-alls (`except (KeyboardInterrupt, SystemExit): raise`) swallow."

def _has(p, word) -> bool:
    "Does a word of process `p`'s command line contain `word`?"
    try: return any(word in a for a in p.cmdline())
    except psutil.Error: return False

def dask_workers() -> list:
    "The Dask worker processes of the LocalClusters this process runs (their nannies spawn them)."
    return [p for p in psutil.Process().children() if _has(p, 'spawn_main')]

def descendants() -> dict:
    "This process's descendants, by (pid, start time)."
    out = {}
    for p in psutil.Process().children(recursive=True):
        with suppress(psutil.Error): out[p.pid, p.create_time()] = p
    return out

def started_since(before:dict) -> list:
    "This process's descendants not in `before` (a test's CLI runs, pools, clusters' workers), but multiprocessing's resource tracker."
    return [p for k, p in descendants().items() if k not in before and not _has(p, 'resource_tracker')]

def alive(p) -> bool:
    "Is psutil process `p` running (not dead, not a zombie waiting for its parent to reap it)?"
    try: return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error: return False

def kill(procs) -> int:
    "SIGKILL `procs` (psutil processes) and wait until they are dead (10 s at most); how many. Their parents reap them."
    procs = list({p.pid: p for p in procs}.values())
    for p in procs:
        with suppress(psutil.Error): p.kill()
    t_end = time.time() + 10
    while time.time() < t_end and any(map(alive, procs)): time.sleep(0.01)
    return len(procs)

def stacks() -> str:
    "Every thread's stack, as faulthandler prints them."
    with tempfile.TemporaryFile('w+') as f:
        faulthandler.dump_traceback(f, all_threads=True); f.seek(0)
        return f.read()

@contextmanager
def watchdog(seconds, what, on_expiry=lambda: None, capman=None):
    "Run the block under a deadline of `seconds`, as above; `what` names it, `on_expiry()` runs before the kills."
    t0, before = time.time(), descendants()
    def cleanup() -> int: on_expiry(); return kill(dask_workers() + started_since(before))
    def expire(signum, frame):
        print(f"+++ {what}: past its {seconds:g} s deadline; every thread's stack:\n{stacks()}", file=sys.stderr, flush=True)
        n = cleanup()
        signal.setitimer(signal.ITIMER_REAL, 5)                     # again in 5 s, should the way out block too
        raise DeadlineExceeded(f"{what} did not finish within its {seconds:g} s deadline; killed {n} processes "
                               "(its own and the Dask workers); stacks in its stderr")
    def last_resort():
        if capman: capman.suspend_global_capture(in_=True)
        print(f"\n+++ {what}: still running {LAST_RESORT:g} s past its {seconds:g} s deadline, deaf to signals; "
              f"ending the session\n{stacks()}", file=sys.stderr, flush=True)
        cleanup(); os._exit(2)
    old, timer = signal.signal(signal.SIGALRM, expire), threading.Timer(seconds + LAST_RESORT, last_resort)
    timer.daemon = True; timer.start()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)       # a watchdog inside another: the outer one's time left
    try: yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); timer.cancel(); signal.signal(signal.SIGALRM, old)
        if outer: signal.setitimer(signal.ITIMER_REAL, max(outer - (time.time() - t0), 0.01))

class ModuleCluster:
    "The module's LocalCluster, a stand-in for a remote cluster: started on first use, replaced once a deadline condemned it,"
    " and ended within `CLOSE_WITHIN` s, its surviving workers killed, whatever state it is in."
    def __init__(self): self.stack, self.client, self.condemned = None, None, False
    def condemn(self): self.condemned = True
    def get(self):
        if self.condemned: self.end()
        if self.client is None:
            with ExitStack() as stack:
                stack.enter_context(dask.config.set(_KEEP_LOST_WORKERS))    # configured as the product's own: see `dask_client`
                cl = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=':0'))
                self.client = stack.enter_context(Client(cl))
                self.stack = stack.pop_all()
        return self.client
    def end(self) -> int:
        "Close the cluster (Dask's close, in a thread given `CLOSE_WITHIN` s), then SIGKILL any worker that outlived it."
        stack, condemned, self.stack, self.client, self.condemned = self.stack, self.condemned, None, None, False
        def close():
            with suppress(Exception): stack.close()
        if stack is not None:
            closing = threading.Thread(target=close, daemon=True, name='close-module-cluster'); closing.start()
            closing.join(1 if condemned else CLOSE_WITHIN)      # a condemned cluster gets no grace: its workers die,
            kill(dask_workers()); closing.join(CLOSE_WITHIN)    # and its nannies, closing, restart none
        return kill(dask_workers())

@pytest.fixture(scope='module')
def _module_cluster():
    mc = ModuleCluster()
    yield mc
    mc.end()

@pytest.fixture(autouse=True)
def _deadline(request, _module_cluster):
    "Every test under its deadline (the cluster's start included); past it the module's cluster is condemned."
    capman = request.config.pluginmanager.getplugin('capturemanager')
    with watchdog(DEADLINE, request.node.nodeid, _module_cluster.condemn, capman):
        yield

@pytest.fixture
def cluster(_module_cluster):
    "A Client of the module's LocalCluster of 2 single-threaded worker processes, for the tests that pass its address as `scheduler`."
    return _module_cluster.get()

def worker_pids(client) -> dict: return client.run(os.getpid)

# ---------------------------------------------------------------- same results as fastcore

def test_local_cluster_matches_fastcore(corpus, fastcore_out, tmp_path):
    "`scheduler='local'` writes the same rows, statuses, errors and PNG bytes as the fastcore pool."
    r = preprocess(corpus, tmp_path, scheduler='local', quiet=True)
    ref = snapshot(fastcore_out)
    assert r.status == 'completed' and r.counts == {'ok': 34, 'not_image': 1, 'unreadable': 1, 'decode_error': 1}   # the report: not_image since issue 23
    assert r.n_images == len(ref['images']) == len(ref['pngs']) == 30 + 3*3 + 1
    assert snapshot(tmp_path) == ref
    assert query(tmp_path/'dicom_prep.db', 'select status, n_files from runs') == [('completed', 37)]

def test_address_rerun_is_idempotent(corpus, fastcore_out, cluster, tmp_path):
    "Through a scheduler address: same results; then an unchanged tree is skipped without touching the cluster's output."
    addr = cluster.scheduler.address
    assert preprocess(corpus, tmp_path, scheduler=addr, quiet=True).status == 'completed'
    first = snapshot(tmp_path)
    assert first == snapshot(fastcore_out)
    again = preprocess(corpus, tmp_path, scheduler=addr, quiet=True)
    assert again.status == 'completed' and again.counts == {'unchanged': 35}   # ok and not_image are final; failures are kept
    assert snapshot(tmp_path) == first

def test_nifti_matches_fastcore(cluster, tmp_path):
    "`dicom_to_nifti` on Dask: the same volumes table and the same voxels, affines and headers as the fastcore pool."
    src = tmp_path/'src'
    for k in range(3): synth_series(src/f"study_{k}/series", n=5 + k, rows=12, cols=10, series_number=k + 1, seed=k)
    synth_series(src/'study_0/gappy', n=6, positions=[(0, 0, z) for z in (0, 2, 4, 9, 11, 13)], series_number=9)
    outs = {}
    for name, sched in (('fastcore', None), ('dask', cluster.scheduler.address)):
        r = dicom_to_nifti(src, tmp_path/name, scheduler=sched, quiet=True)
        assert r.status == 'completed', r.summary()
        outs[name] = tmp_path/name
    vols = {n: rows(o/'dicom_prep.db', 'volumes', VOLATILE | {'analyzed_at', 'converted_at'}) for n, o in outs.items()}
    assert vols['dask'] == vols['fastcore'] and len(vols['dask']) == 4
    niis = {n: sorted(p.relative_to(o) for p in (o/'nifti').rglob('*.nii.gz')) for n, o in outs.items()}
    assert niis['dask'] == niis['fastcore'] and len(niis['dask']) >= 3
    for rel in niis['dask']:
        a, b = (nib.load(outs[n]/rel) for n in ('fastcore', 'dask'))
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_array_equal(a.affine, b.affine)
        assert a.header.binaryblock == b.header.binaryblock

# ---------------------------------------------------------------- lost workers

def kill_a_busy_worker(client, db_path, after:int, total:int, deadline=60.):
    "Once `after` files are recorded, SIGKILL a worker that has tasks assigned; return (files recorded then, its pid)."
    t_end = time.time() + deadline
    while (done := n_files_recorded(db_path)) < after or not (busy := [w for w, keys in client.processing().items() if keys]):
        assert time.time() < t_end and done < total, f"no worker to kill: {done} of {total} files recorded"
        time.sleep(0.01)
    victim = worker_pids(client)[busy[0]]
    os.kill(victim, signal.SIGKILL)
    return done, victim

def test_killed_worker_loses_nothing(cluster, tmp_path):
    "SIGKILL one Dask worker mid-run: the run completes, every file once and `ok`, identical to an undisturbed run."
    src, n = ct_corpus(tmp_path/'src', 160, size=128), 160
    ref = tmp_path/'ref'; preprocess(src, ref, quiet=True)
    out = tmp_path/'dask'
    with ThreadPoolExecutor(1) as ex:
        killing = ex.submit(kill_a_busy_worker, cluster, out/'dicom_prep.db', after=10, total=n)
        r = preprocess(src, out, scheduler=cluster.scheduler.address, batch_size=5, quiet=True)
        done_at_kill, victim = killing.result()
    cluster.wait_for_workers(2, timeout=60)
    assert victim not in worker_pids(cluster).values(), 'the killed worker is gone (the nanny started a new one)'
    assert done_at_kill < n, 'the kill landed mid-run'
    assert r.status == 'completed' and r.counts == {'ok': n}
    assert query(out/'dicom_prep.db', 'select count(*), count(distinct path), sum(status="ok") from files') == [(n, n, n)]
    assert query(out/'dicom_prep.db', 'select count(*), count(distinct sop_uid) from images') == [(n, n)]
    assert snapshot(out) == snapshot(ref)

def test_results_lost_with_their_workers_are_recomputed(cluster):
    "Results computed but not yet collected when their workers die are computed again, never dropped."
    pids = worker_pids(cluster)
    run = run_tasks(abs, range(-12, 0), workers=2, scheduler=cluster.scheduler.address)
    got = [next(run)]
    time.sleep(1)                      # the other tasks in flight finish; their results wait on the workers
    for pid in pids.values(): os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    got += list(run)
    cluster.wait_for_workers(2, timeout=60)
    assert sorted(item for item, _ in got) == list(range(-12, 0)) and all(res == -item for item, res in got)

class CrashOn(WorkerPlugin):
    "In each Dask worker: `read_dicom` of a path containing `marker` logs the worker's pid to `log`, then kills the process."
    name = 'crash-on-marker'
    def __init__(self, marker, log): self.marker, self.log = marker, str(log)
    def setup(self, worker):
        import dicom_prep.preprocess as pp
        self.real = real = pp.read_dicom
        def read_dicom(path, *args, **kwargs):
            if self.marker in str(path):
                with open(self.log, 'a') as f: f.write(f"{os.getpid()}\n")
                os._exit(13)
            return real(path, *args, **kwargs)
        pp.read_dicom = read_dicom
    def teardown(self, worker):
        import dicom_prep.preprocess as pp
        pp.read_dicom = self.real

def _reader_name():
    import dicom_prep.preprocess as pp
    return pp.read_dicom.__qualname__

def test_file_killing_every_worker_is_crashed(cluster, tmp_path):
    "A file that kills each worker it lands on is tried on at least `allowed-failures + 1` workers, then recorded `crashed`."
    src = ct_corpus(tmp_path/'src', 12)
    poison = synth_dicom(src/'study_01/POISON.dcm', rows=32, cols=32)
    deaths = tmp_path/'deaths.log'
    cluster.register_plugin(CrashOn('POISON', deaths))
    try:
        assert set(cluster.run(_reader_name).values()) == {'CrashOn.setup.<locals>.read_dicom'}, 'patched in every worker'
        assert _reader_name() == 'read_dicom', 'but not in the driver: only a Dask worker can die of it'
        r = preprocess(src, tmp_path/'out', scheduler=cluster.scheduler.address, quiet=True)
    finally:
        cluster.unregister_worker_plugin(CrashOn.name)
        cluster.wait_for_workers(2, timeout=60)
    assert r.status == 'completed' and r.counts == {'ok': 12, 'crashed': 1}
    (status, error), = query(tmp_path/'out/dicom_prep.db', f"select status, error from files where path='{poison.relative_to(src)}'")
    assert status == 'crashed' and 'KilledWorker' in error
    pids = deaths.read_text().split()
    assert len(pids) == len(set(pids)) >= dask.config.get('distributed.scheduler.allowed-failures') + 1, 'each try killed a fresh worker'
    assert set(cluster.run(_reader_name).values()) == {'read_dicom'}

def test_local_cluster_keeps_a_worker_slow_to_come_back():
    "Dask closes for good the nanny of a worker not registered again `lost-worker-timeout` after it was lost. With that timer"
    " far shorter than a restart (as it was on a busy machine, where a restart takes seconds and a poison file causes one"
    " after another), the product's LocalCluster still gets its worker back."
    with dask.config.set({'distributed.deploy.lost-worker-timeout': '50ms'}), dask_client('local', workers=1) as c:
        (addr, first), = worker_pids(c).items()
        os.kill(first, signal.SIGKILL)
        t_end = time.time() + 30
        while addr in c.scheduler_info()['workers']:      # the scheduler saw it go: Dask's timer starts now
            assert time.time() < t_end, 'the killed worker was never removed'
            time.sleep(0.02)
        c.wait_for_workers(1, timeout=30)
        time.sleep(0.2)                                     # well past Dask's timer
        assert len(c.cluster.workers) == 1, 'the nanny is still there'
        assert first not in worker_pids(c).values()

def _lock_for_12(x):
    "Item 12 gives a result that cannot travel back to the driver; the others their negation."
    import threading
    return threading.Lock() if x == 12 else -x

def test_chunk_failing_whole_costs_only_its_bad_item(cluster):
    "A chunk whose results cannot come back fails as a whole: its items are retried one by one, and only the bad one fails."
    res = dict(run_tasks(_lock_for_12, range(24), workers=2, scheduler=cluster.scheduler.address))
    assert sorted(res) == list(range(24)), 'every item came back once'
    bad = res.pop(12)
    assert isinstance(bad, TaskFailure) and bad.status == 'error' and 'serialize' in bad.message, bad
    assert 'cannot pickle' in bad.message and '\n' not in bad.message, 'one line, naming the root cause'
    assert res == {x: -x for x in res}      # item 12 travelled in a chunk of several (chunks grow 1, 2, 4, 8 ...), all returned

# ---------------------------------------------------------------- hung files and back-pressure

def test_hung_file_costs_only_itself(cluster):
    "As locally: a file over `timeout` is reported `timeout`; the files queued behind it still run and succeed."
    items, t0 = [8.] * 2 + [0.2] * 6, time.time()
    res = list(run_tasks(time.sleep, items, workers=2, timeout=3, scheduler=cluster.scheduler.address))
    time.sleep(max(0, t0 + 8.5 - time.time()))   # a thread Dask could not stop is free again: the next test gets both workers
    assert sorted(r.status if isinstance(r, TaskFailure) else 'ok' for _, r in res) == ['ok'] * 6 + ['timeout'] * 2, res

def _sleep_noting(log, x):
    "Sleep `x` seconds, noting first in `log` that item `x` started (one line per start)."
    with open(log, 'a') as f: f.write(f"{x!r}\n")
    time.sleep(x)

def test_hung_file_inside_a_chunk_hangs_only_once(cluster, tmp_path):
    "A file that hangs inside a chunk of several is recorded `timeout` after one timeout, not retried; its chunk's other files are,"
    " and its thread, free at last, does not run them again."
    log, hang = tmp_path/'starts', 5.
    items, t0 = [0.02 + i * 1e-6 for i in range(41)] + [hang] + [0.021 + i * 1e-6 for i in range(20)], time.time()
    res = dict(run_tasks(partial(_sleep_noting, log), items, workers=2, timeout=2, scheduler=cluster.scheduler.address))
    time.sleep(max(0, t0 + hang + 1.5 - time.time()))   # the thread Dask could not stop is free again (and the next test gets it)
    assert sorted(res) == sorted(items), 'every item came back once'
    bad = res.pop(hang)
    assert isinstance(bad, TaskFailure) and bad.status == 'timeout', bad
    assert all(r is None for r in res.values()), res
    starts = Counter(float(x) for x in log.read_text().split())
    assert starts[hang] == 1, f"the hung file ran {starts[hang]} times"
    assert 2 in starts.values(), 'the files run before it in its chunk were retried: it travelled in a chunk of several'
    assert all(starts[x] == 1 for x in items[42:]), 'the files after it ran once: the cancelled chunk stopped at the hung file'

def test_in_flight_is_bounded(cluster):
    "An endless stream of items never becomes an endless stream of futures; stopping drains what was submitted."
    consumed, got, most = 0, [], 0
    def items():
        nonlocal consumed
        for i in itertools.count(): consumed += 1; yield i
    for item, res in run_tasks(abs, items(), workers=2, scheduler=cluster.scheduler.address, should_stop=lambda: len(got) >= 200):
        assert res == item
        got.append(item); most = max(most, consumed - len(got))
    assert 0 < most <= 2 * 2 * Chunker().most, most     # the window (2 tasks per worker) x the largest chunk
    assert sorted(got) == list(range(consumed)), 'every submitted item came back once'

# ---------------------------------------------------------------- interrupt and resume through the CLI

def cli_command(src, out):
    return console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(out), '--scheduler', 'local', '--batch-size', '5']

@pytest.fixture(scope='module')
def big_corpus(tmp_path_factory):
    "Enough files that a Dask run is still going when it is interrupted, and its fastcore reference."
    src = ct_corpus(tmp_path_factory.mktemp('big'), 240, size=256)
    ref = tmp_path_factory.mktemp('big_ref'); preprocess(src, ref, quiet=True)
    return src, snapshot(ref)

@pytest.mark.parametrize('target', ['driver', 'process group'])
def test_interrupt_and_resume_cli(big_corpus, tmp_path, target):
    "SIGINT (to the driver, or to its process group as Ctrl+C does) → exit 130, run `interrupted`; the rerun completes the rest."
    src, ref = big_corpus
    out, db = tmp_path/'out', tmp_path/'out/dicom_prep.db'
    p = subprocess.Popen(cli_command(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t_end = time.time() + 90
        while n_files_recorded(db) < 10 and p.poll() is None and time.time() < t_end: time.sleep(0.02)
        assert p.poll() is None, f"finished before it could be interrupted:\n{p.communicate()[1][-2000:]}"
        if target == 'driver': p.send_signal(signal.SIGINT)
        else: os.killpg(p.pid, signal.SIGINT)
        try: stdout, stderr = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); stdout, stderr = p.communicate()
            pytest.fail(f"no exit within 20 s of SIGINT to the {target}; "
                        f"runs: {query(db, 'select status, n_files from runs')}\n{stderr[-1500:]}")
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == 130, stderr[-3000:]
    assert 'SIGINT: finishing files in flight' in stderr and 'INTERRUPTED after' in stdout
    (status1, n1), = query(db, 'select status, n_files from runs')
    assert status1 == 'interrupted' and 10 <= n1 < 240 and n_files_recorded(db) == n1
    r = subprocess.run(cli_command(src, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming: {n1:,} of 240 files already processed" in r.stdout
    runs = query(db, 'select status, n_files from runs order by id')
    assert runs == [('interrupted', n1), ('completed', 240 - n1)], 'nothing redone, nothing lost'
    assert snapshot(out) == ref

# ---------------------------------------------------------------- Dask is optional

NO_DASK = "import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"

def test_library_imports_without_dask(tmp_path):
    "With `dask`/`distributed` unimportable every module imports; asking for a scheduler names the extra to install."
    code = NO_DASK + """
import importlib, pkgutil, dicom_prep
mods = [m.name for m in pkgutil.iter_modules(dicom_prep.__path__)]
for m in mods: importlib.import_module(f'dicom_prep.{m}')
from dicom_prep.parallel import run_tasks
assert sum(1 for _ in run_tasks(abs, range(5), workers=2)) == 5
try: list(run_tasks(abs, [1], scheduler='local'))
except ImportError as e: print('ImportError:', e)
print('modules:', *mods)
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"ImportError: --scheduler needs Dask: {DASK_EXTRA}" in r.stdout
    assert {'core', 'sources', 'read', 'tags', 'pixels', 'db', 'parallel', 'preprocess', 'nifti', 'status', 'sheet', 'options', 'cli'} <= set(r.stdout.split('modules:')[1].split())
    src, cli = ct_corpus(tmp_path/'src', 2), tmp_path/'dicom_prep_preprocess'
    cli.write_text(NO_DASK + "from dicom_prep.preprocess import main\nmain()\n")
    r = subprocess.run([sys.executable, cli, '--dicom-dir', src, '--output-dir', tmp_path/'out', '--scheduler', 'local'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and DASK_EXTRA in r.stderr and 'Traceback' not in r.stderr, r.stderr

# ---------------------------------------------------------------- the watchdog itself

DEAF = """
import signal, subprocess, time
from test_dask import watchdog
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})     # a main thread deaf to signals, as in C code that ignores them
with watchdog(1, 'a deaf test'):
    subprocess.Popen(['sleep', '600'])                          # and a process it started
    time.sleep(600)
"""

def _tagged(tag) -> list:
    "Live processes whose environment carries `WATCHDOG_TAG=tag`."
    def has(p):
        try: return p.environ().get('WATCHDOG_TAG') == tag and alive(p)
        except psutil.Error: return False
    return [p for p in psutil.process_iter() if has(p)]

def test_watchdog_ends_a_test_hung_on_dask(cluster, _module_cluster, tmp_path):
    "Past its deadline a test blocked on Dask fails, named (`DeadlineExceeded`); the cluster's workers are killed, the cluster"
    " condemned and then ended at once. A test deaf to signals ends the session (a subprocess). Neither leaves a process."
    tag, log = uuid.uuid4().hex, tmp_path/'deaf.log'
    with open(log, 'w') as f:
        deaf = subprocess.Popen([sys.executable, '-c', DEAF], stdout=f, stderr=f, env={**os.environ, 'WATCHDOG_TAG': tag,
                                'PYTHONPATH': str(Path(__file__).parent), 'DICOM_PREP_TEST_LAST_RESORT': '1'})
    try:
        t_end = time.time() + 60                   # its `sleep` is running (so the watchdog below does not count it its own)
        while not any(_has(p, 'sleep') for p in _tagged(tag)): assert deaf.poll() is None and time.time() < t_end; time.sleep(0.05)
        workers = [psutil.Process(pid) for pid in worker_pids(cluster).values()]
        with pytest.raises(DeadlineExceeded, match=r"^a test hung on Dask did not finish within its 1 s deadline; killed [2-9] processes"):
            with watchdog(1, 'a test hung on Dask', _module_cluster.condemn):
                cluster.submit(time.sleep, 600, pure=False).result()
        assert _module_cluster.condemned and not any(map(alive, workers)), 'its workers killed, the cluster condemned'
        t0 = time.time(); _module_cluster.end()
        assert time.time() - t0 < 10 and not dask_workers(), 'a condemned cluster ends at once, with every worker'
        assert deaf.wait(timeout=60) == 2, log.read_text()[-3000:]
        assert not _tagged(tag), 'the process it started was killed'
        err = log.read_text()
        assert "+++ a deaf test: still running 1 s past its 1 s deadline, deaf to signals; ending the session" in err, err[-3000:]
        assert 'most recent call first' in err, 'its stacks shown'
    finally: kill(_tagged(tag))


def test_bad_scheduler_address_is_one_line_exit_2(tmp_path):
    "An address Dask cannot parse is unusable arguments: one line naming it, exit 2, not a traceback."
    synth_dicom(tmp_path/'in'/'a.dcm')
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(tmp_path/'in'), '--output-dir', str(tmp_path/'o'),
                       '--scheduler', 'bogus://head:8786'], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and 'bogus://head:8786' in err[0], r.stderr[-2000:]
