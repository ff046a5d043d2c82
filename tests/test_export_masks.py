"""Issue 23 item 5: the exports that read masks. nnU-Net's `labelsTr` and MONAI's image/label pairs from label volumes,
the `segmentation` image/mask PNG pairs, several 0/1 label columns as a multi-hot label, and a kill -9 then a rerun
equal to a clean export. Most masks come from `conftest.stand_in_masks`, which stands in for the masks stage; the last
tests run the real stage on real data. Every
file is read back with an independent reader (nibabel, PIL, json, tarfile)."""
import hashlib, json, os, re, shutil, signal, sqlite3, subprocess, tarfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dicom_prep.layouts as lay
from conftest import console_script, query, stand_in_masks
from dicom_prep.export import export
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.paths import OWNER_FILE, UnsafePath
from dicom_prep.preprocess import preprocess
from dicom_prep.run import UsageError
from dicom_prep.synth import synth_dicom, synth_series


def _volumes(root:Path, n=8) -> Path:
    "`n` small series of `n` patients converted to NIfTI under root/out; returns the output folder."
    for s in range(n): synth_series(root/f'src/p{s}', n=4, series_number=s + 1, description='T1', seed=s, PatientID=f'P{s}')
    dicom_to_nifti(root/'src', root/'out', n_workers=0, quiet=True)
    return root/'out'


def _images(root:Path, n=12) -> Path:
    "`n` images (one of 3 frames) of 6 patients preprocessed under root/out; returns the output folder."
    for i in range(n): synth_dicom(root/f'src/s{i % 6}/im{i:02d}.dcm', 20, 16, frames=3 if i == 4 else 1, patient=f'P{i % 6}', seed=i)
    preprocess(root/'src', root/'out', n_workers=0, quiet=True)
    return root/'out'


def _values(ids) -> dict:
    "What nnU-Net needs of the stand-in's ids: consecutive values 1, 2, … in id order."
    return {i: k for k, i in enumerate(sorted(ids), 1)}


def _relabel(a, ids) -> np.ndarray:
    "The label map `a` as the export must write it (each id its consecutive value)."
    out = np.zeros_like(a)
    for i, v in _values(ids).items(): out[a == i] = v
    return out


@pytest.fixture(scope='module')
def volumes(tmp_path_factory):
    "8 converted volumes, 5 of them annotated (segments 2 and 5: not consecutive), and a clean nnU-Net export."
    out = _volumes(tmp_path_factory.mktemp('vol'))
    written = stand_in_masks(out, 'nifti', ids=(2, 5))
    return out, written


@pytest.mark.parametrize('fmt', ['nnunet', 'monai'])
def test_label_volumes_load_on_their_images_grid_with_the_dataset_json_labels(volumes, fmt, tmp_path):
    out, written = volumes
    r = export(out/'dicom_prep.db', tmp_path/fmt, fmt)
    ds = json.loads((tmp_path/fmt/'dataset.json').read_text())
    want = {'background': 0, 'liver': 1, 'tumour': 2}
    assert ds['labels'] == (want if fmt == 'nnunet' else {str(v): k for k, v in want.items()})
    entries = ds['training'] + ds['validation'] + ds['test']
    vid = {name: v for v, name in query(out, 'select id, output_name from volumes')}
    assert len(entries) == len(written) == 5 and r.n_items == 10
    for e in entries:
        image, label = nib.load(tmp_path/fmt/e['image']), nib.load(tmp_path/fmt/e['label'])
        assert e['label'] == e['image'].replace('images', 'labels', 1).replace('_0000.nii.gz', '.nii.gz')
        assert label.shape == image.shape[:3] and np.array_equal(label.affine, image.affine)
        got = np.asanyarray(label.dataobj)
        assert set(np.unique(got)) <= set(want.values()) and got.dtype == np.uint8
        [name] = [n for n in vid if Path(e['image']).name.startswith(n.replace('/', '__'))]
        assert np.array_equal(got, _relabel(written[vid[name]], (2, 5)))        # each voxel, remapped to its consecutive value
    report = json.loads((tmp_path/fmt/'labels_report.json').read_text())
    assert report['on'] == 'seg_path' and sorted(report['unlabelled']) == sorted(n for n, v in vid.items() if v not in written)
    assert len(report['unlabelled']) == 3 and not any(n.replace('/', '__') in str(p) for n in report['unlabelled'] for p in (tmp_path/fmt).rglob('*'))
    segments = json.loads((tmp_path/fmt/'segments.json').read_text())
    assert [(s['id'], s['value'], s['label']) for s in segments] == [(2, 1, 'liver'), (5, 2, 'tumour')]


