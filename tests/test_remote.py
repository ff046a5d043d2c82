"""Issue 27: runs on sources that are not a local folder — archives, object storage, DICOMweb and DIMSE — against real
servers on loopback (Orthanc from Debian, moto's S3 server, Python's http.server).

Each pulled run is compared with a run over the same files laid out on local disk under the paths the source gives
them (study/series/instance UIDs for a PACS, member names for an archive): the `images` rows and the PNG bytes must be
equal. Kill -9 mid-pull, a server stopped mid-run, and an instance added between runs are real.
"""
import hashlib, os, shutil, signal, sqlite3, subprocess, sys, tarfile, time, zipfile
from pathlib import Path

import pydicom
import pytest

from conftest import query
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom, synth_series

CLI = [shutil.which('dicom_prep_preprocess') or sys.executable, *([] if shutil.which('dicom_prep_preprocess') else ['-m', 'dicom_prep.preprocess'])]
NIFTI = [shutil.which('dicom_prep_nifti') or 'dicom_prep_nifti']
IMAGE_COLS = ('filename, study_id, patient_id, study_uid, series_uid, sop_uid, modality, frame_number, num_frames, rows, columns, '
              'photometric, window, thumbnail_path, source_path, split, burned_in')


def corpus(root:Path, n:int=6, size:int=64) -> Path:
    "A CT series of `n` slices and two MR images in another study, laid out study/series/instance as a PACS keys them."
    flat = root/'flat'
    paths = synth_series(flat/'ct', n=n, rows=size, cols=size, pixels=lambda k: (k * 50 + 100) * __import__('numpy').ones((size, size), 'uint16'))
    paths += [synth_dicom(flat/f'mr{i}.dcm', size, size, modality='MR', patient='P2', seed=i) for i in range(2)]
    by_uid(paths, root/'tree')
    return root/'tree'

def by_uid(paths, dest:Path) -> list[Path]:
    "Copy `paths` to `dest/STUDY/SERIES/SOP.dcm`, the layout a PACS source gives its entries; the copies."
    copies = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        (d := dest/ds.StudyInstanceUID/ds.SeriesInstanceUID).mkdir(parents=True, exist_ok=True)
        copies.append(shutil.copyfile(p, d/f'{ds.SOPInstanceUID}.dcm'))
    return copies

def files_of(tree:Path) -> list[Path]: return sorted(p for p in tree.rglob('*') if p.is_file())

def images(out) -> list:
    "The index's image rows, by file name (what a run on another source must reproduce)."
    return query(out, f'select {IMAGE_COLS} from images order by filename')

def pngs(out) -> dict:
    "PNG path → its bytes' digest."
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out, 'images').rglob('*.png'))}

def counts(out, kind='preprocess') -> dict:
    "The counts the last run of `kind` recorded."
    import json
    return json.loads(query(out, 'select counts from runs where kind = ? order by id desc limit 1', [kind])[0][0])

def same_run(a, b):
    "Two runs made the same image rows and PNG bytes."
    assert images(a) and images(a) == images(b)
    assert pngs(a) == pngs(b)

def n_files(out) -> int:
    "How many files a run's index records (0 before its tables exist)."
    try: return query(out, 'select count(*) from files')[0][0]
    except sqlite3.Error: return 0

