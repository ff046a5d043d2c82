"""Hostile review of issue 27 (remote sources): each test here failed on branch `remote` at bd97824 when written.

Archives, a shared cache folder, malformed PACS URLs and queries, and DIMSE queries on UID keys, against Orthanc where one is
needed (skipped, with the reason, where it cannot start)."""
import shutil, subprocess, sys, zipfile
from pathlib import Path

import pydicom
import pytest

from dicom_prep.sources import Cache, sample_file
from dicom_prep.stores import Archive

CLI = [shutil.which('dicom_prep_preprocess') or sys.executable, *([] if shutil.which('dicom_prep_preprocess') else ['-m', 'dicom_prep.preprocess'])]


def _run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def _zip(path:Path, members:dict) -> Path:
    "A zip at `path` with `members` {name: source file}."
    with zipfile.ZipFile(path, 'w') as z:
        for name, src in members.items(): z.write(src, name)
    return path


@pytest.fixture
def two(tmp_path):
    "A zip of pydicom's CT_small and MR_small under study folder s1."
    return _zip(tmp_path/'two.zip', {'s1/CT_small.dcm': sample_file('CT_small.dcm'), 's1/MR_small.dcm': sample_file('MR_small.dcm')})


# --- one --cache-dir shared by two runs (the default ~/.cache/dicom_prep is shared by every run on the same source) ------

def test_a_second_run_on_the_same_cache_does_not_delete_copies_the_first_is_using(two, tmp_path):
    "preprocess and nifti on the same source at once share its cache folder: the second's start must not evict the first's copies."
    a = Cache(Archive(two), tmp_path/'cache')
    copy = a.ensure('s1/CT_small.dcm')                      # run A fetched it; its worker is about to read it
    Cache(Archive(two), tmp_path/'cache', max_bytes=0)      # run B starts (--cache-max-gb 0): adopts A's copy as its own, deletes it
    assert copy.exists(), "a concurrent run's start deleted a copy run A had fetched and not yet released"


def test_a_second_run_on_the_same_cache_does_not_delete_a_download_in_progress(two, tmp_path):
    "A `.part` file is another run's download in progress, not debris: deleting it fails that run's fetch."
    class Slow:
        root = 'slow'
        def entries(self): return []
        def fetch(self, path, dest):
            Path(dest).write_bytes(b'x' * 200)
            Cache(Archive(two), tmp_path/'cache')           # another run starts while this download is in flight
    Cache(Slow(), tmp_path/'cache').ensure('s1/x.dcm')      # FileNotFoundError: the .part was deleted under it


# --- archives ---------------------------------------------------------------------------------------------------------

def test_a_zip_with_a_file_and_a_folder_of_the_same_name_is_read(tmp_path):
    "'s1/a' and 's1/a/b.dcm' are both legal member names (and both legal S3 keys): the run must not die on the cache layout."
    z = _zip(tmp_path/'clash.zip', {'s1/a': sample_file('CT_small.dcm'), 's1/a/b.dcm': sample_file('MR_small.dcm')})
    r = _run('--dicom-dir', z, '--output-dir', tmp_path/'out', '--cache-dir', tmp_path/'cache', '--workers', '0')
    assert r.returncode == 0, r.stderr[-500:]          # was: run failed: [Errno 17] File exists: '.../s1/a'


# --- malformed --query and PACS URLs: usage errors (exit 2, one line), not tracebacks -------------------------------------

@pytest.mark.parametrize('q', ['Foo=1', 'Modality', 'Modality=CT&Modality=MR', '=x'])
def test_a_bad_query_is_a_one_line_usage_error(q, tmp_path):
    r = _run('--dicom-dir', 'dicomweb+http://127.0.0.1:1/dicom-web', '--query', q, '--output-dir', tmp_path/'out', '--cache-dir', tmp_path/'c')
    assert 'Traceback' not in r.stderr, r.stderr[-400:]
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('url', ['dimse://127.0.0.1:104', 'dimse://A@127.0.0.1:notaport', 'dimse://AVERYLONGAETITLE12345@h:1',
                                 'dicomweb+http://', 'dicomweb+http://u@127.0.0.1:1/x', 'dimse://A@[::1:104'])
def test_a_malformed_pacs_url_is_a_one_line_usage_error(url, tmp_path):
    r = _run('--dicom-dir', url, '--output-dir', tmp_path/'out', '--cache-dir', tmp_path/'c', '--request-timeout', '2')
    assert 'Traceback' not in r.stderr, r.stderr[-400:]
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# --- a typo'd URL must not pin the index to it ----------------------------------------------------------------------------

