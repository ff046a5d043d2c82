"""Archives and object storage as sources (nbs/02aa_stores.ipynb), against real servers on loopback.

- archives: real zip, tar, tar.gz, tar.bz2 and tar.xz files: listing, bytes, unsafe names, damage, tokens, threads,
  and a tar.gz pass in member order that reads the archive about once;
- http: fsspec against Python's http.server serving a folder; a server that never answers times out;
- s3: moto's standalone S3 server, with fake credentials and `AWS_ENDPOINT_URL` in the environment.
"""
import os, time, uuid, zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_prep.core import study_of
from dicom_prep.sources import Gone, SourceError
from dicom_prep.stores import Archive, ObjectStore, is_archive
from dicom_prep.synth import synth_dicom
from stores import http_folder, make_tar, make_zip, moto_s3, s3_auth_enforced, silent_server

TOP = study_of('/d/top.dcm', '/d')      # the study a local folder gives a file at its top


@pytest.fixture(scope='module')
def dicoms(tmp_path_factory) -> dict:
    "{key: bytes} of a few tiny DICOMs in two studies, nested folders, and one at the top."
    d = tmp_path_factory.mktemp('dicoms')
    for i, n in enumerate(['s1/ser1/IM1', 's1/ser1/IM2', 's1/ser2/IM1.dcm', 's2/IM 1.dcm', 'top.dcm']): synth_dicom(d/n, 8, 8, seed=i)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


def one_line(e:BaseException, *names):
    "Assert the error's message is one line naming each of `names`."
    msg = str(e)
    assert '\n' not in msg and all(str(n) in msg for n in names), msg


def fetched(src, keys:list, d:Path, threads:int=4) -> list[bytes]:
    "The bytes of `keys`, fetched from `src` by `threads` threads at once, each into its own file under `d`."
    def one(ik):
        i, k = ik; src.fetch(k, d/f'fetched-{i}'); return (d/f'fetched-{i}').read_bytes()
    with ThreadPoolExecutor(threads) as pool: return list(pool.map(one, enumerate(keys)))


# ------------------------------------------------------------------------------------------------------------ archives

KINDS = {'zip': None, 'tar': 'w', 'tar.gz': 'w:gz', 'tar.bz2': 'w:bz2', 'tar.xz': 'w:xz'}
UNSAFE = {'../evil.dcm': b'x', '/etc/evil.dcm': b'x', 's1/../../evil.dcm': b'x'}


def archive(path:Path, kind:str, files:dict, extra=None, **kw) -> Path:
    return make_zip(path, files, extra) if kind == 'zip' else make_tar(path, files, extra, KINDS[kind], **kw)


@pytest.mark.parametrize('kind', KINDS)
def test_archive_lists_and_reads_members_in_place(tmp_path, dicoms, kind):
    path = archive(tmp_path/f'data.{kind}', kind, dicoms, {**UNSAFE, '.hidden/x.dcm': b'x', 's1/DICOMDIR': b'x'})
    assert is_archive(path)
    stats = Counter()
    src = Archive(path, stats)
    assert src.root == os.path.realpath(path)
    entries = sorted(src.entries())
    assert [e.path for e in entries] == sorted(dicoms)
    assert [e.study for e in entries] == ['s1', 's1', 's1', 's2', TOP]
    assert [e.size for e in entries] == [len(dicoms[e.path]) for e in entries]
    assert all(isinstance(e.mtime_ns, int) and 0 <= e.mtime_ns < 2**63 for e in entries)
    assert stats == Counter(unsafe_name=3, hidden=1, dicomdir=1)
    for k, b in dicoms.items():
        src.fetch(k, tmp_path/'out'); assert (tmp_path/'out').read_bytes() == b
        assert src.head(k) == b[:132] and b[128:132] == b'DICM'
    assert src.requests == 2 * len(dicoms)
    with pytest.raises(Gone): src.fetch('s9/nope.dcm', tmp_path/'out')
    src.close()