def test_consecutive_segment_ids_are_linked_not_rewritten(tmp_path):
    out = _volumes(tmp_path, n=4)
    stand_in_masks(out, 'nifti', ids=(1, 2), skip=4)
    export(out/'dicom_prep.db', tmp_path/'nn', 'nnunet')
    segs = {Path(p).name: p for p, in query(out, 'select seg_path from volumes where seg_path is not null')}
    labels = sorted((tmp_path/'nn').glob('labels*/*.nii.gz'))
    assert len(labels) == len(segs) == 3
    assert all(os.stat(l).st_ino in {os.stat(out/p).st_ino for p in segs.values()} for l in labels)   # hardlinks, as the images


def test_a_label_value_that_is_no_segment_is_refused_naming_the_file(tmp_path):
    out = _volumes(tmp_path, n=3)
    stand_in_masks(out, 'nifti', ids=(2, 5), skip=5)
    with sqlite3.connect(out/'dicom_prep.db') as c: c.execute('delete from segments where id = 5')
    with pytest.raises(UsageError, match=r'_seg\.nii\.gz: label values \[5\] are no segment'): export(out/'dicom_prep.db', tmp_path/'nn', 'nnunet')


# ---------------------------------------------------------------------------------------------------- 2D pairs

@pytest.fixture(scope='module')
def frames(tmp_path_factory):
    "14 preprocessed frames, most with a mask of segments 2, 5 and 300 (16-bit PNGs)."
    out = _images(tmp_path_factory.mktemp('img'))
    return out, stand_in_masks(out, 'preprocess', ids=(2, 5, 300))


def test_segmentation_pairs_have_equal_sizes_and_consecutive_values(frames, tmp_path):
    out, written = frames
    r = export(out/'dicom_prep.db', tmp_path/'seg', 'segmentation')
    images = sorted((tmp_path/'seg').glob('*/images/*.png'))
    assert len(images) == len(written) > 0 and r.n_items == 2 * len(written)
    for p in images:
        mask = p.parent.parent/'masks'/p.name
        with Image.open(p) as im, Image.open(mask) as m:
            assert im.size == m.size and m.mode == 'L'                       # values 1..3: 8 bits are enough
            got = np.asarray(m)
        assert np.array_equal(got, _relabel(written[p.stem.replace('__', '/')], (2, 5, 300)).astype(np.uint8))
    report = json.loads((tmp_path/'seg/labels_report.json').read_text())
    everything = {f for f, in query(out, 'select filename from images')}
    assert report['on'] == 'mask_path' and sorted(report['unlabelled']) == sorted(everything - set(written)) != []
    assert [(s['id'], s['value']) for s in json.loads((tmp_path/'seg/segments.json').read_text())] == [(2, 1), (5, 2), (300, 3)]
    assert {p.parent.parent.name for p in images} <= {'train', 'valid', 'test'}
    assert export(out/'dicom_prep.db', tmp_path/'seg', 'segmentation').written == 0          # a rerun has nothing to do


def test_segmentation_needs_masks_and_takes_no_labels(tmp_path):
    out = _images(tmp_path, n=4)
    with pytest.raises(UsageError, match='needs masks, and the index has none'): export(out/'dicom_prep.db', tmp_path/'x', 'segmentation')
    with pytest.raises(UsageError, match='takes its labels from the masks'):
        export(out/'dicom_prep.db', tmp_path/'x', 'segmentation', label_col='body_part')


def test_the_manifest_gives_each_mask_its_absolute_path(frames, tmp_path):
    out, written = frames
    export(out/'dicom_prep.db', tmp_path/'m', 'csv')
    df = pd.read_csv(tmp_path/'m/manifest.csv', keep_default_na=False)
    assert {f for f, m in zip(df['filename'], df['mask'], strict=True) if m} == set(written)
    assert all(Path(m).is_file() and Path(m).is_relative_to(out/'masks') for m in df['mask'] if m)


# ---------------------------------------------------------------------------------------------------- several label columns

RSNA = ['any', 'epidural', 'subdural']


@pytest.fixture(scope='module')
def rsna(tmp_path_factory):
    "A preprocessed corpus and an RSNA-style labels file: one row per image (by sop_uid), a 0/1 column per finding, one image unlabelled."
    root = tmp_path_factory.mktemp('rsna')
    out, rng = _images(root, n=8), np.random.default_rng(3)
    sops = sorted({s for s, in query(out, 'select sop_uid from images')})
    hot = {s: [int(v) for v in rng.integers(0, 2, 3)] for s in sops[1:]}
    pd.DataFrame([dict(sop_uid=s, **dict(zip(RSNA, h, strict=True))) for s, h in hot.items()]).to_csv(root/'rsna.csv', index=False)
    return out, root/'rsna.csv', hot


