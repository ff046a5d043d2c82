"""Issue 24, the export half: an export cannot write outside --out, leaks no raw identifier of a pseudonymised index,
and a kill -9 at any instant leaves a state a plain rerun turns into exactly a clean export.

Kills are real: the export runs in a forked child (everything already imported, so an instant costs only the export
itself) that gets SIGKILL at random instants after it recorded its start, as tests/test_resume.py does for preprocess;
the rerun then runs to completion and its folder is compared with a clean export's, file by file and byte for byte.
A received index is untrusted input: the hostile-DB tests edit the index the way an attacker would."""
import hashlib, json, os, random, re, shutil, signal, sqlite3, subprocess, tarfile, time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

import dicom_prep.export as ex
import dicom_prep.layouts as lay
from conftest import console_script, query
from dicom_prep.core import UnsafeOutput, atomic_path, temp_of
from dicom_prep.paths import OWNER_FILE, UnsafePath, owns
from dicom_prep.db import open_db
from dicom_prep.options import parse_splits
from dicom_prep.privacy import pseudonym
from dicom_prep.export import export
from dicom_prep.preprocess import preprocess
from dicom_prep.run import UsageError
from dicom_prep.synth import synth_dicom, synth_series

EXPORT = console_script('dicom_prep_export')


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(EXPORT + [str(a) for a in args], capture_output=True, text=True, timeout=120)


def one_line_error(r, *needles):
    "The CLI refused with exit 2 and one line holding every needle."
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    for n in needles: assert n in r.stderr, (n, r.stderr)


def small_corpus(root:Path, n=8, **kw) -> Path:
    "`n` single-frame images of 4 patients, preprocessed into root/out; returns the database."
    for i in range(n): synth_dicom(root/f'src/s{i % 4}/im{i}.dcm', 12, 12, patient=f'P{i % 4}', seed=i)
    preprocess(root/'src', root/'out', n_workers=0, quiet=True, **kw)
    return root/'out/dicom_prep.db'


def edit(db, sql, args=()):
    "Change a database the way an attacker with sqlite3 would."
    with closing(sqlite3.connect(db)) as c, c: c.execute(sql, args)


def key(db, out) -> str:
    "How the index at `db` records the export folder `out`: relative to the index's own folder."
    return os.path.relpath(os.path.realpath(out), os.path.realpath(Path(db).parent))


def tree(out) -> dict:
    "Every file under `out` (hidden ones included): path relative to `out` -> sha1 of its bytes."
    return {p.relative_to(out).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob('*')) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- item 1: split names

def test_unsafe_split_names_are_refused_when_parsed(tmp_path):
    for spec in ('../../../ESCAPED:1', '/tmp/x:1,train:1', 'a/b:1', '..:1', '.hidden:1', '-x:1', ':1', 'tr ain:1', 'x' * 40 + ':1',
                 'train:1,valid\x00:1'):
        with pytest.raises(ValueError, match='not a safe split name'): parse_splits(spec)
    assert parse_splits('train:25,Valid_2:25,hold-out:50') == {'train': .25, 'Valid_2': .25, 'hold-out': .5}
    for synth in range(2): synth_dicom(tmp_path/f'src/im{synth}.dcm', 8, 8, seed=synth)
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(tmp_path/'src'), '--output-dir',
                       str(tmp_path/'out'), '--workers', '0', '--splits', '../../../ESCAPED:1'], capture_output=True, text=True)
    one_line_error(r, "'../../../ESCAPED'")
    assert not (tmp_path/'out/images').exists()


