"""The run skeleton under real faults: a full disk (a small tmpfs where it can be mounted, else an injected ENOSPC),
a database locked by another writer, a hard interrupt inside a transaction, and the CLI's refusals."""
import contextlib, errno, os, subprocess, sys, time

import pytest
import sqlite_utils

import dicom_prep.db, dicom_prep.preprocess
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.preprocess import preprocess
from dicom_prep.run import RunFailed, resume_hint
from dicom_prep.sheet import output_dir
from dicom_prep.synth import synth_ct, synth_series
from conftest import console_script, query


def _corpus(root, n=40, size=128):
    for i in range(n): synth_ct(root/f'study_{i % 4}/im{i:03d}.dcm', size, seed=i)
    return root


def _cli(*args, env=None, timeout=300):
    return subprocess.run(console_script('dicom_prep_preprocess') + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env and {**os.environ, **env})


@pytest.fixture
def tmpfs(tmp_path):
    "A 300 KB tmpfs (skip where mounting is not allowed); unmounted afterwards."
    mnt = tmp_path/'small'; mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', str(mnt)], capture_output=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)])


def _assert_clean_failure(r, out, db, where):
    "One line, exit 1, run recorded failed with the reason, no source file recorded failed."
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith('dicom_prep_preprocess: error: run failed: ') and where in lines[-1], r.stderr
    assert 'Traceback' not in r.stderr
    [(status, error)] = query(db, 'select status, error from runs')
    assert status == 'failed' and where in error
    assert query(db, "select count(*) from files where status != 'ok'") == [(0,)]


def test_full_images_disk_is_not_a_file_failure(tmp_path, tmpfs):
    "Images on a tiny tmpfs, DB elsewhere: the run stops with one line and exit 1; after space is freed a plain rerun completes."
    src, db = _corpus(tmp_path/'src', 40, 256), tmp_path/'db'/'index.db'          # about 2 MB of PNGs for 300 KB
    r = _cli('--dicom-dir', src, '--output-dir', tmpfs, '--db', db, '--workers', '2', '--batch-size', '5')
    _assert_clean_failure(r, tmpfs, db, 'No space left on device')
    done = query(db, 'select count(*) from files')[0][0]
    assert done < 40
    subprocess.run(['mount', '-o', 'remount,size=20m', str(tmpfs)], check=True)
    r = _cli('--dicom-dir', src, '--output-dir', tmpfs, '--db', db, '--workers', '2')
    assert r.returncode == 0, r.stderr
    assert query(db, "select status, count(*) from files group by status") == [('ok', 40)]
    assert len(list((tmpfs/'images').rglob('*.png'))) == 40 and not list((tmpfs/'images').rglob('.*'))


def _enospc_after(n):
    "A save_png that fills the disk after `n` PNGs."
    real, count = dicom_prep.preprocess.save_png, [0]
    def save(img, path, compress_level=6, **kw):
        count[0] += 1
        if count[0] > n: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(img, path, compress_level, **kw)
    return save


def test_injected_enospc_everywhere(tmp_path, monkeypatch):
    "The same without a tmpfs: ENOSPC from the PNG writer stops the run as failed; nothing is recorded as a file failure."
    src, out = _corpus(tmp_path/'src', 12, 32), tmp_path/'out'
    monkeypatch.setattr(dicom_prep.preprocess, 'save_png', _enospc_after(5))
    with pytest.raises(RunFailed, match='No space left on device'): preprocess(src, out, n_workers=0, quiet=True, batch_size=2)
    assert query(out, 'select status from runs') == [('failed',)]
    assert query(out, "select count(*) from files where status != 'ok'") == [(0,)]
    monkeypatch.undo()
    r = preprocess(src, out, n_workers=0, quiet=True)
    assert r.status == 'completed' and r.counts.get('ok', 0) + r.counts.get('unchanged', 0) == 12