def test_several_label_columns_join_as_a_multi_hot_label(rsna, tmp_path):
    out, csv, hot = rsna
    sop = dict(query(out, 'select filename, sop_uid from images'))
    r = export(out/'dicom_prep.db', tmp_path/'csv', 'csv', labels=csv, on='sop_uid', label_col=','.join(RSNA))
    df = pd.read_csv(tmp_path/'csv/manifest.csv', keep_default_na=False)
    for f, label, *cols in zip(df['filename'], df['label'], *(df[c] for c in RSNA), strict=True):
        want = hot.get(sop[f])
        assert (json.loads(label) if label else None) == want and [str(c) for c in cols] == [str(v) for v in want or ['', '', '']]
    assert r.report.unlabelled == [f for f, s in sorted(sop.items()) if s not in hot] != []
    export(out/'dicom_prep.db', tmp_path/'pq', 'parquet', labels=csv, on='sop_uid', label_col=RSNA)
    pq = pd.read_parquet(tmp_path/'pq/manifest.parquet')
    assert {f: list(l) for f, l in zip(pq['filename'], pq['label'], strict=True) if l is not None} == {f: hot[s] for f, s in sop.items() if s in hot}


def test_webdataset_samples_carry_the_multi_hot_label(rsna, tmp_path):
    out, csv, hot = rsna
    export(out/'dicom_prep.db', tmp_path/'w', 'webdataset', labels=csv, on='sop_uid', label_col=','.join(RSNA))
    got = {}
    for shard in (tmp_path/'w').glob('*.tar'):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith('.json'):
                    meta = json.loads(t.extractfile(m).read())
                    got[meta['filename']] = meta['label']
                    assert [meta[c] for c in RSNA] == meta['label']
    assert got == {f: hot[s] for f, s in query(out, 'select filename, sop_uid from images') if s in hot}      # each frame, unlabelled ones left out


def test_monai_takes_a_multi_hot_label_and_imagefolder_refuses_several(tmp_path):
    out = _volumes(tmp_path, n=4)
    series = [s for s, in query(out, "select series_uid from volumes where status='ok' order by output_name")]
    pd.DataFrame(dict(series_uid=series, any=[1, 0, 1, 1], epidural=[0, 0, 1, 0])).to_csv(tmp_path/'l.csv', index=False)
    export(out/'dicom_prep.db', tmp_path/'m', 'monai', labels=tmp_path/'l.csv', on='series_uid', label_col='any,epidural')
    ds = json.loads((tmp_path/'m/dataset.json').read_text())
    assert ds['labels'] == {'0': 'any', '1': 'epidural'}
    assert sorted(e['label'] for e in ds['training'] + ds['validation'] + ds['test']) == sorted([[1, 0], [0, 0], [1, 1], [1, 0]])
    for fmt in ('imagefolder', 'nnunet'):
        with pytest.raises(UsageError, match=f'--format {fmt} takes one label'):
            export(out/'dicom_prep.db', tmp_path/fmt, fmt, labels=tmp_path/'l.csv', on='series_uid', label_col='any,epidural')


def test_a_label_column_value_that_is_not_0_or_1_is_refused_naming_line_and_column(rsna, tmp_path):
    out, csv, _ = rsna
    bad = pd.read_csv(csv, dtype=str); bad.loc[2, 'subdural'] = 'yes'; bad.to_csv(tmp_path/'bad.csv', index=False)
    with pytest.raises(UsageError, match=r"line 4, column 'subdural': 'yes' is not 0 or 1"):
        export(out/'dicom_prep.db', tmp_path/'x', 'csv', labels=tmp_path/'bad.csv', on='sop_uid', label_col=RSNA)
    with pytest.raises(UsageError, match='several --label-column need --labels'):
        export(out/'dicom_prep.db', tmp_path/'x', 'csv', label_col='body_part,modality')


# ---------------------------------------------------------------------------------------------------- kill -9

def _tree(out) -> dict:
    "Every file under `out` but its owner file: path -> sha1 of its bytes (temporaries included)."
    return {p.relative_to(out).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob('*'))
            if p.is_file() and p.name != OWNER_FILE}


