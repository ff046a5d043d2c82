"The labels table under real concurrency: several annotator processes and a long writer on one index, and an index made before labels."
import multiprocessing as mp, sqlite3, time
from contextlib import closing

import pytest

from dicom_prep.db import SCHEMA_VERSION, open_db
from dicom_prep.labels import image_labels, label_progress, labels_of, set_label, undo

N_IMAGES = 60


def _index(path):
    db = open_db(path)
    db['images'].insert_all([dict(filename=f"im{i}", series_uid=f"se{i // 10}", study_uid='st', split='train', thumbnail_path=f"images/im{i}.png")
                             for i in range(N_IMAGES)])
    db.close()
    return path


def _annotate(path, who, go):
    "Label every image (class by parity), undo every fifth action, each as its own short transaction."
    go.wait()
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        for i in range(N_IMAGES):
            set_label(conn, 'image', f"im{i}", 'even' if i % 2 == 0 else 'odd', who)
            if i % 5 == 4: set_label(conn, 'image', f"im{i}", 'wrong', who); undo(conn, who)


def _hog(path, go, seconds=0.15, rounds=8):
    "A preprocess-like writer: adds image rows in write transactions that each hold the lock for `seconds`."
    go.wait()
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as conn:
        for r in range(rounds):
            conn.execute('begin immediate')
            conn.execute("insert into images (filename, series_uid, study_uid, split) values (?, 'se_new', 'st', 'train')", [f"new{r}"])
            time.sleep(seconds)
            conn.execute('commit')


def test_annotators_and_a_writer_lose_nothing(tmp_path):
    path = _index(tmp_path/'dicom_prep.db')
    ctx, go = mp.get_context('spawn'), mp.get_context('spawn').Event()
    procs = [ctx.Process(target=_annotate, args=(path, f"ann{k}", go)) for k in range(3)] + [ctx.Process(target=_hog, args=(path, go))]
    for p in procs: p.start()
    t = time.perf_counter(); go.set()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4, 'a process failed (a write timed out or raised)'
    with closing(sqlite3.connect(path)) as conn:
        for k in range(3):
            assert [labels_of(conn, 'image', f"im{i}", f"ann{k}") for i in range(N_IMAGES)] == [('even',) if i % 2 == 0 else ('odd',) for i in range(N_IMAGES)]
        per_annotator = N_IMAGES + 2 * 2 * (N_IMAGES // 5)        # a label each, then per fifth: wrong (2 rows: off, on) and its undo (2 rows)
        assert conn.execute('select count(*) from labels').fetchone()[0] == 3 * per_annotator
        assert conn.execute("select count(*) from images where filename like 'new%'").fetchone()[0] == 8
        assert label_progress(conn).by_annotator == {f"ann{k}": N_IMAGES for k in range(3)}
    assert time.perf_counter() - t < 60


def test_an_index_made_before_labels_gets_them(tmp_path):
    path = _index(tmp_path/'dicom_prep.db')
    with closing(sqlite3.connect(path)) as c, c:                # as schema 7 left it: no labels tables
        for sql in ('drop trigger labels_state', 'drop table labels', 'drop table label_state', "update meta set value = '7' where key = 'schema_version'"):
            c.execute(sql)
    db = open_db(path)
    assert db.execute("select value from meta where key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    set_label(db, 'series', 'se1', 'odd', 'ann')
    assert image_labels(db)['filename'].tolist() == [f"im{i}" for i in range(10, 20)]
    assert db.execute('select count(*) from images').fetchone()[0] == N_IMAGES
    db.close()


def test_a_failed_write_leaves_no_half_action(tmp_path):
    path = _index(tmp_path/'dicom_prep.db')
    with closing(sqlite3.connect(path)) as conn:
        set_label(conn, 'image', 'im0', 'even', 'ann')
        conn.execute("create trigger fail_second before insert on labels when new.class = 'odd' begin select raise(abort, 'disk full'); end")
        conn.commit()
        with pytest.raises(sqlite3.IntegrityError): set_label(conn, 'image', 'im0', 'odd', 'ann')   # writes 'even' off, then fails on 'odd' on
        assert labels_of(conn, 'image', 'im0', 'ann') == ('even',)
        assert conn.execute('select count(*) from labels').fetchone()[0] == 1


def _hammer(path, who, go, stop):
    "Label the first images as fast as possible until `stop`."
    go.wait()
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        names = [r[0] for r in conn.execute('select filename from images order by rowid limit 20')]
        n = 0
        while not stop.is_set():
            set_label(conn, 'image', names[n % len(names)], ('a', 'b')[n % 2], who); n += 1


def test_a_real_run_and_export_beside_labellers(tmp_path):
    "Regression: sqlite-utils' deferred transactions failed at once ('database is locked') when a labeller wrote between their read and write."
    import subprocess
    from dicom_prep.synth import synth_series
    from conftest import console_script
    src, out = tmp_path/'src', tmp_path/'out'
    synth_series(src/'first', n=20)
    subprocess.run([*console_script('dicom_prep_preprocess'), '--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0'], check=True, capture_output=True)
    for k in range(12): synth_series(src/f"more{k}", n=20, seed=k + 1)
    ctx = mp.get_context('spawn'); go, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_hammer, args=(out/'dicom_prep.db', f"ann{k}", go, stop)) for k in range(3)]
    for p in procs: p.start()
    go.set()
    try:
        run = subprocess.run([*console_script('dicom_prep_preprocess'), '--dicom-dir', str(src), '--output-dir', str(out), '--workers', '1'],
                             capture_output=True, text=True, timeout=300)
        exports = [subprocess.run([*console_script('dicom_prep_export'), '--db', str(out/'dicom_prep.db'), '--out', str(tmp_path/f"e{k}"),
                                   '--format', 'csv', '--labels', 'db'], capture_output=True, text=True, timeout=120) for k in range(3)]
    finally:
        stop.set()
        for p in procs: p.join(60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert [e.returncode for e in exports] == [0, 0, 0], [e.stderr[-500:] for e in exports]
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with closing(sqlite3.connect(out/'dicom_prep.db')) as c: assert c.execute('select count(*) from images').fetchone()[0] == 13 * 20