@pytest.mark.parametrize('kind', ['zip', 'tar.gz'])
def test_archive_token_changes_only_for_a_changed_member(tmp_path, dicoms, kind):
    "zip: same size and time, other bytes (the CRC tells); tar: same size and bytes, another mtime."
    before = {e.path: e.mtime_ns for e in Archive(archive(tmp_path/f'a.{kind}', kind, dicoms)).entries()}
    if kind == 'zip': after_path = make_zip(tmp_path/'b.zip', {**dicoms, 's1/ser1/IM2': dicoms['s1/ser1/IM2'][::-1]})
    else: after_path = make_tar(tmp_path/'b.tar.gz', dicoms, mode='w:gz', mtimes={'s1/ser1/IM2': 1_700_000_001})
    after = {e.path: e.mtime_ns for e in Archive(after_path).entries()}
    assert [k for k in dicoms if before[k] != after[k]] == ['s1/ser1/IM2']


def test_damaged_archives_are_one_line_source_errors(tmp_path, dicoms):
    good = make_tar(tmp_path/'good.tar.gz', dicoms, mode='w:gz').read_bytes()
    (tmp_path/'cut.tar.gz').write_bytes(good[:len(good) // 2])
    (tmp_path/'garbage.zip').write_bytes(b'PK\x03\x04' + b'\0' * 100)
    (tmp_path/'garbage.tar').write_bytes(os.urandom(2000))
    for name in ['cut.tar.gz', 'garbage.zip', 'garbage.tar', 'missing.zip']:
        with pytest.raises(SourceError) as e: list(Archive(tmp_path/name).entries())
        one_line(e.value, tmp_path/name)
    z = make_zip(tmp_path/'crc.zip', {'s1/IM1': dicoms['s1/ser1/IM1']}, compression=zipfile.ZIP_STORED)       # a member whose bytes fail their CRC
    raw = bytearray(z.read_bytes()); i = raw.index(b'DICM'); raw[i:i + 4] = b'XXXX'
    z.write_bytes(bytes(raw))
    src = Archive(z)
    assert [e.path for e in src.entries()] == ['s1/IM1']
    with pytest.raises(SourceError) as e: src.fetch('s1/IM1', tmp_path/'out')
    one_line(e.value, z, 's1/IM1')


@pytest.mark.parametrize('kind', ['zip', 'tar.gz'])
def test_archive_fetch_is_thread_safe(tmp_path, kind):
    files = {f's{i % 3}/IM{i}': os.urandom(5000 + i) for i in range(60)}
    src = Archive(archive(tmp_path/f'many.{kind}', kind, files))
    keys = [e.path for e in src.entries()] * 2
    assert fetched(src, keys, tmp_path) == [files[k] for k in keys]
    assert src.requests == 2 * len(files)


def _read_bytes() -> int:
    "Bytes this process has read through system calls so far (Linux)."
    return int(next(l for l in Path('/proc/self/io').read_text().splitlines() if l.startswith('rchar')).split()[1])


@pytest.mark.skipif(not Path('/proc/self/io').exists(), reason='counting bytes read needs Linux /proc/self/io')
@pytest.mark.parametrize('threads', [1, 4])
def test_targz_pass_in_member_order_reads_the_archive_about_once(tmp_path, threads):
    "Random bytes do not compress, so the compressed bytes read measure the decompression; going back would reread from the start each time."
    files = {f's1/IM{i:04d}': os.urandom(20_000) for i in range(300)}
    path = make_tar(tmp_path/'big.tar.gz', files, mode='w:gz')
    src = Archive(path)
    keys = [e.path for e in src.entries()]                       # the listing: one pass, not counted below
    assert keys == list(files)
    before = _read_bytes()
    with ThreadPoolExecutor(threads) as pool: list(pool.map(lambda k: src.fetch(k, tmp_path/f'o{k[-4:]}'), keys))
    passes = (_read_bytes() - before) / path.stat().st_size
    assert passes < (1.5 if threads == 1 else 2.5), f"{passes:.1f} passes over the archive"   # threads a loaded machine delays may cost one more pass; reading back each time costs one per handle and member (4-6 before)
    assert all((tmp_path/f'o{k[-4:]}').read_bytes() == files[k] for k in keys[::37])


# ------------------------------------------------------------------------------------------------------------ http

def test_http_folder_listing_fetch_head_and_gone(tmp_path, dicoms):
    www = tmp_path/'www'
    for k, b in dicoms.items(): (www/k).parent.mkdir(parents=True, exist_ok=True); (www/k).write_bytes(b)
    (www/'.git').mkdir(); (www/'.git'/'config').write_bytes(b'x')
    with http_folder(www) as url:
        src = ObjectStore(url.replace('http://', 'http://me:secret@'), timeout=5)
        assert src.root == url and 'secret' not in repr(src)
        entries = sorted(src.entries())
        assert [e.path for e in entries] == sorted(dicoms)
        assert [e.study for e in entries] == ['s1', 's1', 's1', 's2', TOP]
        assert [e.size for e in entries] == [len(dicoms[e.path]) for e in entries]
        assert src.stats['hidden'] == 1
        keys = list(dicoms) * 4
        assert fetched(src, keys, tmp_path) == [dicoms[k] for k in keys]
        assert src.head('s2/IM 1.dcm') == dicoms['s2/IM 1.dcm'][:132]
        assert src.requests == len(keys) + 1
        (www/'top.dcm').unlink()
        with pytest.raises(Gone) as e: src.fetch('top.dcm', tmp_path/'out')
        one_line(e.value, url, 'top.dcm'); assert 'secret' not in str(e.value)
        os.utime(www/'s2'/'IM 1.dcm', ns=(0, 10**18))
        again = {e.path: e.mtime_ns for e in ObjectStore(url, timeout=5).entries()}
        assert [k for k in again if again[k] != dict((e.path, e.mtime_ns) for e in entries)[k]] == ['s2/IM 1.dcm']


ONE_REQUEST = 1.5      # a timeout long enough to tell one request (1.5 s and a little) from two (3 s and more)


def test_http_silent_server_costs_one_request_timeout(tmp_path):
    with silent_server() as url:
        src = ObjectStore(url, timeout=ONE_REQUEST)
        for call in [lambda: src.fetch('s1/IM1', tmp_path/'out'), lambda: src.head('s1/IM1')]:
            t = time.monotonic()
            with pytest.raises(TimeoutError) as e: call()
            assert time.monotonic() - t < 1.8 * ONE_REQUEST
            one_line(e.value, url, 's1/IM1')
        t = time.monotonic()
        with pytest.raises(SourceError) as e: list(src.entries())
        assert time.monotonic() - t < 1.8 * ONE_REQUEST
        one_line(e.value, url)


def test_http_refused_connection(tmp_path):
    with http_folder(tmp_path) as url: pass                    # a port nobody listens on any more
    src = ObjectStore(url, timeout=2)
    with pytest.raises(ConnectionError): src.fetch('a.dcm', tmp_path/'out')
    with pytest.raises(SourceError) as e: list(src.entries())
    one_line(e.value, url)


def test_missing_backend_or_protocol_is_one_line():
    try: import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match=r"gs:// needs gcsfs: pip install 'dicom_prep\[gcs\]'"): ObjectStore('gs://bucket/x')
    with pytest.raises(SourceError) as e: ObjectStore('nosuch://bucket/x')
    one_line(e.value, 'nosuch://bucket/x')


# ------------------------------------------------------------------------------------------------------------ s3 (moto)

@pytest.fixture(scope='module')
def s3_endpoint():
    "moto's S3 server on loopback, for the module; the tests skip, saying why, if it cannot start."
    stack = moto_s3()
    try: endpoint = stack.__enter__()
    except Exception as e: pytest.skip(f"moto's S3 server cannot start: {type(e).__name__}: {e}")
    yield endpoint
    stack.__exit__(None, None, None)


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    "(boto3 client, a fresh bucket), with fake credentials and the endpoint in the usual environment variables only."
    for k, v in dict(AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing', AWS_DEFAULT_REGION='us-east-1',
                     AWS_ENDPOINT_URL=s3_endpoint, AWS_CONFIG_FILE=str(tmp_path/'none'), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path/'none')).items():
        monkeypatch.setenv(k, v)
    for k in ['AWS_SESSION_TOKEN', 'AWS_PROFILE', 'AWS_ENDPOINT_URL_S3']: monkeypatch.delenv(k, raising=False)
    import boto3
    client, bucket = boto3.client('s3'), f'dicoms-{uuid.uuid4().hex[:8]}'
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _put(s3, files:dict, prefix='study-data/'):
    client, bucket = s3
    for k, b in files.items(): client.put_object(Bucket=bucket, Key=prefix + k, Body=b)


