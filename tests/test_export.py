"""From the index to training: metadata columns, lossless 16-bit pixels, checked label joins, and every export
format read back by an independent reader (tarfile + PIL, the ImageFolder walk, pandas, dataset.json keys)."""
import io, json, os, sqlite3, subprocess, tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from dicom_prep.sources import sample_file
from dicom_prep.export import KEYS, export, images_df
from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom, synth_series
from conftest import console_script, query, ro, source_file

IMG_EXTS = ('.png',)


def _db_rows(out, sql='select * from images order by filename') -> list[dict]:
    with ro(out) as c: return [dict(r) for r in c.execute(sql)]


# ---------------------------------------------------------------------------------------------------- 16-bit pixels

@pytest.fixture(scope='module')
def sample16(tmp_path_factory):
    "The bundled sample data (pydicom's and pydicom-data's files) preprocessed at 16 bits, native size."
    out = tmp_path_factory.mktemp('s16')
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--test', '--output-dir', str(out), '--bit-depth', '16',
                       '--image-size', '100000', '--workers', '2'], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_16bit_round_trip_on_the_sample_data(sample16):
    "CT PNGs hold exactly pixel_array * slope + intercept + 32768; MR PNGs the stored values plus the recorded offset."
    rows = [r for r in _db_rows(sample16) if r['modality'] in ('CT', 'MR') and r['num_frames'] == 1 and r['png_offset'] is not None]
    checked = {'CT': 0, 'MR': 0}
    for r in rows:
        ds = pydicom.dcmread(source_file(sample16, r['source_path']))
        if 'ModalityLUTSequence' in ds or ds.pixel_array.ndim != 2: continue
        png = np.asarray(Image.open(sample16/r['thumbnail_path'])).astype(np.int64)
        if r['modality'] == 'CT':
            want = np.rint(ds.pixel_array * float(ds.get('RescaleSlope', 1)) + float(ds.get('RescaleIntercept', 0))) + 32768
        else: want = ds.pixel_array.astype(np.int64) + r['png_offset']
        assert r['bit_depth'] == 16 and np.array_equal(png, np.clip(want, 0, 65535)), r['source_path']
        checked[r['modality']] += 1
    assert checked['CT'] >= 3 and checked['MR'] >= 3, checked


def test_metadata_columns(sample16):
    "The filter-worthy tags are columns; per-frame position and spacing are JSON lists."
    ct = next(r for r in _db_rows(sample16) if r['source_path'].endswith('/CT_small.dcm'))
    ds = pydicom.dcmread(source_file(sample16, ct['source_path']))
    assert (ct['manufacturer'], ct['kvp'], ct['study_date'], ct['instance_number']) == (ds.Manufacturer, float(ds.KVP), '2004-01-19', int(ds.InstanceNumber))
    assert json.loads(ct['image_position']) == [float(v) for v in ds.ImagePositionPatient]
    assert json.loads(ct['pixel_spacing']) == [float(v) for v in ds.PixelSpacing] and ct['slice_thickness'] == float(ds.SliceThickness)


def test_tags_and_all_tags_columns(tmp_path):
    src = tmp_path/'src'
    synth_dicom(src/'s/a.dcm', EchoTime='12.5', RepetitionTime='400', SeriesDescription='T1 axial', PatientName='Doe^Jane')
    r = preprocess(src, tmp_path/'out', n_workers=0, quiet=True, tags='EchoTime,RepetitionTime', all_tags=True)
    row = _db_rows(tmp_path/'out')[0]
    assert (row['EchoTime'], row['RepetitionTime'], row['series_description']) == (12.5, 400, 'T1 axial')
    with ro(tmp_path/'out') as c:
        assert c.execute("select json_extract(all_tags, '$.EchoTime') from images").fetchone()[0] == 12.5
    assert r.status == 'completed'
    bad = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'o2'),
                                                                    '--tags', 'EchoTme'], capture_output=True, text=True)
    assert bad.returncode == 2 and "'EchoTme' is not a DICOM keyword" in bad.stderr and bad.stderr.count('\n') == 1