def test_an_index_with_an_unsafe_split_is_refused_naming_the_row(tmp_path):
    "A received index whose split reads '../../../ESCAPED' writes nothing, anywhere, in any format, and says which row."
    db = small_corpus(tmp_path)
    [(victim,)] = query(db, 'select filename from images order by filename limit 1')
    edit(db, "update images set split='../../../ESCAPED' where filename=?", [victim])
    out = tmp_path/'a/b/out'
    one_line_error(cli('--db', db, '--out', out, '--format', 'imagefolder', '--label-column', 'modality'), victim, "'../../../ESCAPED'")
    for fmt in ('webdataset', 'csv'):
        with pytest.raises(UsageError, match=f"images row '{victim}': split '../../../ESCAPED'"): export(db, out, fmt, label_col='modality')
    assert not list(tmp_path.rglob('ESCAPED*')) and not [p for p in out.rglob('*') if p.is_file()]


def test_the_writers_refuse_items_made_elsewhere_that_would_land_outside(tmp_path):
    "`write_files` and `write_shards` are public: items with an unsafe split are refused before anything is written."
    db = small_corpus(tmp_path)
    df = ex.images_df(db).assign(label='x', split='../../ESCAPED')
    with closing(open_db(db)) as conn:     # a shard name is refused as a bad split, an item's path by the index's one resolver
        for write, layout, refusal in ((lay.write_shards, '{name}', lay.IndexValueError), (lay.write_files, '{split}/{label}/{name}.png', UnsafePath)):
            with pytest.raises(refusal, match='ESCAPED'): write(conn, tmp_path/'x/out', lay.image_items(df, layout), 0)
    assert not list(tmp_path.rglob('ESCAPED*'))


def test_nnunet_refuses_unsafe_splits_in_the_recorded_settings(tmp_path):
    "Volume splits come from the recorded --splits: a hostile value there is refused, not used as a folder."
    from dicom_prep.nifti import dicom_to_nifti
    for s in range(2): synth_series(tmp_path/f'src/p{s}', n=3, series_number=s + 1, seed=s, PatientID=f'P{s}')
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    db = tmp_path/'out/dicom_prep.db'
    edit(db, "insert or replace into meta values ('preprocess_settings', ?)", [json.dumps(dict(splits='../../../ESCAPED:1'))])
    one_line_error(cli('--db', db, '--out', tmp_path/'a/b/out', '--format', 'nnunet'), 'preprocess_settings', "'../../../ESCAPED'")
    assert not list(tmp_path.rglob('ESCAPED*'))


def test_hostile_labels_stay_single_folders_inside_the_export(tmp_path):
    "Labels become class folders: '..', '/etc', 'a/../..' and friends each give one distinct folder under their split."
    db = small_corpus(tmp_path)
    pd.DataFrame(dict(patient_id=['P0', 'P1', 'P2', 'P3'], y=['../../../ESCAPED', '..', '/etc/cron.d', '.hidden'])).to_csv(tmp_path/'l1.csv', index=False)
    edit(db, 'update images set body_part=?', ['a/../../b'])
    classes = set()
    for n, (labels, col) in enumerate(((tmp_path/'l1.csv', None), (None, 'body_part'))):
        out = tmp_path/f'x/out{n}'
        export(db, out, 'imagefolder', labels=labels, on='patient_id' if labels else None, label_col=col)
        for p in out.rglob('*.png'):
            assert p.resolve().is_relative_to(out.resolve()) and len(p.relative_to(out).parts) == 3 and not p.parts[-2].startswith('.')
            classes.add((n, p.parts[-2]))
    assert len(classes) == 5 and not [p for p in tmp_path.rglob('ESCAPED*') if not p.is_relative_to(tmp_path/'x')]