def test_s3_silent_endpoint_costs_one_request_timeout(monkeypatch, tmp_path):
    "Neither botocore nor s3fs retries on its own: the run does, with its own backoff."
    with silent_server() as url:
        for k, v in dict(AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing', AWS_DEFAULT_REGION='us-east-1',
                         AWS_ENDPOINT_URL=url.rstrip('/')).items(): monkeypatch.setenv(k, v)
        src = ObjectStore('s3://bucket/prefix', timeout=ONE_REQUEST)
        t = time.monotonic()
        with pytest.raises(TimeoutError) as e: src.fetch('s1/IM1', tmp_path/'out')
        assert time.monotonic() - t < 1.8 * ONE_REQUEST
        one_line(e.value, 's3://bucket/prefix', 's1/IM1')
        t = time.monotonic()
        with pytest.raises(SourceError): list(src.entries())
        assert time.monotonic() - t < 1.8 * ONE_REQUEST


def test_s3_listing_fetch_head_and_requests(s3, dicoms, tmp_path):
    _put(s3, {**dicoms, '.trash/x.dcm': b'x', 's1/DICOMDIR': b'x'})
    _put(s3, {'elsewhere.dcm': b'x'}, prefix='')
    src = ObjectStore(f's3://{s3[1]}/study-data', timeout=10)
    entries = sorted(src.entries())
    assert [e.path for e in entries] == sorted(dicoms)
    assert [e.study for e in entries] == ['s1', 's1', 's1', 's2', TOP]
    assert [e.size for e in entries] == [len(dicoms[e.path]) for e in entries]
    assert len({e.mtime_ns for e in entries}) == len(entries)    # ETags of different bytes
    assert src.stats == Counter(hidden=1, dicomdir=1)
    keys = list(dicoms) * 4
    assert fetched(src, keys, tmp_path) == [dicoms[k] for k in keys]
    assert src.head('s1/ser1/IM1') == dicoms['s1/ser1/IM1'][:132]
    assert src.requests == len(keys) + 1
    whole = {e.path: e.study for e in ObjectStore(f's3://{s3[1]}').entries()}       # a whole bucket: keys from its top
    assert whole == {**{f'study-data/{k}': 'study-data' for k in dicoms}, 'elsewhere.dcm': TOP}