# ---------------------------------------------------------------------------------------------------- labels

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    "24 images (one 3-frame file) of 6 patients, CT and MR, preprocessed."
    root = tmp_path_factory.mktemp('corpus')
    for i in range(22):
        synth_dicom(root/f'src/study_{i % 6}/im{i:02d}.dcm', 20, 16, frames=3 if i == 7 else 1, modality=('CT', 'MR')[i % 2],
                    patient=f'P{i % 6}', seed=i, BodyPartExamined=('CHEST', 'HEAD')[i % 2])
    preprocess(root/'src', root/'out', n_workers=0, quiet=True)
    return root


def _labels(df, on, rng):
    "Labels for most keys of `on` (some missing), plus two keys that match no image."
    keys = sorted(df[on].dropna().unique())
    keep = [k for k in keys if rng.random() < 0.8]
    return pd.DataFrame({on: keep + ['nope-1', 'nope-2'], 'y': [f"c{rng.integers(3)}" for _ in keep] + ['c0', 'c1']})


@pytest.mark.parametrize('on', KEYS)
def test_label_join_matches_pandas(corpus, on, tmp_path):
    "On every key: labelled images, unlabelled images and unmatched labels are what a pandas merge says."
    df = images_df(corpus/'out/dicom_prep.db')
    labels = _labels(df, on, np.random.default_rng(len(on)))
    labels.to_csv(tmp_path/'l.csv', index=False)
    r = export(corpus/'out/dicom_prep.db', tmp_path/'x', 'csv', labels=tmp_path/'l.csv', on=on)
    ref = df.merge(labels, on=on, how='left')
    got = pd.read_csv(tmp_path/'x/manifest.csv', dtype=str, keep_default_na=False)
    assert dict(zip(got['filename'], got['label'], strict=True)) == {f: (y if isinstance(y, str) else '') for f, y in zip(ref['filename'], ref['y'], strict=True)}
    report = json.loads((tmp_path/'x/labels_report.json').read_text())
    assert report['unmatched'] == ['nope-1', 'nope-2'] and r.report.n_labelled == ref['y'].notna().sum()
    assert sorted(report['unlabelled']) == sorted(ref.loc[ref['y'].isna(), 'filename'])


def test_duplicate_labels_are_refused_with_their_rows(corpus, tmp_path):
    pd.DataFrame(dict(patient_id=['P0', 'P1', 'P0'], y=['a', 'b', 'c'])).to_csv(tmp_path/'d.csv', index=False)
    r = subprocess.run(console_script('dicom_prep_export') + ['--db', str(corpus/'out/dicom_prep.db'), '--out', str(tmp_path/'x'),
                       '--labels', str(tmp_path/'d.csv'), '--on', 'patient_id'], capture_output=True, text=True)
    assert r.returncode == 2 and 'appear more than once' in r.stderr and 'P0' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'x/manifest.csv').exists()


# ---------------------------------------------------------------------------------------------------- exports, read back

@pytest.fixture(scope='module')
def labelled(corpus):
    "The corpus's images with a label per patient (P5 unlabelled), and the labels file."
    lab = corpus/'labels.csv'
    pd.DataFrame(dict(patient_id=[f'P{i}' for i in range(5)], y=['normal', 'nodule', 'normal', 'mass', 'nodule'])).to_csv(lab, index=False)
    df = images_df(corpus/'out/dicom_prep.db').merge(pd.read_csv(lab), on='patient_id', how='left')
    return lab, {r['filename']: (r['split'], r['y']) for r in df.to_dict('records')}


def _imagefolder_walk(root):
    "What torchvision's ImageFolder does: classes are the sorted subfolders; samples every image file below each."
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    return [(os.path.join(d, f), c) for c in classes for d, _, fs in sorted(os.walk(os.path.join(root, c))) for f in sorted(fs)
            if f.lower().endswith(IMG_EXTS)]