def test_hostile_export_records_are_refused_not_followed(tmp_path):
    "An `export_items` row naming a file outside --out is refused with its row named; the file it names is not deleted."
    db = small_corpus(tmp_path)
    victim = tmp_path/'x/victim-000000.tar'
    for fmt, column, value in (('imagefolder', 'item', '../victim-000000.tar'), ('imagefolder', 'item', str(victim)),
                               ('webdataset', 'shard', '../victim-000000.tar'), ('webdataset', 'shard', 'train-x.tar')):
        out = tmp_path/f'x/{fmt}'
        export(db, out, fmt, label_col='modality')
        victim.write_bytes(b'precious')
        edit(db, "insert into export_items (out_dir, item, shard, sig) values (?, ?, ?, 'x')",
             [key(db, out), value if column == 'item' else 'abc', value if column == 'shard' else None])
        with pytest.raises(UnsafePath, match=f"export_items row .*: {column} {re.escape(repr(value))} is not a"):
            export(db, out, fmt, label_col='modality')
        assert victim.read_bytes() == b'precious'
        edit(db, 'delete from export_items where sig=?', ['x'])
    edit(db, "insert into export_items (out_dir, item, sig) values (?, '../victim-000000.tar', 'x')", [key(db, out)])
    one_line_error(cli('--db', db, '--out', out, '--format', 'webdataset', '--label-column', 'modality'), 'export_items', '../victim')
    assert victim.read_bytes() == b'precious'


# ---------------------------------------------------------------------------------------------------- items 7, 8: kill -9

N_FILES, FRAMES, N_PAT = 60, 10, 10           # 600 images of 10 patients
SHARD_MB = 0.01                                # about 30 webdataset shards
LABELS = {'A': ['a', 'b'] * 5,                 # three labellings: B moves half the patients, C drops three of them
          'B': ['a', 'c'] * 5,
          'C': ['a', 'b', 'c', 'a', 'b', '', '', '', 'b', 'c']}


@pytest.fixture(scope='module')
def big(tmp_path_factory):
    "A corpus of 600 small images with three label files, and a clean export of each labelling in each format."
    root = tmp_path_factory.mktemp('big')
    for i in range(N_FILES):
        synth_dicom(root/f'src/s{i % N_PAT}/im{i:03d}.dcm', 10, 10, frames=FRAMES, patient=f'P{i % N_PAT}', seed=i)
    preprocess(root/'src', root/'out', n_workers=0, quiet=True)
    for name, ys in LABELS.items():
        pd.DataFrame(dict(patient_id=[f'P{i}' for i in range(N_PAT)], y=ys)).to_csv(root/f'{name}.csv', index=False)
    refs = {(fmt, name): snapshot(run_export(root, root/f'ref/{fmt}-{name}', fmt, name), fmt)
            for fmt in ('imagefolder', 'webdataset') for name in LABELS}
    return root, refs


def run_export(root, out, fmt, labels):
    "Export the big corpus with labelling `labels`; returns `out`."
    export(root/'out/dicom_prep.db', out, fmt, labels=root/f'{labels}.csv', on='patient_id', shard_size=SHARD_MB)
    return out


def _members(shard) -> list:
    with tarfile.open(shard) as t: return [(m.name, hashlib.sha1(t.extractfile(m).read()).hexdigest()) for m in t.getmembers()]


def snapshot(out, fmt) -> dict:
    "What an export folder holds, shard layout aside: its files (webdataset: the samples across its shards, counted), but its owner file."
    files = {k: v for k, v in tree(out).items() if k != OWNER_FILE}     # it names the index relative to the folder (checked: `owns`)
    if fmt == 'imagefolder': return dict(files=files)
    samples = Counter(m for name in files if name.endswith('.tar') and not name.startswith('.') for m in _members(Path(out)/name))
    return dict(files={k: v for k, v in files.items() if not k.endswith('.tar') or k.startswith('.')}, samples=samples)


def recorded(root, out) -> set:
    "What the index records of `out`: (item, label, split, sig) of each item, and its shard."
    return set(query(root/'out', 'select item, label, split, sig from export_items where out_dir=?', [key(root/'out/dicom_prep.db', out)]))


