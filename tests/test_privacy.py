"""What a pseudonymised folder may hold (issue 24, items 5 and 6): a positive list of attributes, tried against PHI
planted in every VR, in names, sequences, private elements and file names; the de-identification options (--keep,
--shift-dates, --keep-private-safe); and the NIfTI pipeline under --pseudonymize."""
import datetime, gzip, json, socket, sqlite3, subprocess, tarfile
from contextlib import closing

import pydicom
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_prep.privacy import SAFE_KEYWORDS, SHIFT_DAYS
from dicom_prep.export import export
from dicom_prep.synth import synth_dicom, synth_series
from conftest import console_script, query, ro

MARK = 'PHIMARK'                     # planted in every text attribute, folder and file name
VALUES = dict(AE=MARK, AS='077Y', CS=MARK, DA='19580704', DS='7654321.5', DT='19580704101112', IS='87654321', LO=MARK, LT=MARK,
              PN=f'{MARK}^Johnathan', SH=MARK, ST=MARK, TM='235958.987654', UC=MARK, UT=MARK, UR=f'http://{MARK.lower()}.example/{MARK}',
              UI='1.2.826.0.1.3680043.87654321', FL=7654321.5, FD=7654321.5, SL=-87654321, SS=-31234, UL=87654321, US=54321,
              SV=-87654321, UV=87654321)
TEXT_MARKS = [MARK, MARK.lower(), 'Johnathan', '077Y', '19580704', '1958-07-04', '7654321', '235958']   # found as text
NUMBER_MARKS = {-31234, 54321}                                                                         # too short for text
NAMED = ('EvaluatorName', 'ContactDisplayName', 'SequenceName', 'SecondaryReviewerName', 'DocumentAuthorTrial', 'PatientName',
         'PatientID', 'OtherPatientIDs', 'StationName', 'StudyDescription', 'SeriesDescription', 'ProtocolName', 'ImageComments')


def _planted_keywords(per_vr:int=4) -> dict:
    "keyword -> value: the first `per_vr` current attributes of every VR that can hold text, a date or a number, off the safe list."
    out, n = {}, {}
    for tag, (vr, _, _, retired, kw) in sorted(DicomDictionary.items()):
        if retired or not kw or kw in SAFE_KEYWORDS or (tag >> 16) in (0x0000, 0x0002, 0x0004, 0x0028, 0x7FE0, 0xFFFE) or tag == 0x00080005: continue
        if vr in VALUES and n.get(vr, 0) < per_vr: out[kw], n[vr] = VALUES[vr], n.get(vr, 0) + 1
    return out | {k: VALUES[dictionary_VR(k)] for k in NAMED}


def _hostile_file(path, seed:int, planted:dict):
    "A CT file carrying `planted`, PHI in a sequence, a multi-value, private elements and kept keywords under other VRs."
    p = synth_dicom(path, 16, 16, seed=seed, patient=MARK + str(seed % 2))
    ds = pydicom.dcmread(p)
    for kw, v in planted.items():
        if kw != 'PatientID': setattr(ds, kw, v)
    ds.OtherPatientIDs = [MARK + '1', MARK + '2']                                  # multi-valued
    ds.ReferencedPatientSequence = Sequence([Dataset()]); ds.ReferencedPatientSequence[0].PatientName = VALUES['PN']
    ds.add_new('Manufacturer', 'PN', VALUES['PN'])                                 # a kept keyword holding a name
    ds.add_new('BodyPartExamined', 'LO', MARK)                                     # ... under a VR it does not have
    ds.add_new('BurnedInAnnotation', 'PN', VALUES['PN']); ds.add_new('PixelSpacing', 'LO', MARK)   # columns every row has
    ds.add_new(0x00110010, 'LO', MARK + ' CREATOR'); ds.add_new(0x00111001, 'LO', MARK)   # a private block named after him
    ds.add_new(0x00190010, 'LO', 'SIEMENS MR HEADER'); ds.add_new(0x0019100C, 'IS', '1000')
    ds.add_new(0x0019100E, 'LO', MARK)                                             # text where the safe table wants numbers
    ds.add_new(0x00430010, 'LO', 'GEMS_PARM_01'); ds.add_new(0x00431039, 'IS', ['1000', '8', '0', '0'])
    ds.save_as(p, enforce_file_format=True)


def _leaks(blobs:list[bytes], names:list[str]) -> list[str]:
    "The text marks found in `blobs` or `names`."
    return [m for m in TEXT_MARKS if any(m.encode() in b for b in blobs) or any(m in n for n in names)]


def _tar_json(shards) -> list[bytes]:
    "The .json members of webdataset shards."
    out = []
    for s in shards:
        with tarfile.open(s) as t: out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith('.json')]
    return out