def test_imagefolder_is_what_imagefolder_reads(corpus, labelled, tmp_path):
    lab, want = labelled
    r = export(corpus/'out/dicom_prep.db', tmp_path/'f', 'imagefolder', labels=lab, on='patient_id')
    got = {}
    for split in ('train', 'valid', 'test'):
        if not (tmp_path/'f'/split).exists(): continue
        for path, cls in _imagefolder_walk(tmp_path/'f'/split): got[Path(path).stem] = (split, cls)
    expected = {f.replace('/', '__'): v for f, v in want.items() if isinstance(v[1], str)}
    assert got == expected and r.n_items == len(expected)
    png = next((tmp_path/'f').rglob('*.png'))
    src = corpus/'out/images'/(png.stem.replace('__', '/') + '.png')
    assert os.stat(png).st_ino == os.stat(src).st_ino                     # a hardlink, not a copy


def test_webdataset_shards_read_back(corpus, labelled, tmp_path):
    lab, want = labelled
    r = export(corpus/'out/dicom_prep.db', tmp_path/'w', 'webdataset', labels=lab, on='patient_id', shard_size=0.002)
    got, shards = {}, sorted((tmp_path/'w').glob('*.tar'))
    for shard in shards:
        with tarfile.open(shard) as t:
            files = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for key in {n.split('.')[0] for n in files}:
            meta = json.loads(files[f'{key}.json'])
            assert Image.open(io.BytesIO(files[f'{key}.png'])).size == (meta['columns'], meta['rows'])
            assert shard.name.startswith(meta['split'] + '-')
            got[meta['filename']] = (meta['split'], meta['label'])
    assert got == {f: v for f, v in want.items() if isinstance(v[1], str)} and len(shards) > 2 and r.n_items == len(got)


def test_parquet_and_csv_manifests(corpus, labelled, tmp_path):
    lab, want = labelled
    for fmt in ('csv', 'parquet'):
        export(corpus/'out/dicom_prep.db', tmp_path/fmt, fmt, labels=lab, on='patient_id')
        df = pd.read_csv(tmp_path/'csv/manifest.csv') if fmt == 'csv' else pd.read_parquet(tmp_path/'parquet/manifest.parquet')
        assert {r['filename']: (r['split'], r['label'] if isinstance(r['label'], str) else r['label'] or np.nan) for r in df.to_dict('records')}.keys() == want.keys()
        assert all(Path(p).is_file() for p in df['path'])
        assert {f: (s, l if isinstance(l, str) else None) for f, s, l in zip(df['filename'], df['split'], df['label'], strict=True)} == \
               {f: (s, y if isinstance(y, str) else None) for f, (s, y) in want.items()}


def test_exports_are_incremental(corpus, labelled, tmp_path):
    "A rerun writes nothing; new data adds only its items; a changed label moves just that image; all recorded in the DB."
    lab, _ = labelled
    src, db = tmp_path/'src', tmp_path/'out/dicom_prep.db'
    for i in range(8): synth_dicom(src/f's{i % 2}/im{i}.dcm', 16, 16, patient=f'P{i % 4}', seed=i)
    preprocess(src, tmp_path/'out', n_workers=0, quiet=True)
    pd.DataFrame(dict(patient_id=['P0', 'P1', 'P2', 'P3'], y=['a', 'b', 'a', 'b'])).to_csv(tmp_path/'l.csv', index=False)
    for fmt in ('imagefolder', 'webdataset'):
        first = export(db, tmp_path/fmt, fmt, labels=tmp_path/'l.csv', on='patient_id', shard_size=0.001)
        assert (first.written, first.removed) == (8, 0)
        assert export(db, tmp_path/fmt, fmt, labels=tmp_path/'l.csv', on='patient_id', shard_size=0.001).written == 0
    synth_dicom(src/'s0/new.dcm', 16, 16, patient='P0', seed=99)
    preprocess(src, tmp_path/'out', n_workers=0, quiet=True)
    pd.DataFrame(dict(patient_id=['P0', 'P1', 'P2', 'P3'], y=['a', 'b', 'a', 'c'])).to_csv(tmp_path/'l.csv', index=False)
    n_p3 = sum(1 for i in range(8) if i % 4 == 3)
    for fmt in ('imagefolder', 'webdataset'):
        r = export(db, tmp_path/fmt, fmt, labels=tmp_path/'l.csv', on='patient_id', shard_size=0.001)
        assert (r.written, r.removed, r.n_items) == (1 + n_p3, n_p3 if fmt == 'imagefolder' else 0, 9), (fmt, r)
    assert len(list((tmp_path/'imagefolder').rglob('*.png'))) == 9
    with ro(db) as c:
        assert c.execute("select count(*) from export_items where out_dir=?", ['../imagefolder']).fetchone()[0] == 9   # relative to the index
        assert [r[0] for r in c.execute("select status from exports")] == ['completed'] * 6