def assert_same_as_clean(root, refs, out, fmt, labels):
    "`out` holds what a clean export of `labels` holds, and the index records exactly the files there."
    snap, ref = snapshot(out, fmt), refs[fmt, labels]
    assert snap['files'] == ref['files'], (sorted(set(snap['files']) ^ set(ref['files']))[:5], 'differ in name')
    if fmt == 'webdataset':
        assert snap['samples'] == ref['samples'], (sum(snap['samples'].values()), sum(ref['samples'].values()),
                                                   sum(v - 1 for v in snap['samples'].values()), len(set(snap['samples']) - set(ref['samples'])))
        shards = {s for s, in query(root/'out', 'select distinct shard from export_items where out_dir=?', [key(root/'out/dicom_prep.db', out)])}
        assert shards == {p.name for p in Path(out).glob('*.tar')}, 'an unrecorded or a missing shard'
    assert recorded(root, out) == recorded(root, root/f'ref/{fmt}-{labels}') != set()
    [(status,)] = query(root/'out', 'select status from exports where out_dir=? order by id desc limit 1', [key(root/'out/dicom_prep.db', out)])
    assert status == 'completed' and owns(root/'out/dicom_prep.db', out)


def started(db, after:int) -> bool:
    "True once an export later than id `after` has recorded its start."
    try: return bool(query(db, 'select count(*) from exports where id > ?', [after])[0][0])
    except sqlite3.Error: return False


def last_export(db) -> int: return query(db, 'select coalesce(max(id), 0) from exports')[0][0]


def fork_export(root, out, fmt, labels, fault=None) -> int:
    "Start an export in a forked child (after `fault()` patches it); returns the child's pid."
    pid = os.fork()
    if pid == 0:
        try:
            if fault: fault()
            run_export(root, out, fmt, labels)
        finally: os._exit(0)
    return pid


def kill_at(root, pid, after, delay) -> bool:
    "SIGKILL the child `delay` s after its export recorded its start; True if it died by the signal."
    db, t0 = root/'out/dicom_prep.db', time.monotonic()
    while not started(db, after) and time.monotonic() - t0 < 30: time.sleep(0.002)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1] == signal.SIGKILL


def active_span(root, fmt) -> float:
    "Seconds from an export recording its start to its end, moving every image (the span a kill aims into)."
    out, db = root/f'span/{fmt}', root/'out/dicom_prep.db'
    run_export(root, out, fmt, 'A')
    after = last_export(db)
    pid = fork_export(root, out, fmt, 'B')
    while not started(db, after): time.sleep(0.002)
    t0 = time.monotonic(); os.waitpid(pid, 0)
    return max(time.monotonic() - t0, 0.01)


@pytest.mark.parametrize('fmt', ['imagefolder', 'webdataset'])
def test_kill_at_random_instants_then_rerun_equals_a_clean_export(fmt, big, tmp_path):
    "Kills at 12 random instants of exports that relabel, move and drop images; each rerun (other labels, maybe) equals a clean export."
    root, refs = big
    span, rng, out, db = active_span(root, fmt), random.Random(24), tmp_path/'out', root/'out/dicom_prep.db'
    run_export(root, out, fmt, 'A')
    kills, tries, last = 0, 0, 'A'
    while kills < 12 and tries < 30:                 # an export that ends before its kill is checked too, but not counted
        killed, rerun = rng.choice([l for l in LABELS if l != last]), rng.choice(list(LABELS))
        after, tries = last_export(db), tries + 1
        kills += kill_at(root, fork_export(root, out, fmt, killed), after, rng.uniform(0, span))
        run_export(root, out, fmt, rerun)
        assert_same_as_clean(root, refs, out, fmt, rerun)
        last = rerun
    assert kills == 12, f"only {kills} of {tries} kills landed before the export ended (span {span:.3f} s)"


def _kill_after(name, n):
    "A fault: the `n`-th call of `layouts.<name>` is SIGKILLed right after it returns."
    real, calls = getattr(lay, name), []
    def patched(*a, **kw):
        out = real(*a, **kw); calls.append(1)
        if len(calls) == n: os.kill(os.getpid(), signal.SIGKILL)
        return out
    return lambda: setattr(lay, name, patched)