def _numbers(v) -> list:
    "Every number in a JSON value."
    if isinstance(v, (list, tuple)): return [x for i in v for x in _numbers(i)]
    if isinstance(v, dict): return [x for i in v.values() for x in _numbers(i)]
    return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else []


def test_pseudonymized_all_tags_keep_a_positive_list(tmp_path):
    "PHI planted in 50+ attributes of every VR, a sequence, private elements, names: none reaches the index, a manifest or a shard."
    planted = _planted_keywords()
    assert len(planted) >= 50 and {dictionary_VR(k) for k in planted} == set(VALUES)
    src, out = tmp_path/f'src/{MARK}_Johnathan', tmp_path/'out'
    for i in range(4): _hostile_file(src/f'{MARK}_{i}.dcm', i, planted)
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(tmp_path/'src'), '--output-dir', str(out),
                       '--pseudonymize', '--all-tags', '--keep-private-safe', '--workers', '0'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    db = out/'dicom_prep.db'
    for fmt, extra in (('csv', {}), ('webdataset', {}), ('imagefolder', dict(label_col='modality'))):
        assert export(db, tmp_path/'exp'/fmt, fmt, **extra).n_items == 4
    with closing(sqlite3.connect(db)) as c: dump = '\n'.join(c.iterdump())
    shards = sorted((tmp_path/'exp/webdataset').glob('*.tar'))
    blobs = [dump.encode(), (tmp_path/'exp/csv/manifest.csv').read_bytes(), *_tar_json(shards)]
    names = [str(p.relative_to(tmp_path)) for d in (out, tmp_path/'exp') for p in d.rglob('*')]
    assert _leaks(blobs, names) == [] and len(_tar_json(shards)) == 4
    rows = [json.loads(t) for (t,) in query(out, 'select all_tags from images')]
    for tags in rows + [json.loads(b) for b in _tar_json(shards)]:
        assert not set(tags) & set(planted) and not NUMBER_MARKS & set(_numbers(tags)), tags
    tags = rows[0]
    assert set(tags) - SAFE_KEYWORDS == {'SiemensBValue', 'GEBValue'}             # the safe list, and the safe private numbers
    assert (tags['SiemensBValue'], tags['GEBValue'], tags['Modality']) == (1000, [1000, 8, 0, 0], 'CT')
    assert query(out, 'select distinct manufacturer, body_part, study_date, patient_sex from images') == [(None, None, None, None)]
    assert query(out, 'select count(*) from runs where host = ?', [socket.gethostname()]) == [(0,)]   # the machine's name is a pseudonym too


def test_pseudonymize_refuses_tags_off_the_list(tmp_path):
    "--tags may name only kept attributes under --pseudonymize; the options need --pseudonymize (and --all-tags): one line, exit 2."
    synth_dicom(tmp_path/'src/a.dcm', 16, 16)
    pre = console_script('dicom_prep_preprocess') + ['--dicom-dir', str(tmp_path/'src'), '--output-dir', str(tmp_path/'out'), '--workers', '0']
    for args, says in ((['--pseudonymize', '--tags', 'EvaluatorName'], 'EvaluatorName is not one'),
                       (['--shift-dates'], 'options of --pseudonymize'), (['--keep', 'age'], 'options of --pseudonymize'),
                       (['--pseudonymize', '--keep', 'age,name'], "'name' is not one of age, sex, size, weight"),
                       (['--pseudonymize', '--keep-private-safe'], 'give --all-tags too')):
        r = subprocess.run(pre + args, capture_output=True, text=True)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count('\n') == 1, (args, r.stderr)
    assert not (tmp_path/'out').exists()


def _dated_tree(src) -> dict:
    "Two patients, two studies each 21 days apart; returns {PatientID: [study dates]}."
    dates = {'PAT_A': ['20200110', '20200131'], 'PAT_B': ['20191230', '20200120']}
    for pid, ds in dates.items():
        for k, d in enumerate(ds):
            synth_dicom(src/f'{pid}_{k}.dcm', 16, 16, patient=pid, seed=k, StudyDate=d, SeriesDate=d, AcquisitionDateTime=d + '093000.5+0100',
                        StudyTime='093000', PatientAge='061Y', PatientSex='F', PatientBirthDate='19580704', InstanceCreationDate=d)
    return dates


def _dates(out, salt) -> dict:
    "{raw PatientID: sorted study dates} of a pseudonymised run with `salt`."
    from dicom_prep.privacy import pseudonym
    back = {pseudonym(p, salt, 'pat_'): p for p in ('PAT_A', 'PAT_B')}
    got = {}
    for pid, date, tags in query(out, 'select patient_id, study_date, all_tags from images'):
        got.setdefault(back[pid], []).append(date); t = json.loads(tags)
        assert t['StudyDate'] == t['SeriesDate'] == date and t['AcquisitionDateTime'] == date.replace('-', '') + '093000.5', t
        assert 'PatientBirthDate' not in t and 'InstanceCreationDate' not in t and t['StudyTime'] == '093000'
    return {p: sorted(d) for p, d in got.items()}