def test_nnunet_and_monai_dataset_json(tmp_path):
    src = tmp_path/'src'
    for s in range(6): synth_series(src/f'p{s}', n=4, series_number=s + 1, description='T1', seed=s, PatientID=f'P{s}')
    dicom_to_nifti(src, tmp_path/'out', n_workers=0, quiet=True)
    db = tmp_path/'out/dicom_prep.db'
    with ro(db) as c: series = [r[0] for r in c.execute("select series_uid from volumes where status='ok'")]
    pd.DataFrame(dict(series_uid=series, y=['tumour', 'none'] * 3)).to_csv(tmp_path/'l.csv', index=False)
    for fmt in ('nnunet', 'monai'):
        export(db, tmp_path/fmt, fmt, labels=tmp_path/'l.csv', on='series_uid')
        ds = json.loads((tmp_path/fmt/'dataset.json').read_text())
        need = {'channel_names', 'labels', 'numTraining', 'file_ending'} if fmt == 'nnunet' else {'name', 'modality', 'labels', 'numTraining', 'numTest'}
        assert need <= set(ds) and {'training', 'validation', 'test'} <= set(ds)
        entries = ds['training'] + ds['validation'] + ds['test']
        assert len(entries) == 6 and all((tmp_path/fmt/e['image']).is_file() for e in entries)
        assert ds['numTraining'] == len(ds['training']) + len(ds['validation']) and {e['label'] for e in entries} == {'tumour', 'none'}
        assert all(e['image'].startswith('./imagesTs/' if e in ds['test'] else './imagesTr/') and e['image'].endswith('_0000.nii.gz') for e in entries)
    assert ds['labels'] == {'0': 'none', '1': 'tumour'}