def run(src, out, tmp, *extra, timeout=180) -> subprocess.CompletedProcess:
    "The preprocess console script on `src`, its cache under `tmp`."
    return subprocess.run([*CLI, '--dicom-dir', str(src), '--output-dir', str(out), '--cache-dir', str(tmp/'cache'), *extra],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

# ----------------------------------------------------------------------------------------------------------------------
# Archives

def make_zip(tree:Path, dest:Path) -> Path:
    with zipfile.ZipFile(dest, 'w', zipfile.ZIP_DEFLATED) as z:
        for p in files_of(tree): z.write(p, p.relative_to(tree).as_posix())
    return dest

def make_tar(tree:Path, dest:Path, mode='w:gz') -> Path:
    with tarfile.open(dest, mode) as t:
        for p in files_of(tree): t.add(p, p.relative_to(tree).as_posix())
    return dest

@pytest.mark.parametrize('kind', ['zip', 'tar', 'tar.gz'])
def test_an_archive_gives_the_run_its_extracted_folder_gives(tmp_path, kind):
    tree = corpus(tmp_path)
    archive = make_zip(tree, tmp_path/'data.zip') if kind == 'zip' else make_tar(tree, tmp_path/f'data.{kind}', 'w:gz' if kind.endswith('gz') else 'w')
    preprocess(tree, tmp_path/'local', n_workers=0)
    r = run(archive, tmp_path/'arc', tmp_path, '--workers', '2')
    assert r.returncode == 0, r.stderr
    same_run(tmp_path/'local', tmp_path/'arc')
    assert counts(tmp_path/'arc')['fetched'] == len(files_of(tree))

def test_a_rerun_fetches_only_the_new_member(tmp_path):
    tree = corpus(tmp_path)
    make_zip(tree, zp := tmp_path/'data.zip')
    assert run(zp, out := tmp_path/'out', tmp_path).returncode == 0
    new = synth_dicom(tmp_path/'new.dcm', 64, 64, modality='MR', patient='P3', seed=9)
    with zipfile.ZipFile(zp, 'a') as z: z.write(new, 'late/new.dcm')
    r = run(zp, out, tmp_path)
    assert r.returncode == 0, r.stderr
    assert counts(out)['fetched'] == 1
    assert query(out, "select count(*) from files where path = 'late/new.dcm' and status = 'ok'") == [(1,)]

def test_the_cache_keeps_no_more_than_asked(tmp_path):
    tree = corpus(tmp_path)
    make_zip(tree, zp := tmp_path/'data.zip')
    r = run(zp, tmp_path/'out', tmp_path, '--cache-max-gb', '0')
    assert r.returncode == 0, r.stderr
    copies = lambda: [p for p in (tmp_path/'cache').rglob('*') if p.is_file() and p.suffix != '.lock']
    assert not copies()                                                   # every copy released and gone
    r = run(zp, tmp_path/'out2', tmp_path)
    assert r.returncode == 0 and len(copies()) == len(files_of(tree))

def test_a_url_with_a_password_is_refused(tmp_path):
    r = run('dicomweb+http://user:secret@127.0.0.1:9/dicom-web', tmp_path/'out', tmp_path)
    assert r.returncode == 2 and 'netrc' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path/'out'/'dicom_prep.db').exists()

def test_an_unreachable_pacs_is_one_line_and_records_nothing(tmp_path):
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]      # a closed port
    r = run(f'dicomweb+http://127.0.0.1:{port}/dicom-web', out := tmp_path/'out', tmp_path, '--request-timeout', '2')
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f'127.0.0.1:{port}' in r.stderr, r.stderr
    assert not (out/'dicom_prep.db').exists()                             # the source is checked before anything is recorded

# ----------------------------------------------------------------------------------------------------------------------
# A PACS: Orthanc on loopback, over DICOMweb and DIMSE

@pytest.fixture
def pacs(tmp_path):
    "Orthanc (Debian's) on loopback, loaded with the corpus; the local tree laid out as the PACS keys it."
    from orthanc import started
    server = started(tmp_path/'orthanc')
    tree = corpus(tmp_path)
    server.upload(files_of(tree))
    yield server, tree
    server.kill()

@pytest.mark.parametrize('scheme', ['dicomweb', 'dimse'])
def test_a_pull_gives_the_run_local_disk_gives(tmp_path, pacs, scheme):
    server, tree = pacs
    preprocess(tree, tmp_path/'local', n_workers=0)
    r = run(server.dicomweb_url if scheme == 'dicomweb' else server.dimse_url, out := tmp_path/'pulled', tmp_path, '--workers', '2')
    assert r.returncode == 0, r.stderr
    same_run(tmp_path/'local', out)
    assert counts(out)['fetched'] == len(files_of(tree))

def test_a_rerun_fetches_only_the_instance_added_since(tmp_path, pacs):
    server, tree = pacs
    assert run(server.dicomweb_url, out := tmp_path/'out', tmp_path).returncode == 0
    server.upload(by_uid([synth_dicom(tmp_path/'late.dcm', 64, 64, modality='CT', patient='P9', seed=7)], tree))
    r = run(server.dicomweb_url, out, tmp_path)
    assert r.returncode == 0, r.stderr
    assert counts(out)['fetched'] == 1
    preprocess(tree, tmp_path/'local', n_workers=0)
    same_run(tmp_path/'local', out)