def _half_written_shard():
    "A fault: the third shard is killed half-way through its write (its hidden temporary is left behind)."
    real, calls = lay._write_shard, []
    def patched(path, items):
        calls.append(1)
        if len(calls) == 3:
            with atomic_path(path) as tmp: tmp.write_bytes(b'half a tar'); os.kill(os.getpid(), signal.SIGKILL)
        return real(path, items)
    return lambda: setattr(lay, '_write_shard', patched)


@pytest.mark.parametrize('fmt, fault', [('imagefolder', _kill_after('link_output', 1)), ('webdataset', _kill_after('_write_shard', 2)),
                                        ('webdataset', _half_written_shard())], ids=['after-first-link', 'after-second-shard', 'half-written-shard'])
def test_a_kill_at_a_set_point_then_a_rerun_with_other_labels(fmt, fault, big, tmp_path):
    "Killed while relabelling A -> B; rerun with C, then with A: each equals a clean export, nothing hidden or unrecorded left."
    root, refs = big
    out = run_export(root, tmp_path/'out', fmt, 'A')
    pid = fork_export(root, out, fmt, 'B', fault)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    for labels in ('C', 'A'):
        run_export(root, out, fmt, labels)
        assert_same_as_clean(root, refs, out, fmt, labels)


def test_a_killed_imagefolder_export_is_rerun_by_the_cli_even_after_rm_rf(tmp_path):
    "Issue 24 item 7: a class folder that the killed export already removed does not stop the rerun."
    db = small_corpus(tmp_path, n=12)
    for name, ys in (('a', ['c0', 'c0', 'c1', 'c1']), ('b', ['c2', 'c2', 'c1', 'c1'])):
        pd.DataFrame(dict(patient_id=['P0', 'P1', 'P2', 'P3'], y=ys)).to_csv(tmp_path/f'{name}.csv', index=False)
    out = tmp_path/'x'
    export(db, out, 'imagefolder', labels=tmp_path/'a.csv', on='patient_id')
    pid = os.fork()
    if pid == 0:
        try: _kill_after('link_output', 1)(); export(db, out, 'imagefolder', labels=tmp_path/'b.csv', on='patient_id')
        finally: os._exit(0)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    assert not any(p.name == 'c0' for p in out.rglob('*'))                       # the killed run removed class c0's folders
    export(db, tmp_path/'clean', 'imagefolder', labels=tmp_path/'b.csv', on='patient_id')
    r = cli('--db', db, '--out', out, '--format', 'imagefolder', '--labels', tmp_path/'b.csv', '--on', 'patient_id')
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == tree(tmp_path/'clean')
    shutil.rmtree(out)
    assert export(db, out, 'imagefolder', labels=tmp_path/'b.csv', on='patient_id').written == 12
    assert tree(out) == tree(tmp_path/'clean')


def test_temp_names_are_recognised_exactly():
    "The sweep after a killed export removes our temporaries (as `atomic_path` names them) and nothing a user keeps."
    from dicom_prep.core import _temp_name, cap_bytes
    for name in ('train-000001.tar', 'IM.1.2-3_frame0003.png', 'labels_report.json', 'x' * 90 + '.nii.gz', 'noext', '𝔸' * 60 + '.png'):
        assert temp_of(_temp_name(name)) == cap_bytes(name, 100), name
    for name in ('.DS_Store', '.gitignore', 'train-000001.tar', '.hidden.png', 'a.123-4.png', '.keep.1-x.txt'):
        assert temp_of(name) is None, name