def _run(src, out, *args) -> subprocess.CompletedProcess:
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0',
                       '--pseudonymize', '--all-tags', *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_shift_dates_moves_each_patient_by_one_keyed_offset(tmp_path):
    "--shift-dates: dates kept, each patient's moved by one offset in -365..-1 (intervals exact), the same under the same key."
    src = tmp_path/'src'
    raw = _dated_tree(src)
    _run(src, tmp_path/'a', '--salt', 's' * 32, '--shift-dates')
    a = _dates(tmp_path/'a', 's' * 32)
    day = lambda s: datetime.date.fromisoformat(s if '-' in s else f"{s[:4]}-{s[4:6]}-{s[6:]}")
    offsets = {p: {(day(x) - day(y)).days for x, y in zip(a[p], raw[p], strict=True)} for p in raw}
    assert all(len(o) == 1 and -SHIFT_DAYS <= min(o) <= -1 for o in offsets.values()), offsets   # one offset per patient, never 0
    _run(src, tmp_path/'b', '--salt', 's' * 32, '--shift-dates')
    assert _dates(tmp_path/'b', 's' * 32) == a                                   # the same key: the same dates, run after run
    _run(src, tmp_path/'c', '--salt', 't' * 32, '--shift-dates')
    assert _dates(tmp_path/'c', 't' * 32) != a                                   # another key: other offsets
    _run(src, tmp_path/'d', '--salt', 's' * 32)
    assert query(tmp_path/'d', 'select distinct study_date from images') == [(None,)]
    assert not [t for (t,) in query(tmp_path/'d', 'select all_tags from images') if 'Date' in t or 'Time' in t]


def test_keep_age_and_sex(tmp_path):
    "--keep age,sex keeps PatientAge and PatientSex (columns and JSON); nothing else of the patient, and nothing without it."
    src = tmp_path/'src'
    _dated_tree(src)
    _run(src, tmp_path/'k', '--keep', 'age,sex')
    assert query(tmp_path/'k', 'select distinct patient_age, patient_sex from images') == [('061Y', 'F')]
    tags = json.loads(query(tmp_path/'k', 'select all_tags from images limit 1')[0][0])
    assert (tags['PatientAge'], tags['PatientSex']) == ('061Y', 'F') and not {'PatientBirthDate', 'StudyDate'} & set(tags)
    _run(src, tmp_path/'n')
    assert query(tmp_path/'n', 'select distinct patient_age, patient_sex from images') == [(None, None)]


# ---------------------------------------------------------------------------------------------------- NIfTI

NIFTI_MARKS = ['DOE', 'Doe', 'MRN777', 'St Elsewhere', '20200102']


def _phi_series(src):
    "Two series of one patient in folders and files named after him, PHI in descriptions and institution; a series-less file too."
    tags = dict(PatientID='MRN777', PatientName='Doe^John', InstitutionName='St Elsewhere', StationName='DOE-PC', ProtocolName='DOE protocol',
                ImageComments='DOE JOHN', StudyDate='20200102', AcquisitionTime='101010', PatientSex='M', SequenceName='DOE')
    synth_series(src/'DOE_JOHN_MRN777/T1', n=4, description='DOE JOHN brain', prefix='DOE_', **tags)
    synth_series(src/'DOE_JOHN_MRN777/T2', n=3, series_number=2, description='MRN777', prefix='DOE_', **tags)
    p = synth_dicom(src/'DOE_JOHN_MRN777/loose/DOE.dcm', 16, 16, patient='MRN777')
    ds = pydicom.dcmread(p); del ds.SeriesInstanceUID; ds.save_as(p)   # its series is its path: `file:…/DOE_JOHN_MRN777/…`


def _shared_bytes(out) -> tuple[list[bytes], list[str]]:
    "Every byte the shared folder holds (the DB as a dump, .nii.gz decompressed) and every name in it."
    blobs = []
    for p in (q for q in out.rglob('*') if q.is_file()):
        if p.name.startswith('dicom_prep.db'):
            if p.name == 'dicom_prep.db':
                with closing(sqlite3.connect(p)) as c: blobs.append('\n'.join(c.iterdump()).encode())
        else: blobs.append(gzip.decompress(p.read_bytes()) if p.name.endswith('.gz') else p.read_bytes())
    return blobs, [str(p.relative_to(out)) for p in out.rglob('*')]