def test_db_locked_by_another_writer(tmp_path):
    "Another process holds a write transaction: the run waits the busy timeout, then one line, exit 1, the run recorded failed."
    src, out = _corpus(tmp_path/'src', 8, 32), tmp_path/'out'
    assert _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    (src/'study_0/new.dcm').write_bytes((src/'study_0/im000.dcm').read_bytes())
    holder = subprocess.Popen([sys.executable, '-c', f"import sqlite3, time; c = sqlite3.connect({str(out/'dicom_prep.db')!r}, isolation_level=None); "
                               "c.execute('begin immediate'); print('locked', flush=True); time.sleep(4); c.execute('commit')"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    t = time.monotonic()
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0', env={'DICOM_PREP_BUSY_TIMEOUT': '1.5'})
    holder.wait()
    assert r.returncode == 1 and 'database is locked' in r.stderr and r.stderr.strip().count('\n') == 0, r.stderr
    assert time.monotonic() - t < 30
    assert str(out/'dicom_prep.db') in r.stderr                                           # one line says which database
    assert 'running' not in [s for s, in query(out, 'select status from runs order by id')]
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0')
    assert r.returncode == 0 and query(out, 'select status from runs order by id desc limit 1') == [('completed',)]


def test_hard_interrupt_inside_a_transaction_is_recorded_interrupted(tmp_path, monkeypatch):
    "A second Ctrl+C landing between a batch's BEGIN and its try: the run is still recorded `interrupted`, not left `running`."
    src, out = _corpus(tmp_path/'src', 6, 32), tmp_path/'out'
    db_class = dicom_prep.db.database_class()
    real_atomic, real_tasks, armed = db_class.atomic, dicom_prep.preprocess._tasks, []
    @contextlib.contextmanager
    def atomic(self):
        if armed: armed.clear(); self.conn.execute('BEGIN IMMEDIATE'); raise KeyboardInterrupt     # the race: BEGIN done, try not entered
        with real_atomic(self) as db: yield db
    def tasks(*a, **kw): armed.append(1); return real_tasks(*a, **kw)                   # arm it for the first batch commit
    monkeypatch.setattr(db_class, 'atomic', atomic)
    monkeypatch.setattr(dicom_prep.preprocess, '_tasks', tasks)
    with pytest.raises(KeyboardInterrupt): preprocess(src, out, n_workers=0, quiet=True)
    assert query(out, 'select status from runs') == [('interrupted',)]


def test_resume_hint_drops_force(monkeypatch):
    "Resuming an interrupted --force rebuild must not restart it: the hint leaves --force out (the rebuild is pending anyway)."
    monkeypatch.setattr(sys, 'argv', ['/usr/bin/dicom_prep_nifti', '--dicom-dir', 'my data', '--force-reprocess', '--workers', '4'])
    assert resume_hint() == "dicom_prep_nifti --dicom-dir 'my data' --workers 4"
    monkeypatch.setattr(sys, 'argv', ['dicom_prep_preprocess', '--force', '--dicom-dir', 'x'])
    assert resume_hint() == 'dicom_prep_preprocess --dicom-dir x'


def test_pipelines_keep_their_own_output_folders(tmp_path):
    "preprocess into A and nifti into B on one database: the sheet still finds A's PNGs (nifti must not take over output_dir)."
    src = tmp_path/'src'
    synth_series(src/'s', n=4)
    db = tmp_path/'shared.db'
    preprocess(src, tmp_path/'A', db_path=db, n_workers=0, quiet=True)
    dicom_to_nifti(src, tmp_path/'B', db_path=db, n_workers=0, quiet=True)
    assert output_dir(sqlite_utils.Database(db)) == (tmp_path/'A').absolute()


@pytest.mark.parametrize('args,msg', [(('--batch-size', '0'), '--batch-size'), (('--png-level', '42'), '--png-level'),
                                      (('--file-timeout', '-1'), '--file-timeout'), (('--workers', '-1'), '--workers')])
def test_numbers_are_checked_before_any_work(tmp_path, args, msg):
    src = _corpus(tmp_path/'src', 2, 16)
    r = _cli('--dicom-dir', src, '--output-dir', tmp_path/'out', *args)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


def test_db_that_is_a_folder_is_refused(tmp_path):
    src = _corpus(tmp_path/'src', 2, 16); (tmp_path/'dbdir').mkdir()
    r = _cli('--dicom-dir', src, '--output-dir', tmp_path/'out', '--db', tmp_path/'dbdir')
    assert r.returncode == 2 and 'is a folder' in r.stderr and not (tmp_path/'dbdir.lock').exists()


def test_one_output_folder_one_database(tmp_path):
    "A run with another --db on an existing output folder is refused (it would record settings for images it did not make)."
    src, out = _corpus(tmp_path/'src', 4, 16), tmp_path/'out'
    assert _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    r = _cli('--dicom-dir', src, '--output-dir', out, '--db', tmp_path/'other.db', '--window', 'lungs', '--workers', '0')
    assert r.returncode == 2 and 'belongs to the database' in r.stderr and str(out/'dicom_prep.db') in r.stderr and r.stderr.count('\n') == 1
    assert not (tmp_path/'other.db').exists()
    assert query(out, 'select count(*) from runs') == [(1,)]
    r = _cli('--dicom-dir', src, '--output-dir', out, '--db', tmp_path/'other.db', '--window', 'lungs', '--workers', '0', '--force')
    assert r.returncode == 0 and query(tmp_path/'other.db', "select distinct window from images") == [('lungs:-600/1500',)]


def test_status_reads_the_private_state_of_a_pseudonymised_index(tmp_path):
    "dicom_prep_status (report and --csv) finds the files of a pseudonymised index in its private state beside the folder."
    src, out = _corpus(tmp_path/'src', 3, 16), tmp_path/'out'
    assert _cli('--dicom-dir', src, '--output-dir', out, '--pseudonymize', '--workers', '0').returncode == 0
    r = subprocess.run(console_script('dicom_prep_status') + ['--db', str(out/'dicom_prep.db'), '--csv', str(tmp_path/'f.csv')],
                       capture_output=True, text=True)
    assert r.returncode == 0 and 'Files by status' in r.stdout and 'ok: 3' in r.stdout, r.stderr
    assert len((tmp_path/'f.csv').read_text().splitlines()) == 4
