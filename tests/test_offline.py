"""Tests run offline: nothing in the suite, the notebooks, the benchmarks or the product may reach beyond this machine.

- pytest runs under `block_network` (conftest.py): a look-up or connection beyond loopback raises at once;
- nbdev-test runs under it too (`test_setup` in pyproject.toml), so a notebook that asks pydicom for its test files
  fails in seconds, naming the host, instead of waiting 21 s per file on pydicom's download retries;
- no source calls `get_testdata_files`, or `get_testdata_file` without `download=False`: `dicom_prep.sources.sample_files`
  finds the sample data on disk instead.
"""
import json, os, re, shutil, socket, subprocess, time, urllib.request
from pathlib import Path

import pytest

from dicom_prep.faults import NetworkBlocked

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*ROOT.glob('nbs/*.ipynb'), *ROOT.glob('tests/*.py'), *ROOT.glob('bench/*.py'), *ROOT.glob('dicom_prep/*.py')]
LOOKUP = 'get_testdata' + '_file'         # pydicom's look-ups, spelled in parts: this file only names them, it never calls them
DOWNLOADING = re.compile(LOOKUP + r's\(|' + LOOKUP + r'\((?![^)]*download=False)')


def _code(path:Path) -> str:
    "The code of a module, or of a notebook's code cells (its prose may name what it avoids)."
    if path.suffix != '.ipynb': return path.read_text()
    return '\n'.join(''.join(c['source']) for c in json.loads(path.read_text())['cells'] if c['cell_type'] == 'code')


def test_no_source_asks_pydicom_for_a_download():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in SOURCES
           for m in DOWNLOADING.finditer(_code(p))]
    assert not bad, f"use dicom_prep.sources.sample_file(s), which never downloads: {bad}"


def test_outside_hosts_are_blocked_at_once():
    t0 = time.time()
    with pytest.raises(NetworkBlocked, match='pypi.org'): socket.getaddrinfo('pypi.org', 443)
    with pytest.raises(NetworkBlocked, match='192.0.2.1'): socket.create_connection(('192.0.2.1', 80), timeout=5)
    with pytest.raises(NetworkBlocked, match='example.com'): urllib.request.urlopen('http://example.com', timeout=5)
    assert time.time() - t0 < 1


def test_loopback_stays_open():
    with socket.create_server(('127.0.0.1', 0)) as srv, socket.create_connection(srv.getsockname(), timeout=5) as c:
        conn, _ = srv.accept(); conn.sendall(b'ok'); assert c.recv(2) == b'ok'; conn.close()
    assert socket.getaddrinfo('localhost', 80)


NOTEBOOK = {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': 'c0', 'metadata': {}, 'outputs': [],
                       'source': [f'from pydicom.data import {LOOKUP}s\n', f"{LOOKUP}s('*.dcm')"]}],
            'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}


@pytest.mark.skipif(shutil.which('nbdev-test') is None, reason='nbdev-test not installed (pip install -e ".[dev]")')
def test_a_notebook_that_downloads_fails_fast_naming_the_cause(tmp_path):
    "The project's nbdev settings (test_setup) on a notebook calling get_testdata_files, with an empty HOME (no cache)."
    proj = tmp_path/'proj'; (proj/'nbs').mkdir(parents=True)
    shutil.copy(ROOT/'pyproject.toml', proj)
    (proj/'nbs/bad.ipynb').write_text(json.dumps(NOTEBOOK))
    (home := tmp_path/'home').mkdir()
    env = {**os.environ, 'HOME': str(home)}
    t0 = time.time()
    r = subprocess.run(['nbdev-test', 'nbs/bad.ipynb'], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert r.returncode != 0, r.stdout + r.stderr
    assert 'NetworkBlocked: tests run offline, but something tried to look up' in r.stderr and 'github' in r.stderr, r.stderr[-2000:]
    assert took < 60, f"took {took:.0f} s: the download was retried"