def test_s3_overwritten_gets_new_token_deleted_is_gone(s3, dicoms, tmp_path):
    _put(s3, dicoms)
    url = f's3://{s3[1]}/study-data/'
    before = {e.path: e.mtime_ns for e in ObjectStore(url).entries()}
    _put(s3, {'s1/ser1/IM2': dicoms['s1/ser1/IM2'][::-1]})
    s3[0].delete_object(Bucket=s3[1], Key='study-data/top.dcm')
    src = ObjectStore(url)
    after = {e.path: e.mtime_ns for e in src.entries()}
    assert [k for k in before if k in after and before[k] != after[k]] == ['s1/ser1/IM2']
    assert sorted(set(before) - set(after)) == ['top.dcm']
    with pytest.raises(Gone) as e: src.fetch('top.dcm', tmp_path/'out')
    one_line(e.value, url.rstrip('/'), 'top.dcm')


def test_s3_missing_bucket_and_refused_credentials_are_one_line(s3, s3_endpoint, dicoms, tmp_path):
    _put(s3, dicoms)
    with pytest.raises(SourceError) as e: list(ObjectStore('s3://no-such-bucket-here/x').entries())
    one_line(e.value, 's3://no-such-bucket-here/x')
    src = ObjectStore(f's3://{s3[1]}/study-data')
    with s3_auth_enforced(s3_endpoint):
        with pytest.raises(SourceError) as e: list(src.entries())
        one_line(e.value, f's3://{s3[1]}/study-data', 'PermissionError')
        with pytest.raises(SourceError) as e: src.fetch('top.dcm', tmp_path/'out')
        one_line(e.value, 'top.dcm', 'PermissionError')