def test_a_run_that_could_not_list_its_source_does_not_pin_the_source_root(two, tmp_path):
    "A mistyped, unreachable server fails the run (exit 1); the corrected command must then run, not ask for --rebase."
    out = tmp_path/'out'
    r = _run('--dicom-dir', 'dicomweb+http://127.0.0.1:1/dicom-web', '--output-dir', out, '--cache-dir', tmp_path/'c', '--request-timeout', '2')
    assert r.returncode == 1
    r = _run('--dicom-dir', two, '--output-dir', out, '--cache-dir', tmp_path/'c')
    assert r.returncode == 0, r.stderr[-400:]          # was: exit 2, "the source root differs ... Use --rebase"


# --- against Orthanc ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def orthanc(tmp_path_factory):
    from orthanc import started
    o = started(tmp_path_factory.mktemp('orthanc'))
    o.upload([sample_file('CT_small.dcm'), sample_file('MR_small.dcm')])
    yield o
    o.kill()


@pytest.mark.parametrize('key', ['StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'])
def test_dimse_query_on_a_uid_key_filters(orthanc, key):
    "--query StudyInstanceUID=X over DIMSE must list X's instances only (it listed the whole PACS: the filter was overwritten)."
    from dicom_prep.pacs import DicomWeb, Dimse
    want = str(getattr(pydicom.dcmread(sample_file('MR_small.dcm'), stop_before_pixels=True), key))
    web = [e.path for e in DicomWeb(orthanc.dicomweb_url, query=f'{key}={want}', timeout=10).entries()]
    dimse = [e.path for e in Dimse(orthanc.dimse_url, query=f'{key}={want}', timeout=10).entries()]
    assert len(web) == 1
    assert dimse == web


def test_dimse_query_on_an_unknown_uid_lists_nothing(orthanc):
    from dicom_prep.pacs import Dimse
    assert list(Dimse(orthanc.dimse_url, query='StudyInstanceUID=1.2.3.4', timeout=10).entries()) == []


def test_dimse_a_local_write_failure_is_not_blamed_on_the_pacs(orthanc, tmp_path):
    "Our own disk full / unwritable cache during a C-GET must surface as our OSError, not as 'the PACS is out of resources' retried 4 times."
    from dicom_prep.pacs import Dimse
    src = Dimse(orthanc.dimse_url, timeout=10)
    [entry] = [e for e in src.entries() if e.path.endswith(pydicom.dcmread(sample_file('CT_small.dcm'), stop_before_pixels=True).SOPInstanceUID + '.dcm')]
    (tmp_path/'afile').write_text('')                       # dest's parent is a file: the write fails here, locally
    with pytest.raises(Exception) as e: src.fetch(entry.path, tmp_path/'afile'/'x.dcm')
    assert isinstance(e.value, OSError) and not isinstance(e.value, (ConnectionError, TimeoutError)), repr(e.value)   # a ConnectionError is retried, then blamed on the PACS


# --- --pseudonymize: no source URL, query or AE title in the shared DB, even in a failed run's error --------------------

def _leaks(out:Path, *secrets) -> list:
    "The `secrets` found anywhere under `out` (the DB, its WAL, the outputs)."
    blobs = [p.read_bytes() for p in out.rglob('*') if p.is_file()]
    return [s for s in secrets if any(s.encode() in b for b in blobs)]

def test_pseudonymised_failed_run_with_a_query_records_no_url(tmp_path):
    "The error of a failed run is scrubbed of the source's spelling: with --query that is 'URL?query', which the message never quotes whole."
    out = tmp_path/'out'
    r = _run('--dicom-dir', 'dicomweb+http://127.0.0.1:1/secret-path', '--query', 'PatientID=SECRETPID', '--pseudonymize', '--salt', 'x',
             '--private-state', tmp_path/'private.db', '--output-dir', out, '--cache-dir', tmp_path/'c', '--request-timeout', '2')
    assert r.returncode == 1, r.stderr[-300:]
    assert _leaks(out, '127.0.0.1', 'secret-path', 'SECRETPID') == []   # was: runs.error = 'SourceError: dicomweb+http://127.0.0.1:1/secret-path: unreachable ...'


def test_pseudonymised_rejected_association_records_no_ae_title(tmp_path):
    from orthanc import started
    o = started(tmp_path/'orthanc', check_called_aet=True)
    try:
        out, url = tmp_path/'out', o.dimse_url.replace(f'{o.aet}@', 'NOTTHEPACS@')
        r = _run('--dicom-dir', url, '--calling-aet', 'SECRETAE', '--pseudonymize', '--salt', 'x', '--private-state', tmp_path/'private.db',
                 '--output-dir', out, '--cache-dir', tmp_path/'c', '--request-timeout', '5')
        assert r.returncode == 1, r.stderr[-300:]
        assert _leaks(out, 'SECRETAE', 'NOTTHEPACS', str(o.dicom_port)) == []
    finally: o.kill()


# --- a hostile DIMSE peer: C-FIND answers with UIDs that are not UIDs ---------------------------------------------------