def _after_call(name, n):
    "A fault: the `n`-th call of `layouts.<name>` is SIGKILLed right after it returns."
    def install():
        real, calls = getattr(lay, name), []
        def patched(*a, **kw):
            res = real(*a, **kw); calls.append(1)
            if len(calls) == n: os.kill(os.getpid(), signal.SIGKILL)
            return res
        setattr(lay, name, patched)
    return install


def _half_written_label():
    "A fault: the first rewritten label file is killed half-way through its write (its hidden temporary is left behind)."
    real = lay.atomic_path
    @contextmanager
    def half(dest, root=None):
        with real(dest, root) as tmp:
            tmp.write_bytes(b'half a label'); os.kill(os.getpid(), signal.SIGKILL)
            yield tmp
    lay.atomic_path = half


def _killed(db, out, fmt, fault) -> int:
    "Run an export of `fmt` in a forked child with `fault` installed; returns its wait status."
    pid = os.fork()
    if pid == 0:
        try: fault(); export(db, out, fmt)
        finally: os._exit(0)
    return os.waitpid(pid, 0)[1]


FAULTS = {f'{name}-{n}': _after_call(name, n) for name in ('link_output', 'write_label') for n in (1, 2, 4)} | {'half-written': _half_written_label}


@pytest.mark.parametrize('fault', FAULTS)
@pytest.mark.parametrize('fmt', ['nnunet', 'segmentation'])
def test_a_kill_mid_export_then_a_rerun_equals_a_clean_export(volumes, frames, fmt, fault, tmp_path):
    "Killed after a link, after a rewritten label, or half-way through one: the rerun sweeps and completes, file for file and record for record."
    out = (volumes if fmt == 'nnunet' else frames)[0]
    clean = export(out/'dicom_prep.db', tmp_path/'clean', fmt)
    assert _killed(out/'dicom_prep.db', tmp_path/'x', fmt, FAULTS[fault]) == signal.SIGKILL
    assert _tree(tmp_path/'x') != _tree(tmp_path/'clean')                       # the kill left a partial export
    again = export(out/'dicom_prep.db', tmp_path/'x', fmt)
    assert _tree(tmp_path/'x') == _tree(tmp_path/'clean') and again.n_items == clean.n_items
    rec = lambda d: set(query(out, 'select item, label, split, sig from export_items where out_dir = ?', [os.path.relpath(d, out)]))
    assert rec(tmp_path/'x') == rec(tmp_path/'clean') != set()


# ---------------------------------------------------------------------------------------------------- a changed index

def test_a_segment_added_in_a_gap_renumbers_and_rewrites_the_label_files(tmp_path):
    "Values follow the ids in order: segment 3 between 2 and 5 moves 5 from value 2 to 3, and the rerun rewrites what holds it."
    out = _volumes(tmp_path, n=3)
    written = stand_in_masks(out, 'nifti', ids=(2, 5), skip=5)
    first = export(out/'dicom_prep.db', tmp_path/'nn', 'nnunet')
    assert export(out/'dicom_prep.db', tmp_path/'nn', 'nnunet').written == 0
    with sqlite3.connect(out/'dicom_prep.db') as c: c.execute("insert into segments (id, key, label) values (3, 'kidney|SCT', 'kidney')")
    again = export(out/'dicom_prep.db', tmp_path/'nn', 'nnunet')
    assert again.written == len(written) and first.written == 2 * len(written)       # only the label volumes, not the images
    assert json.loads((tmp_path/'nn/dataset.json').read_text())['labels'] == {'background': 0, 'liver': 1, 'kidney': 2, 'tumour': 3}
    for f in (tmp_path/'nn').glob('labels*/*.nii.gz'):
        assert set(np.unique(np.asanyarray(nib.load(f).dataobj))) <= {0, 1, 3}


@pytest.mark.parametrize('table, col, bad, why', [('images', 'mask_path', '../../outside.png', 'is not a plain relative path'),
                                                  ('images', 'mask_path', 'images/x.png', 'is not in its masks/ folder'),
                                                  ('volumes', 'seg_path', 'nifti/../../x.nii.gz', 'is not a plain relative path')])
def test_a_hostile_mask_path_is_refused_naming_its_row(table, col, bad, why, tmp_path):
    "A received index is untrusted: a mask or label volume path must stay in its folder of the output, as the images' do."
    out = _volumes(tmp_path, n=2) if table == 'volumes' else _images(tmp_path, n=2)
    stand_in_masks(out, 'nifti' if table == 'volumes' else 'preprocess', skip=10)
    with sqlite3.connect(out/'dicom_prep.db') as c: c.execute(f'update {table} set {col} = ?', [bad])
    with pytest.raises(UnsafePath, match=f"{table} row .*: {col} '{re.escape(bad)}' {why}"):
        export(out/'dicom_prep.db', tmp_path/'x', 'nnunet' if table == 'volumes' else 'segmentation')