def test_a_symlinked_folder_inside_the_export_is_refused(tmp_path):
    "A class folder replaced by a symlink to elsewhere is neither written nor emptied through."
    db = small_corpus(tmp_path)
    out, elsewhere = tmp_path/'x/out', tmp_path/'elsewhere'
    export(db, out, 'imagefolder', label_col='modality')
    [split] = [d for d in out.iterdir() if d.is_dir()][:1]
    shutil.move(split, elsewhere); split.symlink_to(elsewhere)
    before = tree(elsewhere)
    edit(db, "update images set modality='MR'")
    with pytest.raises(UnsafeOutput, match='is a symlink inside the export folder'): export(db, out, 'imagefolder', label_col='modality')
    assert tree(elsewhere) == before


def test_one_folder_under_two_spellings_is_one_export(tmp_path):
    "Exported through a symlinked alias or with '..' in the path, then relabelled: the folder holds no image twice."
    db = small_corpus(tmp_path)
    for name, ys in (('a', ['c0', 'c0', 'c1', 'c1']), ('b', ['c2', 'c2', 'c1', 'c1'])):
        pd.DataFrame(dict(patient_id=['P0', 'P1', 'P2', 'P3'], y=ys)).to_csv(tmp_path/f'{name}.csv', index=False)
    (tmp_path/'x').mkdir(); (tmp_path/'alias').symlink_to(tmp_path/'x')
    export(db, tmp_path/'x/out', 'imagefolder', labels=tmp_path/'a.csv', on='patient_id')
    for spelling in (tmp_path/'alias/out', tmp_path/'x/../x/out'):
        export(db, spelling, 'imagefolder', labels=tmp_path/'b.csv', on='patient_id')
        assert len(list((tmp_path/'x/out').rglob('*.png'))) == 8 and not list((tmp_path/'x/out').rglob('c0'))


# ---------------------------------------------------------------------------------------------------- item 4: PHI in reports

def _pseudo(tmp_path, salt=None) -> Path:
    "A pseudonymised index of 4 files of patient PID7654321 in a folder DOE_JOHN (one of 3 frames); returns the database."
    for i in range(4): synth_dicom(tmp_path/f'src/DOE_JOHN/im{i}.dcm', 8, 8, frames=3 if i == 0 else 1, patient='PID7654321', seed=i)
    assert preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True, pseudonymize=True, salt=salt).status == 'completed'
    return tmp_path/'out/dicom_prep.db'


def _kept_key(private) -> str:
    with closing(sqlite3.connect(private)) as c: return c.execute("select value from meta where key='key'").fetchone()[0]


def test_pseudonymised_label_reports_and_the_index_hold_no_raw_key_or_path(tmp_path):
    "Unmatched raw keys are reported as their keyed pseudonyms; the labels file's path goes to the private state."
    db = _pseudo(tmp_path)
    key = _kept_key(tmp_path/'out.private.db')
    labels = tmp_path/'SMITH_JANE'/'labels.csv'; labels.parent.mkdir()
    raw = dict(patient_id='RAW99887766', source_path='/data/ROE_RICHARD/1.dcm', sop_uid='1.2.3.999')
    for on, value in raw.items():
        pd.DataFrame({on: [value, 'PID7654321' if on == 'patient_id' else '1.2.3.4'], 'y': ['a', 'b']}).to_csv(labels, index=False)
        if on == 'patient_id':
            r = cli('--db', db, '--out', tmp_path/f'e-{on}', '--labels', labels, '--on', on)
            assert r.returncode == 0 and value not in r.stdout + r.stderr, r.stderr
        else: export(db, tmp_path/f'e-{on}', 'csv', labels=labels, on=on)
        text = (tmp_path/f'e-{on}/labels_report.json').read_text()
        assert value not in text and pseudonym(value, key, ex._KEYED[on]) in json.loads(text)['unmatched']
    with closing(sqlite3.connect(db)) as c: dump = '\n'.join(c.iterdump())
    assert 'SMITH_JANE' not in dump and 'labels.csv' not in dump and not any(v in dump for v in raw.values())
    with closing(sqlite3.connect(tmp_path/'out.private.db')) as c:
        assert {str(labels)} == {p for p, in c.execute('select labels from export_labels')}