def test_nifti_under_pseudonymize_names_and_sidecars_leak_nothing(tmp_path):
    "dicom_prep_nifti --pseudonymize: names from study pseudonyms, sidecars of safe keys only, no path or UID in the shared index."
    src, out = tmp_path/'src', tmp_path/'out'
    _phi_series(src)
    pre = console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0', '--pseudonymize']
    nii = console_script('dicom_prep_nifti') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0', '--pseudonymize', '--sidecar']
    assert subprocess.run(pre, capture_output=True).returncode == 0
    r = subprocess.run(nii + ['--keep', 'sex'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    vols = query(out, "select output_name, study_id, series_uid, series_description, protocol_name from volumes where verdict='ok'")
    studies = {s for (s,) in query(out, 'select study_id from images')}
    assert sorted(v[0].split('/')[1] for v in vols) == ['001_CT', '002_CT'] and {v[1] for v in vols} <= studies
    assert all(v[0].startswith(v[1] + '/') and not v[3] and not v[4] for v in vols), vols
    blobs, names = _shared_bytes(out)
    found = [m for m in NIFTI_MARKS if any(m.encode() in b for b in blobs) or any(m in n for n in names)]
    assert found == [] and str(src).encode() not in b''.join(blobs), found
    side = json.loads(next((out/'nifti').rglob('*.json')).read_text())
    assert side['PatientSex'] == 'M' and not {'SeriesInstanceUID', 'InstitutionName', 'AcquisitionTime', 'SeriesDescription'} & set(side)
    with ro(out) as c: assert not {'nifti_headers', 'volume_files'} & {t for (t,) in c.execute("select name from sqlite_master")}
    with closing(sqlite3.connect(tmp_path/'out.private.db')) as c:
        assert c.execute('select count(*) from nifti_headers').fetchone()[0] == 8             # the source paths: private
    r = subprocess.run(nii + ['--keep', 'sex'], capture_output=True, text=True)
    assert r.returncode == 0 and 'Analysis reused' in r.stdout, r.stdout + r.stderr        # a rerun has nothing to do
    e = export(out/'dicom_prep.db', tmp_path/'nnunet', 'nnunet')
    assert e.n_items == 2 and not [m for m in NIFTI_MARKS if m in (tmp_path/'nnunet/dataset.json').read_text()]


def test_nifti_pseudonymize_refuses_free_text_names_and_a_plain_index(tmp_path):
    "A name template with a description is refused under --pseudonymize; so is pseudonymising an index that names its sources."
    src = tmp_path/'src'
    _phi_series(src)
    nii = console_script('dicom_prep_nifti') + ['--dicom-dir', str(src), '--workers', '0']
    r = subprocess.run(nii + ['--output-dir', str(tmp_path/'a'), '--pseudonymize', '--name-template', '{study_id}/{series_description}'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'series_description is free text' in r.stderr and r.stderr.count('\n') == 1, r.stderr
    assert subprocess.run(nii + ['--output-dir', str(tmp_path/'b')], capture_output=True).returncode == 0
    r = subprocess.run(nii + ['--output-dir', str(tmp_path/'b'), '--pseudonymize', '--force-reprocess'], capture_output=True, text=True)
    assert r.returncode == 2 and 'made without --pseudonymize' in r.stderr, r.stderr
    assert subprocess.run(nii + ['--output-dir', str(tmp_path/'c'), '--pseudonymize'], capture_output=True).returncode == 0
    r = subprocess.run(console_script('dicom_prep_preprocess') + ['--dicom-dir', str(src), '--output-dir', str(tmp_path/'c'), '--workers', '0'],
                       capture_output=True, text=True)                                      # a NIfTI-only pseudonymised index
    assert r.returncode == 2 and 'pseudonymised index' in r.stderr, r.stderr


def test_nifti_refusing_a_private_path_names_it_nowhere_in_the_shared_index(tmp_path):
    "A damaged private state (a volume_files path leading out) is refused, exit 2; the shared index's runs.error does not quote the path."
    src, out = tmp_path/'src', tmp_path/'out'
    _phi_series(src)
    nii = console_script('dicom_prep_nifti') + ['--dicom-dir', str(src), '--output-dir', str(out), '--workers', '0', '--pseudonymize']
    assert subprocess.run(nii, capture_output=True).returncode == 0
    with closing(sqlite3.connect(tmp_path/'out.private.db')) as c:
        with c: c.execute("update volume_files set path = '../MRN777_elsewhere/' || path")
    for p in (out/'nifti').rglob('*.nii.gz'): p.unlink()                       # so that the volumes are converted again
    r = subprocess.run(nii, capture_output=True, text=True)
    assert r.returncode == 2 and 'MRN777_elsewhere' in r.stderr, r.stderr           # the console names it
    [(status, error)] = query(out, 'select status, error from runs order by id desc limit 1')
    assert status == 'failed' and error.startswith('UnsafePath') and not [m for m in NIFTI_MARKS + ['MRN777'] if m in error], error