def test_nnunet_takes_one_modality_per_dataset_and_leaves_out_4d_volumes(tmp_path):
    "CT and MR series, and an fMRI-like 4-D MR series: one modality per dataset, its only channel named for it; 4-D only when asked."
    from pydicom.uid import generate_uid
    src, uid = tmp_path/'src', generate_uid()
    for s in range(2): synth_series(src/f'ct{s}', n=4, series_number=1, seed=s, PatientID=f'C{s}')
    synth_series(src/'mr', n=4, series_number=2, modality='MR', seed=5, PatientID='M0')
    for t in range(3): synth_series(src/'fmri', n=4, series_uid=uid, modality='MR', prefix=f'T{t}', first_instance=10 * t + 1, seed=t,
                                    TemporalPositionIdentifier=t + 1, AcquisitionNumber=t + 1, RepetitionTime='2000', PatientID='M1')
    dicom_to_nifti(src, tmp_path/'out', n_workers=0, quiet=True)
    db = tmp_path/'out/dicom_prep.db'
    assert sorted(query(db, "select modality, n_timepoints from volumes where status='ok'")) == [('CT', 1), ('CT', 1), ('MR', 1), ('MR', 3)]
    run = lambda out, *a: subprocess.run(console_script('dicom_prep_export') + ['--db', str(db), '--out', str(tmp_path/out), '--format', 'nnunet', *a],
                                         capture_output=True, text=True, timeout=120)
    r = run('mixed')
    assert r.returncode == 2 and 'takes one modality per dataset (each case is one channel), and the index has CT 2, MR 2: give --modality' in r.stderr
    r = run('ct', '--modality', 'ct')
    ds = json.loads((tmp_path/'ct/dataset.json').read_text())
    assert r.returncode == 0 and ds['channel_names'] == {'0': 'CT'} and len(ds['training'] + ds['validation'] + ds['test']) == 2
    assert sorted(p.name for p in (tmp_path/'ct').rglob('*.nii.gz')) == sorted(e['image'].rsplit('/', 1)[1] for e in ds['training'] + ds['validation'] + ds['test'])
    r = run('mr', '--modality', 'MR')
    assert r.returncode == 0 and '4-D volumes left out (fMRI, DTI, perfusion): 1;' in r.stdout and len(list((tmp_path/'mr').rglob('*.nii.gz'))) == 1
    r = run('mr4d', '--modality', 'MR', '--include-4d')
    assert r.returncode == 0 and 'left out' not in r.stdout and len(list((tmp_path/'mr4d').rglob('*.nii.gz'))) == 2
    assert json.loads((tmp_path/'mr4d/dataset.json').read_text())['channel_names'] == {'0': 'MR'}


# ---------------------------------------------------------------------------------------------------- PHI

PLANTED = dict(PatientName='Doe^Johnathan', PatientID='PID7654321', PatientBirthDate='19580704', OtherPatientIDs='ALTID99887',
               InstitutionName='St Elsewhere Hospital', ReferringPhysicianName='Dr^Quackenbush', AccessionNumber='ACC5550123')

def test_pseudonymized_all_tags_leak_nothing(tmp_path):
    "--pseudonymize --all-tags: no planted identifier anywhere in the DB or any export."
    src = tmp_path/'src'
    for i in range(6):
        synth_dicom(src/f'st{i % 2}/im{i}.dcm', 16, 16, patient=PLANTED['PatientID'], seed=i,
                    **{k: v for k, v in PLANTED.items() if k != 'PatientID'})
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'out'),
                       '--pseudonymize', '--all-tags', '--workers', '0'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    db = tmp_path/'out/dicom_prep.db'
    pd.DataFrame(dict(patient_id=[PLANTED['PatientID']], y=['x'])).to_csv(tmp_path/'l.csv', index=False)
    for fmt in ('csv', 'webdataset', 'imagefolder'):
        e = export(db, tmp_path/'exp'/fmt, fmt, labels=tmp_path/'l.csv', on='patient_id')
        assert e.report.n_labelled == 6                                   # labels on raw IDs still join (keyed pseudonyms)
    with sqlite3.connect(db) as c: dump = '\n'.join(c.iterdump())
    blobs = [dump.encode()] + [p.read_bytes() for p in (tmp_path/'exp').rglob('*') if p.is_file()]
    names = ' '.join(str(p) for p in (tmp_path/'exp').rglob('*'))
    for v in PLANTED.values():
        for form in {v, v.replace('^', ' '), v[:4] + '-' + v[4:6] + '-' + v[6:] if v.isdigit() else v}:
            assert not any(form.encode() in b for b in blobs) and form not in names, form
    with ro(db) as c:
        tags = json.loads(c.execute('select all_tags from images limit 1').fetchone()[0])
    assert 'Modality' in tags and not set(tags) & set(PLANTED)


