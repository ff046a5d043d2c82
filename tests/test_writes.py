"""What the writers do with a hostile or broken output folder (issue 24): a symlink planted at any level of it is refused
and nothing outside it changes (a symlinked output folder itself is fine); names are capped in UTF-8 bytes, not
characters; and a write refused by the environment (a file-size limit, an immutable or read-only folder) fails the run,
not the file being written. Faults are real: `RLIMIT_FSIZE` in the child, `chattr +i`, and root without the capability
that overrides permission bits (`setpriv`)."""
import csv, os, resource, shutil, subprocess
from pathlib import Path

import pytest

from dicom_prep import core
from dicom_prep.export import export
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.preprocess import preprocess
from dicom_prep.run import RunFailed
from dicom_prep.synth import synth_cine, synth_ct, synth_series
from conftest import console_script, query

NAME_MAX = 255                                   # bytes in a file name on ext4, XFS, btrfs, APFS
utf8_len = lambda s: len(s.encode('utf-8'))


def _corpus(root, n=6, size=32, study='study0000'):
    for i in range(n): synth_ct(root/study/f'im{i}.dcm', size, seed=i)
    return root


def _cli(*args, prog='dicom_prep_preprocess', prefix=(), timeout=300, **kw):
    return subprocess.run([*prefix, *console_script(prog), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def _victim(tmp_path) -> Path:
    "A folder outside every output folder, holding a file named like an output of ours."
    victim = tmp_path/'victim'; victim.mkdir()
    (victim/'im0.png').write_text('precious')
    return victim


def _untouched(victim):
    assert sorted(p.name for p in victim.iterdir()) == ['im0.png'] and (victim/'im0.png').read_text() == 'precious'


def _assert_run_failed(r, out, why, prog='dicom_prep_preprocess'):
    "Exit 1 with one line saying `why`, the run recorded failed with it, and no source file recorded failed."
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith(f'{prog}: error: run failed: ') and why in lines[-1], r.stderr
    assert 'Traceback' not in r.stderr and not any(' decode_error: ' in l for l in lines), r.stderr
    assert query(out, 'select status, error like ? from runs order by id desc limit 1', [f'%{why}%']) == [('failed', 1)]
    assert query(out, "select count(*) from files where status != 'ok'") == [(0,)]


# ---- item 2: a symlink planted inside the output folder -------------------------------------------------------------

@pytest.mark.parametrize('level', ['images', 'images/study0000', 'images/study0000/sub'])
def test_planted_folder_symlink_is_refused_and_nothing_outside_changes(tmp_path, level):
    "A planted symlink at any folder level: exit 1 naming it, the file outside intact; once it is removed a rerun completes."
    src, out = _corpus(tmp_path/'src'), tmp_path/'out'
    for i in range(2): synth_ct(src/'study0000/sub'/f'im{i}.dcm', 32, seed=10 + i)
    assert _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    victim = _victim(tmp_path)
    shutil.rmtree(out/level); (out/level).symlink_to(victim)                        # planted where our images were
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2', '--verify')
    _assert_run_failed(r, out, f'{out/level} is a symlink')
    _untouched(victim)
    (out/level).unlink()
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2', '--verify')
    assert r.returncode == 0, r.stderr
    assert query(out, "select status, count(*) from files group by status") == [('ok', 8)]
    assert len(list((out/'images').rglob('*.png'))) == 8
    _untouched(victim)


def test_planted_file_symlinks_are_replaced_not_followed(tmp_path):
    "A symlink at a PNG's own name, or at the names of its next temporaries, is never written through."
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    victim = _victim(tmp_path)
    (out/'images/study0000/im0.png').unlink(); (out/'images/study0000/im0.png').symlink_to(victim/'im0.png')
    n = next(core._TEMPS)                                                          # this process writes the next temporaries
    for k in range(n + 1, n + 50): (out/'images/study0000'/f'.im1.png.{os.getpid()}-{k}.png').symlink_to(victim/'im0.png')
    r = preprocess(src, out, n_workers=0, quiet=True, force=True)                  # every PNG replaced through a temporary
    assert r.counts == {'ok': 3}
    assert not (out/'images/study0000/im0.png').is_symlink() and (out/'images/study0000/im0.png').read_bytes()[:4] == b'\x89PNG'
    _untouched(victim)


def test_symlinked_output_folder_is_allowed(tmp_path):
    "The output folder itself may be a symlink: users put it on another disk so."
    src, real = _corpus(tmp_path/'src', 3), tmp_path/'disk2/out'
    real.mkdir(parents=True); (tmp_path/'out').symlink_to(real)
    r = _cli('--dicom-dir', src, '--output-dir', tmp_path/'out', '--workers', '2', '--sheet')
    assert r.returncode == 0, r.stderr
    assert len(list((real/'images').rglob('*.png'))) == 3 and list((real/'sheets').glob('sheet_*.png'))


def test_contact_sheets_refuse_a_planted_sheets_folder(tmp_path):
    "--sheet with `sheets` planted as a symlink: no sheet is written outside; the summary says why."
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'
    out.mkdir(); victim = _victim(tmp_path); (out/'sheets').symlink_to(victim)
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0', '--sheet')
    assert r.returncode == 0 and f'Sheets not written: {out}/sheets is a symlink' in r.stdout, (r.stdout, r.stderr)
    _untouched(victim)


def test_nifti_refuses_a_planted_folder(tmp_path):
    "A symlink planted at nifti/<study>: the volume is not written through it; nothing outside changes."
    synth_series(tmp_path/'src/st1/a', n=4)
    out = tmp_path/'out'; (out/'nifti').mkdir(parents=True)
    victim = _victim(tmp_path); (out/'nifti/st1').symlink_to(victim)
    r = dicom_to_nifti(tmp_path/'src', out, n_workers=0, quiet=True)
    assert r.counts.get('converted', 0) == 0
    [(status, error)] = query(out, 'select status, error from volumes')
    assert status == 'error' and f'{out}/nifti/st1 is a symlink' in error
    _untouched(victim)


def _labelled_index(tmp_path, n=6):
    "A preprocessed index and a labels CSV on filename."
    src, out = _corpus(tmp_path/'src', n), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True, splits='train:1')
    labels = tmp_path/'labels.csv'
    with open(labels, 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['filename', 'label'])
        for (name,) in query(out, 'select filename from images order by filename'): w.writerow([name, 'c0'])
    return out, labels


def test_export_refuses_a_planted_class_folder(tmp_path):
    "imagefolder: `train/c0` planted as a symlink after a first export: the rerun fails naming it; nothing outside changes."
    out, labels = _labelled_index(tmp_path)
    exp = tmp_path/'exp'
    export(out/'dicom_prep.db', exp, 'imagefolder', labels, 'filename')
    victim = _victim(tmp_path)
    shutil.rmtree(exp/'train/c0'); (exp/'train/c0').symlink_to(victim)
    r = _cli('--db', out/'dicom_prep.db', '--out', exp, '--format', 'imagefolder', '--labels', labels, '--on', 'filename',
             prog='dicom_prep_export')
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0 and f'{exp}/train/c0 is a symlink' in r.stderr, r.stderr
    _untouched(victim)


def test_webdataset_shard_symlink_is_replaced(tmp_path):
    "webdataset: a symlink planted at a shard's name is replaced by the shard, never written through."
    out, labels = _labelled_index(tmp_path)
    exp = tmp_path/'exp'; exp.mkdir(); victim = _victim(tmp_path)
    (exp/'train-000000.tar').symlink_to(victim/'im0.png')
    export(out/'dicom_prep.db', exp, 'webdataset', labels, 'filename')
    assert not (exp/'train-000000.tar').is_symlink() and (exp/'train-000000.tar').stat().st_size > 1000
    _untouched(victim)


# ---- item 9: names capped in UTF-8 bytes ----------------------------------------------------------------------------

LONG = {'four_byte': '𝔸' * 63, 'four_byte_255': '𝔸' * 63 + 'abc', 'cjk': '長' * 85, 'ascii_255': 'x' * 251 + '.dcm',
        'combining': 'e\u0301' * 85}


def test_long_file_names_are_capped_in_bytes(tmp_path):
    "Source names of up to 255 bytes, in four-byte letters, CJK or with combining marks, multi-frame too: all processed."
    src, out = tmp_path/'src', tmp_path/'out'
    for kind, name in LONG.items():
        assert utf8_len(name) <= NAME_MAX
        synth_ct(src/'s1'/name, 32, seed=len(kind))
    synth_series(src/('長' * 80), n=2, prefix='𝔸' * 60)                              # a long study folder too
    synth_cine(src/'s1'/('𝔸' * 62), frames=3, size=16, syntax=None)                 # multi-frame: `_frame0000.png` appended
    r = preprocess(src, out, n_workers=0, quiet=True)
    assert r.counts == {'ok': len(LONG) + 3}, query(out, "select path, error from files where status != 'ok'")
    pngs = list((out/'images').rglob('*.png'))
    assert len(pngs) == len(LONG) + 2 + 3 and all(utf8_len(p.name) <= NAME_MAX for p in pngs)
    names = {p.name for p in pngs}
    assert any(n.startswith('𝔸' * 40) for n in names) and any(n.startswith('長' * 40) for n in names)   # still readable


def test_long_series_descriptions_make_volumes(tmp_path):
    "A 100-letter SeriesDescription (four-byte, CJK, combining marks) names a volume that is written."
    for k, desc in enumerate(['𝔸' * 100, '長' * 100, 'e\u0301' * 100, 'x' * 300]):
        synth_series(tmp_path/'src/st1'/str(k), n=3, series_number=k + 1, description=desc, SpecificCharacterSet='ISO_IR 192')
    out = tmp_path/'out'
    r = dicom_to_nifti(tmp_path/'src', out, n_workers=0, quiet=True, sidecar=True)
    assert r.counts.get('converted') == 4, query(out, 'select output_name, error from volumes')
    files = list((out/'nifti').rglob('*.nii.gz'))
    assert len(files) == 4 and all(utf8_len(p.name) <= NAME_MAX for p in files)
    exp = tmp_path/'exp'
    assert export(out/'dicom_prep.db', exp, 'nnunet').n_items == 4                  # flattened case names fit too
    assert all(utf8_len(p.name) <= NAME_MAX for p in exp.rglob('*'))


def test_long_labels_export_and_complete(tmp_path):
    "A 70-letter label (four-byte letters) makes its class folder; the export completes."
    out, labels = _labelled_index(tmp_path, 4)
    rows = list(csv.reader(open(labels)))
    with open(labels, 'w', newline='') as f: csv.writer(f).writerows([rows[0]] + [[n, '𝔸' * 70] for n, _ in rows[1:]])
    r = export(out/'dicom_prep.db', tmp_path/'exp', 'imagefolder', labels, 'filename')
    assert r.n_items == 4 and query(out, 'select status from exports') == [('completed',)]
    [folder] = (tmp_path/'exp/train').iterdir()
    assert folder.name.startswith('𝔸' * 40) and utf8_len(folder.name) <= NAME_MAX


# ---- item 13: the environment refuses a write ------------------------------------------------------------------------

def _fsize_limit(n):
    "preexec_fn: a real `ulimit -f` of `n` bytes (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def test_file_size_limit_fails_the_run_not_the_file(tmp_path):
    "`ulimit -f` below one PNG: exit 1, one line, nothing blamed on a file; without the limit a rerun completes."
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'
    synth_ct(src/'study0001/big.dcm', 1024, seed=3)                                # an uncompressed 1024² PNG: 1 MB
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2', '--image-size', '1024', '--png-level', '0',
             preexec_fn=_fsize_limit(800_000))
    _assert_run_failed(r, out, 'File too large (EFBIG)')
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2', '--image-size', '1024', '--png-level', '0')
    assert r.returncode == 0, r.stderr
    assert query(out, "select status, count(*) from files group by status") == [('ok', 4)]


