"""`dicom_prep_label` as a real server in its own process: the printed URL and its token, the one error style, and labels
typed by concurrent clients while a preprocess run adds images to the same index. (The views, the security probes and
the hostile index are tested in nbs/14a_label.ipynb, in-process.) The browser tests (test_label_browser.py) use the
helpers here."""
import json, re, socket, subprocess, time, urllib.error, urllib.parse, urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import console_script, query
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import ct_phantom, synth_series

CLASSES = ('normal', 'nodule', 'artefact')
STUDIES = ('1.2.826.0.1.3680043.8.498.101', '1.2.826.0.1.3680043.8.498.102')


def write_corpus(src, sizes=(8, 7, 6, 5), size=64, prefix='IM'):
    "Series of CT-like slices (`sizes` slices each) in two studies under `src`: a corpus where series and study labels mean something."
    for i, n in enumerate(sizes):
        synth_series(Path(src)/f's{i}', n=n, rows=size, cols=size, series_number=i + 1, description=f'series {i + 1}', prefix=prefix,
                     study_uid=STUDIES[i % 2], pixels=lambda k, i=i: ct_phantom(size, seed=i, k=k), slope=1, intercept=-1024)
    return Path(src)


@pytest.fixture(name='index')
def index_fixture(tmp_path):
    "A preprocessed synthetic corpus (26 images, 4 series, 2 studies): its output folder."
    preprocess(write_corpus(tmp_path/'src'), tmp_path/'out', n_workers=0, quiet=True)
    return tmp_path/'out'


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@contextmanager
def label_server(out, annotator='alice', token='T', *extra):
    "`dicom_prep_label` serving `out` in its own process; yields (base URL, the line it printed)."
    port = free_port()
    cmd = console_script('dicom_prep_label') + ['--db', str(out), '--classes', ','.join(CLASSES), '--no-browser', '--port', str(port),
                                                '--annotator', annotator, *(['--token', token] if token else []), *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        for _ in range(200):
            try: socket.create_connection(('127.0.0.1', port), 0.2).close(); break
            except OSError: assert p.poll() is None, p.stderr.read(); time.sleep(0.05)
        yield f'http://127.0.0.1:{port}', line
    finally: p.terminate(); p.wait(10)


def request(url, data=None, token=None) -> tuple[int, str, float]:
    "(status, body, seconds) of a GET, or of a POST of form `data` with the token in X-Token."
    req = urllib.request.Request(url, data=None if data is None else urllib.parse.urlencode(data).encode(), headers={'X-Token': token} if token else {})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, r.read().decode(), time.perf_counter() - t
    except urllib.error.HTTPError as e: return e.code, e.read().decode(), time.perf_counter() - t


def image_ids(out) -> dict:
    "rowid -> (filename, series_uid, study_uid) of every image of the index in `out`."
    return {r[0]: r[1:] for r in query(out, 'select rowid, filename, series_uid, study_uid from images order by rowid')}


def label_state(out) -> set:
    "What the index holds now: (scope, key, annotator, class) rows."
    return set(query(out, 'select scope, key, annotator, class from label_state'))


def test_prints_a_url_with_a_new_token_and_refuses_requests_without_it(index):
    with label_server(index, token=None) as (url, line):
        token = re.search(r'\?token=([\w-]+)', line).group(1)
        assert len(token) >= 24 and line.strip().endswith(f'{url}/?token={token}'), line
        assert request(url + '/')[0] == 403 and request(url + '/?token=guess')[0] == 403
        assert request(f'{url}/?token={token}')[0] == 200
        some = next(iter(image_ids(index)))
        assert request(url + '/label', dict(id=some, cls='normal'))[0] == 403
        status, body, _ = request(url + '/label', dict(id=some, cls='normal'), token)
        assert status == 200 and json.loads(body)['labels'] == ['normal']
    with label_server(index, 'bob', 'T2') as (url, line):      # another start, another token
        assert '?token=T2' in line and request(f'{url}/?token={token}')[0] == 403


@pytest.mark.parametrize('argv', [['--classes', ''], ['--classes', 'a,b,c,d,e,f,g,h,i,j'], ['--classes', '../x'], ['--db', '/no/such/folder', '--classes', 'a'],
                                  ['--classes', 'a', '--port', '70000'], ['--classes', 'a', '--host', 'no.such.host.invalid']])
def test_one_error_style(argv, index):
    r = subprocess.run(console_script('dicom_prep_label') + ['--db', str(index), '--no-browser', *argv], capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('dicom_prep_label: error: '), (r.returncode, r.stderr)


def _client(url, images, run) -> list:
    "Label `images` round after round, each round the next class, until preprocess `run` has ended (3 rounds at least): (id, class, answer) per post."
    posts, n = [], 0
    while n < 3 or run.poll() is None:
        posts += [(i, CLASSES[n % 3], request(url + '/label', dict(id=i, cls=CLASSES[n % 3]), 'T')) for i in images]
        n += 1
    return posts


def test_concurrent_labels_while_preprocess_adds_images(index):
    "Four clients label for as long as a preprocess run adding 40 images to the index lasts: every label kept, none waits long, the run completes."
    ids, src = sorted(image_ids(index)), index.parent/'src'
    write_corpus(src/'more', sizes=(20, 20), size=256, prefix='NEW')
    with label_server(index) as (url, _):
        run = subprocess.Popen(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(index), '--workers', '2'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with ThreadPoolExecutor(4) as pool: posts = [p for client in pool.map(lambda k: _client(url, ids[k::4], run), range(4)) for p in client]
        assert run.wait(300) == 0, run.stderr.read()
    answers = [a for _, _, a in posts]
    assert {s for s, _, _ in answers} == {200}, {s for s, _, _ in answers}
    assert max(t for _, _, t in answers) < 5, max(t for _, _, t in answers)
    names, last = image_ids(index), {i: c for i, c, _ in posts}
    assert len(names) == len(ids) + 40                             # the run completed
    assert label_state(index) == {('image', names[i][0], 'alice', c) for i, c in last.items()}    # every image's last class
    assert query(index, 'select count(distinct action) from labels')[0][0] == len(posts)        # every keystroke in the history