def test_status_xlsx(corpus, tmp_path):
    r = subprocess.run(console_script('dicom_prep_status') + ['--db', str(corpus/'out/dicom_prep.db'), '--xlsx', str(tmp_path/'t.xlsx')],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sheets = pd.read_excel(tmp_path/'t.xlsx', sheet_name=None)
    assert list(sheets)[:2] == ['Summary', 'preprocess'] and len(sheets['preprocess']) == 22
    assert {'path', 'status', 'reason', 'output', 'processed_at', 'run_id'} <= set(sheets['preprocess'].columns)


# ---------------------------------------------------------------------------------------------------- refusals (hostile review)

def test_pseudonymised_folder_refuses_what_would_leak(tmp_path):
    "nifti into a pseudonymised folder, a rerun without --pseudonymize (even forced), a private state inside the folder: refused."
    src, out = tmp_path/'src', tmp_path/'out'
    synth_series(src/'SMITH_JOHN', n=3, PatientID='MRN777')
    pre = console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--workers', '0']
    assert subprocess.run(pre + ['--output-dir', str(out), '--pseudonymize'], capture_output=True).returncode == 0
    before = (out/'dicom_prep.db').read_bytes()
    for cmd in (console_script('dicom_prep_nifti') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0'],
                pre + ['--output-dir', str(out), '--force']):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 2 and 'pseudonymised index' in r.stderr and r.stderr.count('\n') == 1, r.stderr
    assert (out/'dicom_prep.db').read_bytes() == before and not (out/'nifti').exists()
    r = subprocess.run(pre + ['--output-dir', str(tmp_path/'o2'), '--pseudonymize', '--private-state', str(tmp_path/'o2'/'p.db')],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'outside the output folder' in r.stderr


def test_16bit_refuses_values_that_do_not_fit(tmp_path):
    "32-bit values at --bit-depth 16 are a decode_error with the reason, not PNGs saturated at 65535."
    src = tmp_path/'src'; src.mkdir()
    ds = pydicom.dcmread(sample_file('rtdose_1frame.dcm'))     # its 32-bit dose values, as an image: a dose grid itself is no image (issue 23)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'; ds.Modality = 'CT'
    ds.save_as(src/'dose.dcm')
    r = preprocess(src, tmp_path/'out', n_workers=0, quiet=True, bit_depth=16)
    [(status, error)] = query(tmp_path/'out', 'select status, error from files')
    assert r.counts == {'decode_error': 1} and status == 'decode_error' and 'do not fit a 16-bit PNG' in error


def test_export_refusals_and_label_parsing(corpus, tmp_path):
    db = corpus/'out/dicom_prep.db'
    for bad in (corpus/'out/images'/'x', corpus/'out/images'):
        with pytest.raises(Exception, match='dicom_prep manages'): export(db, bad, 'csv', label_col='modality')
    export(db, tmp_path/'e', 'imagefolder', label_col='modality')
    with pytest.raises(Exception, match='holds a imagefolder export'): export(db, tmp_path/'e', 'webdataset', label_col='modality')
    (tmp_path/'trailing.csv').write_text('patient_id,y\nP0,cat,\nP1,dog,\n')          # trailing commas
    assert export(db, tmp_path/'t', 'csv', labels=tmp_path/'trailing.csv', on='patient_id').report.unmatched == []
    (tmp_path/'blank.csv').write_text('patient_id,y\nP0,\nP1,dog\n')                   # an empty label is no label
    r = export(db, tmp_path/'b', 'csv', labels=tmp_path/'blank.csv', on='patient_id')
    assert set(pd.read_csv(tmp_path/'b/manifest.csv', dtype=str, keep_default_na=False)['label']) == {'dog', ''}
    (tmp_path/'empty.csv').write_text('')
    for labels, on, col, msg in ((tmp_path/'empty.csv', 'patient_id', None, 'the file is empty'),
                                 (tmp_path/'blank.csv', 'patient_id', 'patient_id', 'not a label')):
        with pytest.raises(Exception, match=msg): export(db, tmp_path/'x', 'csv', labels=labels, on=on, label_col=col)
    assert r.report.n_labelled < len(images_df(db))