def test_the_command_line_takes_the_segmentation_format_and_several_label_columns(frames, rsna, tmp_path):
    out, written = frames
    r = subprocess.run(console_script('dicom_prep_export') + ['--db', str(out/'dicom_prep.db'), '--out', str(tmp_path/'seg'), '--format', 'segmentation'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"Masks: {len(written)} with a mask exported" in r.stdout, r.stderr[-2000:]
    out, csv, hot = rsna
    r = subprocess.run(console_script('dicom_prep_export') + ['--db', str(out/'dicom_prep.db'), '--out', str(tmp_path/'m'), '--labels', str(csv),
                       '--on', 'sop_uid', '--label-column', 'any,epidural,subdural'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(RSNA) <= set(pd.read_csv(tmp_path/'m/manifest.csv').columns)
    r = subprocess.run(console_script('dicom_prep_export') + ['--db', str(out/'dicom_prep.db'), '--out', str(tmp_path/'f'), '--format', 'imagefolder',
                       '--labels', str(csv), '--on', 'sop_uid', '--label-column', 'any,epidural'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and '--format imagefolder takes one label' in r.stderr and 'Traceback' not in r.stderr


# ---------------------------------------------------------------------------------------------------- the real masks stage

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'
SEG_DATA, RT_DATA = SHARED/'seg_highdicom', SHARED/'rtstruct_rtutils'/'mock_data'


def _real_ct_and_seg(root:Path) -> Path:
    "pydicom's CT2 series and highdicom's binary SEG of it, in a source folder."
    from dicom_prep.sources import sample_data_dirs
    ct2 = next(p for d in sample_data_dirs() for p in d.rglob('77654033/CT2') if p.is_dir())
    shutil.copytree(ct2, root/'src/ct'); (root/'src/seg').mkdir()
    shutil.copy(SEG_DATA/'seg_image_ct_binary.dcm', root/'src/seg/seg.dcm')
    return root/'src'


@pytest.mark.skipif(not RT_DATA.is_dir(), reason=f"{RT_DATA} is absent")
def test_nnunet_export_of_a_real_ct_and_its_rtstruct_through_the_masks_stage(tmp_path):
    "Issue 23's 'done when', in 3D: rt-utils' CT and its RTSTRUCT through dicom_prep_nifti and the nnU-Net export (CT2 has gaps: no volume)."
    (tmp_path/'src').mkdir()
    for name in ('ct_1.dcm', 'ct_2.dcm', 'rt.dcm'): shutil.copy(RT_DATA/name, tmp_path/'src'/name)
    dicom_to_nifti(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    export(tmp_path/'out/dicom_prep.db', tmp_path/'nn', 'nnunet')
    ds = json.loads((tmp_path/'nn/dataset.json').read_text())
    labels = sorted((tmp_path/'nn').glob('labels*/*.nii.gz'))
    assert labels and len(ds['labels']) > 1
    for f in labels:
        image, label = nib.load(str(f).replace('labels', 'images', 1).replace('.nii.gz', '_0000.nii.gz')), nib.load(f)
        assert label.shape == image.shape[:3] and np.array_equal(label.affine, image.affine)
        assert set(np.unique(np.asanyarray(label.dataobj))) <= set(ds['labels'].values()) and np.asanyarray(label.dataobj).any()


@pytest.mark.skipif(not SEG_DATA.is_dir(), reason=f"{SEG_DATA} is absent")
def test_segmentation_export_of_a_real_ct_and_its_seg_through_the_masks_stage(tmp_path):
    "The 2D path: a real CT and its SEG through dicom_prep_preprocess and the segmentation export."
    preprocess(_real_ct_and_seg(tmp_path), tmp_path/'out', n_workers=0, quiet=True)
    r = export(tmp_path/'out/dicom_prep.db', tmp_path/'seg', 'segmentation')
    masks = sorted((tmp_path/'seg').glob('*/masks/*.png'))
    assert masks and r.n_items == 2 * len(masks)
    for m in masks:
        with Image.open(m) as mask, Image.open(m.parent.parent/'images'/m.name) as image: assert mask.size == image.size
    assert any(np.asarray(Image.open(m)).any() for m in masks)