@pytest.fixture
def immutable():
    "chattr +i on folders (even root gets EPERM creating files there); undone afterwards."
    done = []
    def make(folder):
        r = subprocess.run(['chattr', '+i', str(folder)], capture_output=True, text=True)
        if r.returncode: pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
        done.append(folder)
    yield make
    for f in done: subprocess.run(['chattr', '-i', str(f)])


def test_immutable_output_folder_fails_the_run_not_the_file(tmp_path, immutable):
    "EPERM writing into an immutable study folder: exit 1, one line; once writable again a rerun completes."
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'
    assert _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    synth_ct(src/'study0000/new.dcm', 32, seed=9)
    immutable(out/'images/study0000')
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2')
    _assert_run_failed(r, out, 'Operation not permitted (EPERM)')
    subprocess.run(['chattr', '-i', str(out/'images/study0000')], check=True)
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2')
    assert r.returncode == 0 and query(out, "select status, count(*) from files group by status") == [('ok', 4)], r.stderr


def test_read_only_output_folder_fails_the_run_not_the_file(tmp_path):
    "EACCES writing into a read-only study folder: exit 1, one line; once writable again a rerun completes."
    if not shutil.which('setpriv'): pytest.skip('setpriv is missing')
    no_override = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--inh-caps=-dac_override,-dac_read_search']
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'                             # root, but bound by permission bits
    run = lambda: _cli('--dicom-dir', src, '--output-dir', out, '--workers', '2', prefix=no_override)
    r = run(); assert r.returncode == 0, r.stderr
    synth_ct(src/'study0000/new.dcm', 32, seed=9)
    (out/'images/study0000').chmod(0o555)
    probe = subprocess.run(no_override + ['touch', str(out/'images/study0000/probe')], capture_output=True)
    if probe.returncode == 0: pytest.skip('permission bits do not bind here')
    r = run()
    _assert_run_failed(r, out, 'Permission denied (EACCES)')
    (out/'images/study0000').chmod(0o755)
    r = run()
    assert r.returncode == 0 and query(out, "select status, count(*) from files group by status") == [('ok', 4)], r.stderr


def test_environmental_errors_raise_in_a_library_call(tmp_path, immutable):
    "The same through `preprocess()`: `RunFailed`, not a file recorded failed."
    src, out = _corpus(tmp_path/'src', 2), tmp_path/'out'
    preprocess(src, out, n_workers=0, quiet=True)
    synth_ct(src/'study0000/new.dcm', 32, seed=9)
    immutable(out/'images/study0000')
    with pytest.raises(RunFailed, match='Operation not permitted'): preprocess(src, out, n_workers=0, quiet=True)
    assert query(out, "select count(*) from files where status != 'ok'") == [(0,)]


def test_planted_folder_at_a_png_name_fails_the_run(tmp_path):
    "A folder planted where a PNG goes (EISDIR): the run fails with one line; nothing is blamed on the source file."
    src, out = _corpus(tmp_path/'src', 3), tmp_path/'out'
    assert _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0').returncode == 0
    (out/'images/study0000/im1.png').unlink(); (out/'images/study0000/im1.png').mkdir()
    r = _cli('--dicom-dir', src, '--output-dir', out, '--workers', '0', '--force')
    _assert_run_failed(r, out, 'Is a directory (EISDIR)')
