"""The labelling app's server work on a 1,000,000-image index (issue 26: a grid page of 100 thumbnails in at most 150 ms
of server time, a label keystroke in at most 30 ms, filters by index, never a scan).

The index is rows only: `images` rows in 1,000 studies of 5 series, four modalities, three splits, with a handful of real
PNGs reused as thumbnails. Each grid page and keystroke is timed as the app's server does it (`labels.find_images`,
`labels.set_label`, `labels.undo`) and as a whole request through the app (`label.label_app` under starlette's
TestClient, in process: the server's time, no browser). The
baseline, measured in the same run, is one full scan of `images` (a condition no index serves): a filter that scanned
would cost about 1× that. Label states are measured with none, half (every other image) and 90% (a labelled prefix)
of the index labelled; "a server's next look" is the unlabelled first page again, started where the server's
`Frontiers` saw it start.

    python bench/bench_label.py [--images 1000000] [--repeat 5] [--db /tmp/bench_label/dicom_prep.db]
"""
import argparse, random, sqlite3, statistics, time
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_prep.db import open_db, record_output_dir
from dicom_prep.labels import Filters, Frontiers, find_images, label_progress, set_label, undo
from dicom_prep.paths import mark_owner

MODALITIES, SPLITS, PARTS = ('CT', 'MR', 'CR', 'US'), ('train', 'valid', 'test'), ('CHEST', 'HEAD', 'ABDOMEN', None)

def image_rows(n:int):
    "Rows of `n` images: 200 per series, 5 series per study."
    for i in range(n):
        se, st = i // 200, i // 1000
        yield (f"study_{st}/im{i}", f"1.2.{st}", f"1.2.{st}.{se}", f"1.2.{st}.{se}.{i}", MODALITIES[st % 4], SPLITS[st % 3], PARTS[se % 4],
               f"images/sample/{i % 7}.png", se % 5 + 1, f"series {se % 5}", i % 200 + 1, 0)

def make_index(path:Path, n:int) -> Path:
    "An index of `n` image rows (made once, reused while its size is right)."
    if path.exists():
        with closing(sqlite3.connect(path)) as c:
            if c.execute('select count(*) from images').fetchone()[0] == n: return path
        path.unlink()
    db = open_db(path)
    record_output_dir(db, 'preprocess', path.parent); mark_owner(path.parent, path)      # the folder the app serves PNGs from
    for k in range(7):
        (png := path.parent/f"images/sample/{k}.png").parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(k).random((256, 256)) * 255).astype(np.uint8)).save(png)
    with db.conn:
        db.conn.executemany('insert into images (filename, study_uid, series_uid, sop_uid, modality, split, body_part, thumbnail_path, '
                            'series_number, series_description, instance_number, frame_number) values (?,?,?,?,?,?,?,?,?,?,?,?)', image_rows(n))
    db.close()
    return path

def timed(fn, repeat:int) -> float:
    "Median milliseconds of `repeat` calls of `fn`."
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)

def label_share(conn, n:int, share:str):
    "Label none, every other image, or a 90% prefix of the index (one transaction, as rows of the labels table)."
    conn.execute("delete from labels"); conn.execute("delete from label_state")
    ids = {'none': [], 'half': range(0, n, 2), 'prefix90': range(int(n * .9))}[share]
    with conn:
        conn.executemany("insert into labels (scope, key, class, value, annotator, at, action) values ('image', ?, 'normal', 1, 'bench', 't', 0)",
                         ((f"study_{i // 1000}/im{i}",) for i in ids))

def pages(conn, n, repeat) -> dict[str, float]:
    "Median ms of a 100-image grid page for each filter."
    mid = n // 2
    cases = {'all, first page': (Filters(state='all'), None), 'all, page at the middle': (Filters(state='all'), mid),
             'unlabelled, first page': (Filters(), None), 'modality MR': (Filters(modality='MR', state='all'), None),
             'split test, unlabelled': (Filters(split='test'), None), 'one series': (Filters(series_uid=f"1.2.{mid // 1000}.{mid // 200}", state='all'), None),
             'label normal': (Filters(label='normal', state='all'), None), 'annotator bench': (Filters(annotator='bench', state='all'), None)}
    out = {k: timed(lambda f=f, a=a: find_images(conn, f, 'me', after=a), repeat) for k, (f, a) in cases.items()}
    fr = Frontiers(); find_images(conn, Filters(), 'me', frontiers=fr)           # a server's first look notes where the page starts
    return out | {"unlabelled, a server's next look": timed(lambda: find_images(conn, Filters(), 'me', frontiers=fr), repeat)}

def keystroke(conn, n, repeat) -> float:
    "Median ms of one label keystroke (set_label) and its undo, on random images."
    keys = [f"study_{i // 1000}/im{i}" for i in random.Random(0).sample(range(n), repeat)]
    return timed(lambda: set_label(conn, 'image', keys.pop(), 'nodule', 'me'), repeat), timed(lambda: undo(conn, 'me'), repeat)

def requests(path:Path, n:int, repeat:int) -> dict[str, float]:
    "Median ms of whole requests through the app (starlette's TestClient, in process): grid pages, a keystroke, an undo."
    from starlette.testclient import TestClient
    from dicom_prep.label import label_app
    client = TestClient(label_app(path, 'normal,nodule', 'web', token='T'), headers={'X-Token': 'T'})
    client.get('/?token=T')                                                        # the cookie; the first look at unlabelled
    keys = iter(random.Random(1).sample(range(1, n + 1), repeat))
    out = {f"GET /?{q}": timed(lambda q=q: client.get(f"/?{q}").raise_for_status(), repeat)
           for q in ('', 'state=all', f'state=all&after={n // 2}', 'modality=MR&state=all', 'modality=MR&split=test', 'label=normal&state=all')}
    out['POST /label'] = timed(lambda: client.post('/label', data=dict(id=next(keys), cls='nodule')).raise_for_status(), repeat)
    out['POST /undo'] = timed(lambda: client.post('/undo').raise_for_status(), repeat)
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', type=int, default=1_000_000); ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--db', type=Path, default=Path('/tmp/bench_label/dicom_prep.db'))
    a = ap.parse_args()
    t = time.perf_counter(); path = make_index(a.db, a.images)
    print(f"index: {a.images:,} images at {path} ({time.perf_counter() - t:.0f} s to make or check)")
    with closing(sqlite3.connect(path)) as conn:
        scan = timed(lambda: conn.execute("select count(*) from images where coalesce(series_description, '') = 'none'").fetchone(), a.repeat)
        print(f"baseline: one full scan of images {scan:.0f} ms")
        for share in ('none', 'half', 'prefix90'):
            label_share(conn, a.images, share)
            print(f"\nlabelled: {share}")
            for k, ms in pages(conn, a.images, a.repeat).items(): print(f"  grid page, {k:<34} {ms:7.1f} ms  {ms / scan:5.2f}× a scan")
            k, u = keystroke(conn, a.images, a.repeat)
            print(f"  keystroke: set_label {k:.1f} ms, undo {u:.1f} ms ({k / scan:.3f}× a scan)")
            p = timed(lambda: label_progress(conn), 1)
            print(f"  progress: {p:.0f} ms ({p / scan:.1f}× a scan)")
            for k, ms in requests(path, a.images, a.repeat).items(): print(f"  request {k:<40} {ms:7.1f} ms  {ms / scan:5.2f}× a scan")

if __name__ == '__main__': main()