def test_pseudonymised_report_withholds_keys_it_cannot_key(tmp_path):
    "Hostile review: `--on filename` on a pseudonymised index compared the user's own names (PHI) and listed every miss as written."
    db = _pseudo(tmp_path)
    name = pd.read_sql('select filename from images limit 1', sqlite3.connect(db))['filename'][0]
    labels = tmp_path/'by_name.csv'
    pd.DataFrame(dict(filename=[name, 'DOE_JOHN/1.2.3.dcm', 'ROE^RICHARD'], y=['a', 'b', 'c'])).to_csv(labels, index=False)
    r = cli('--db', db, '--out', tmp_path/'e', '--labels', labels, '--on', 'filename')
    assert r.returncode == 0 and '2 labels matched no image' in r.stdout, r.stdout + r.stderr
    report = json.loads((tmp_path/'e/labels_report.json').read_text())
    assert report['unmatched'] == [] and report['withheld'] == 2 and report['n_labelled'] >= 1
    assert not any(v in (tmp_path/'e/labels_report.json').read_text() + r.stdout for v in ('DOE_JOHN', 'ROE^RICHARD'))


# ---------------------------------------------------------------------------------------------------- item 14: label encodings

def test_a_label_csv_in_another_encoding_or_binary_is_one_line(tmp_path):
    db = small_corpus(tmp_path)
    (tmp_path/'latin1.csv').write_bytes('patient_id,y\nP0,normal\nP1,caf\xe9\n'.encode('latin-1'))
    (tmp_path/'binary.csv').write_bytes(bytes(range(256)) * 8)
    (tmp_path/'ragged.csv').write_text('patient_id,y\nP0,a\nP1,b,c,d\n')
    one_line_error(cli('--db', db, '--format', 'imagefolder', '--on', 'patient_id', '--out', tmp_path/'a', '--labels', tmp_path/'latin1.csv'),
                   'latin1.csv', 'line 3', 'utf-8', '--labels-encoding')
    for name, encoding, needles in (('binary.csv', 'utf-8', ('line 2', 'utf-8')), ('ragged.csv', 'utf-8', ('line 3',)),
                                    ('latin1.csv', 'klingon', ('klingon',)), ('missing.csv', 'utf-8', ('missing.csv',))):
        with pytest.raises(UsageError) as e:
            export(db, tmp_path/'a', 'imagefolder', labels=tmp_path/name, on='patient_id', labels_encoding=encoding)
        assert '\n' not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)
    assert not any((tmp_path/'a').iterdir())
    r = cli('--db', db, '--format', 'imagefolder', '--on', 'patient_id', '--out', tmp_path/'b', '--labels', tmp_path/'latin1.csv',
            '--labels-encoding', 'latin-1')
    assert r.returncode == 0, r.stderr
    assert {p.parent.name for p in (tmp_path/'b').rglob('*.png')} == {'normal', 'café'}


# ---------------------------------------------------------------------------------------------------- item 17: the xlsx tracker

@pytest.mark.parametrize('salt', [None, 's3cret'])
def test_xlsx_tracker_counts_the_images_of_a_pseudonymised_index(salt, tmp_path):
    db = _pseudo(tmp_path, salt)
    status = console_script('dicom_prep_status') + ['--db', str(db), '--xlsx', str(tmp_path/'t.xlsx')]
    if salt:
        r = subprocess.run(status, capture_output=True, text=True)
        assert r.returncode == 2 and '--salt' in r.stderr and r.stderr.count('\n') == 1, r.stderr
        status += ['--salt', salt]
    r = subprocess.run(status, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sheet = pd.read_excel(tmp_path/'t.xlsx', sheet_name='preprocess')
    assert sorted(sheet['images']) == [1, 1, 1, 3] and sheet['n_frames'].tolist() == sheet['images'].tolist()
    assert all(str(o).startswith('images/study_') for o in sheet['output'])