@pytest.fixture
def evil_pacs():
    "A pynetdicom SCP on loopback whose C-FIND answers carry the study UID `evil_pacs.study` (set by the test)."
    from pynetdicom import AE, evt
    from pydicom.dataset import Dataset
    from orthanc import free_port
    state = type('S', (), {'study': '1.2.3'})()
    def on_find(event):
        lvl = event.identifier.QueryRetrieveLevel
        ds = Dataset(); ds.QueryRetrieveLevel = lvl
        if lvl == 'STUDY': ds.StudyInstanceUID = state.study
        elif lvl == 'SERIES': ds.SeriesInstanceUID = '4.5'
        else: ds.SOPInstanceUID, ds.SOPClassUID = '6.7', '1.2.840.10008.5.1.4.1.1.2'
        yield 0xFF00, ds
    ae = AE(ae_title='EVIL')
    for cx in ('1.2.840.10008.5.1.4.1.2.2.1', '1.2.840.10008.5.1.4.1.2.2.3'): ae.add_supported_context(cx)
    port = free_port()
    server = ae.start_server(('127.0.0.1', port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    state.url = f'dimse://EVIL@127.0.0.1:{port}'
    yield state
    server.shutdown()


@pytest.mark.parametrize('uid', ['1.2/3', '../..', ''])
def test_a_pacs_answering_a_uid_that_is_not_a_uid_is_one_line(evil_pacs, uid, tmp_path):
    "A C-FIND match whose UID has a '/' (or is '..') is a malformed answer: one line and exit 1 (or the entry skipped), never a traceback."
    evil_pacs.study = uid
    r = _run('--dicom-dir', evil_pacs.url, '--output-dir', tmp_path/'out', '--cache-dir', tmp_path/'c', '--request-timeout', '3')
    assert 'Traceback' not in r.stderr, r.stderr[-300:]      # '1.2/3': ValueError from split_key escapes
    assert 'index is damaged' not in r.stderr                 # '..': blamed on the index, exit 2
    assert r.returncode in (0, 1)


@pytest.mark.parametrize('timeout', ['inf', '1e300'])
def test_an_infinite_request_timeout_is_refused_or_works(timeout, tmp_path):
    "--request-timeout inf passes the option check (> 0), then every PACS request dies with OverflowError: a traceback."
    r = _run('--dicom-dir', 'dicomweb+http://127.0.0.1:1/dicom-web', '--request-timeout', timeout, '--output-dir', tmp_path/'out', '--cache-dir', tmp_path/'c')
    assert 'Traceback' not in r.stderr, r.stderr[-300:]
    assert r.returncode in (1, 2) and len(r.stderr.strip().splitlines()) == 1


# --- a DIMSE peer whose C-GET sends nothing: only 'no match' is a vanished instance ------------------------------------

@pytest.fixture
def empty_get_pacs():
    "A pynetdicom SCP whose C-FIND finds one CT instance and whose C-GET sends no instance, ending with `empty_get_pacs.status`."
    from pynetdicom import AE, evt
    from pydicom.dataset import Dataset
    from orthanc import free_port
    state = type('S', (), {'status': 0x0000})()
    def on_find(event):
        ds = Dataset(); ds.QueryRetrieveLevel, ds.SOPClassUID = 'IMAGE', '1.2.840.10008.5.1.4.1.1.2'
        yield 0xFF00, ds
    def on_get(event):
        yield 0 if state.status == 0 else 1                  # the number of sub-operations, then the failure that ends them
        if state.status: yield state.status, None
    ae = AE(ae_title='EMPTY')
    for cx in ('1.2.840.10008.5.1.4.1.2.2.1', '1.2.840.10008.5.1.4.1.2.2.3'): ae.add_supported_context(cx)
    server = ae.start_server(('127.0.0.1', port := free_port()), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
    state.url = f'dimse://EMPTY@127.0.0.1:{port}'
    yield state
    server.shutdown()


@pytest.mark.parametrize('status', [0x0000, 0xA702, 0xB000, 0xC000])
def test_dimse_a_c_get_that_sends_nothing_is_gone_only_without_a_failure(empty_get_pacs, status, tmp_path):
    "A C-GET that fails its sub-operations (a loaded PACS) is retried, never taken for an instance deleted since the listing."
    from dicom_prep.pacs import Dimse
    from dicom_prep.sources import Gone
    empty_get_pacs.status = status
    src = Dimse(empty_get_pacs.url, timeout=5)
    try:
        with pytest.raises(Gone if status == 0 else ConnectionError, match='matched no instance' if status == 0 else f'0x{status:04X}'):
            src.fetch('1.2/3.4/5.6.dcm', tmp_path/'x.dcm')
    finally: src.close()
    assert not (tmp_path/'x.dcm').exists()