def test_a_pull_killed_mid_run_carries_on_to_the_same_index(tmp_path, pacs):
    server, tree = pacs
    more = by_uid([synth_dicom(tmp_path/f'x{i}.dcm', 256, 256, modality='CT', patient=f'P{i % 3}', seed=i) for i in range(60)], tree)
    server.upload(more)
    preprocess(tree, tmp_path/'local', n_workers=0)
    cmd = [*CLI, '--dicom-dir', server.dicomweb_url, '--output-dir', str(out := tmp_path/'out'), '--cache-dir', str(tmp_path/'cache'),
           '--batch-size', '5', '--workers', '1']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (out/'dicom_prep.db').exists() and n_files(out) >= 10: break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    done = query(out, 'select count(*) from files')[0][0]
    assert 0 < done < len(files_of(tree)), "the kill must land mid-pull"
    r = run(server.dicomweb_url, out, tmp_path, '--batch-size', '5')
    assert r.returncode == 0, r.stderr
    assert counts(out)['fetched'] <= len(files_of(tree)) - done       # what the killed run committed is not fetched again
    same_run(tmp_path/'local', out)

def test_a_server_stopped_mid_run_stops_it_with_one_line_and_a_restart_finishes_it(tmp_path, pacs):
    server, tree = pacs
    server.upload(by_uid([synth_dicom(tmp_path/f'y{i}.dcm', 256, 256, patient='P1', seed=i) for i in range(60)], tree))
    preprocess(tree, tmp_path/'local', n_workers=0)
    cmd = [*CLI, '--dicom-dir', server.dicomweb_url, '--output-dir', str(out := tmp_path/'out'), '--cache-dir', str(tmp_path/'cache'),
           '--batch-size', '5', '--workers', '1', '--request-timeout', '2', '--max-inflight', '1']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (out/'dicom_prep.db').exists() and n_files(out) >= 10: break
        time.sleep(0.05)
    server.stop()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert '127.0.0.1' in err and 'Traceback' not in err, err
    assert query(out, "select count(*) from files where status not in ('ok', 'not_image')") == [(0,)]   # nothing recorded against a file
    server.start()
    r = run(server.dicomweb_url, out, tmp_path)
    assert r.returncode == 0, r.stderr
    same_run(tmp_path/'local', out)

def test_nifti_from_dicomweb_equals_nifti_from_disk(tmp_path, pacs):
    server, tree = pacs
    local = subprocess.run([*NIFTI, '--dicom-dir', str(tree), '--output-dir', str(tmp_path/'nl')], capture_output=True, text=True)
    pulled = subprocess.run([*NIFTI, '--dicom-dir', server.dicomweb_url, '--output-dir', str(tmp_path/'np'), '--cache-dir', str(tmp_path/'cache')],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert local.returncode == 0 and pulled.returncode == 0, pulled.stderr
    vols = lambda out: query(out, "select id, verdict, output_path from volumes where status = 'ok' order by id")
    assert vols(tmp_path/'nl') and vols(tmp_path/'nl') == vols(tmp_path/'np')
    digest = lambda out: {p.name: hashlib.sha256(__import__('nibabel').load(p).get_fdata().tobytes()).hexdigest() for p in Path(out).rglob('*.nii.gz')}
    assert digest(tmp_path/'nl') == digest(tmp_path/'np')

def test_a_pseudonymised_pull_keeps_the_url_query_and_ae_title_private(tmp_path, pacs):
    server, tree = pacs
    r = run(server.dimse_url, out := tmp_path/'out', tmp_path, '--pseudonymize', '--query', 'Modality=CT', '--calling-aet', 'SECRET_AE')
    assert r.returncode == 0, r.stderr
    assert query(out, 'select count(*) from images')[0][0] == 6                     # the CT series only
    shared = b''.join(p.read_bytes() for p in out.rglob('*') if p.is_file() and p.suffix != '.png')
    for secret in (b'127.0.0.1', str(server.dicom_port).encode(), b'Modality=CT', b'SECRET_AE', server.aet.encode()):
        assert secret not in shared, secret
    private = Path(str(out) + '.private.db')
    assert server.dimse_url.encode() in private.read_bytes()

def test_dask_runs_a_pulled_source(tmp_path, pacs):
    pytest.importorskip('distributed')
    server, tree = pacs
    preprocess(tree, tmp_path/'local', n_workers=0)
    r = run(server.dicomweb_url, out := tmp_path/'out', tmp_path, '--scheduler', 'local', '--workers', '2', timeout=300)
    assert r.returncode == 0, r.stderr
    same_run(tmp_path/'local', out)
