"A real Orthanc on loopback for the PACS tests: a temporary config (HTTP, DICOMweb, DIMSE), started, stopped, restarted and killed by the tests."
import json, os, shutil, socket, subprocess, time
from pathlib import Path

import pytest
import requests

ORTHANC = shutil.which('Orthanc') or '/usr/sbin/Orthanc'
DICOMWEB_PLUGIN = '/usr/share/orthanc/plugins/libOrthancDicomWeb.so'


def free_port() -> int:
    "A TCP port on loopback that nothing listens on now."
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class OrthancServer:
    "Orthanc with its storage, index and config in `tmpdir`: `start()`, `stop()` (data kept), `kill()`, `upload(paths)`."
    def __init__(self, tmpdir, users:dict|None=None, aet='ORTHANC', check_called_aet=False):
        self.dir, self.aet = Path(tmpdir), aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.auth = next(iter(users.items())) if users else None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir/'orthanc.json'
        self.config.write_text(json.dumps(self._config(users, check_called_aet), indent=1))
        self.proc = None

    def _config(self, users, check_called_aet) -> dict:
        return {'Name': 'dicom_prep tests', 'StorageDirectory': str(self.dir/'storage'), 'IndexDirectory': str(self.dir/'index'),
                'HttpPort': self.http_port, 'DicomPort': self.dicom_port, 'DicomAet': self.aet, 'RemoteAccessAllowed': False,
                'AuthenticationEnabled': bool(users), 'RegisteredUsers': users or {},
                'DicomCheckCalledAet': check_called_aet, 'DicomAlwaysAllowFind': True, 'DicomAlwaysAllowGet': True,
                'Plugins': [DICOMWEB_PLUGIN], 'DicomWeb': {'Enable': True, 'Root': '/dicom-web/'},
                'SaveJobs': False, 'ConcurrentJobs': 1, 'HttpThreadsCount': 8, 'DicomThreadsCount': 8}

    @property
    def url(self) -> str: return f'http://127.0.0.1:{self.http_port}'
    @property
    def dicomweb_url(self) -> str: return f'dicomweb+http://127.0.0.1:{self.http_port}/dicom-web'
    @property
    def dimse_url(self) -> str: return f'dimse://{self.aet}@127.0.0.1:{self.dicom_port}'

    def start(self, wait:float=20.):
        "Start Orthanc (same ports, same storage) and wait until its REST API answers; RuntimeError with its log if it does not."
        self.log = open(self.dir/'orthanc.log', 'ab')
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     env={**os.environ, 'TCP_NODELAY': '1'})     # DCMTK: no Nagle delay on each DIMSE message
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None: break
            try:
                if requests.get(f'{self.url}/system', auth=self.auth, timeout=1).ok: return self
            except requests.RequestException: pass
            time.sleep(0.1)
        why = f"exited with code {self.proc.returncode}" if self.proc.poll() is not None else f"no answer within {wait:.0f} s"
        self.kill()
        raise RuntimeError(f"Orthanc {why}: {(self.dir/'orthanc.log').read_text(errors='replace')[-800:]}")

    def stop(self):
        "Stop Orthanc gracefully (its data stays for the next `start()`)."
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self._closed()

    def kill(self):
        "kill -9: Orthanc stops at once, mid-request."
        if self.proc and self.proc.poll() is None: self.proc.kill(); self.proc.wait()
        self._closed()

    def _closed(self):
        if getattr(self, 'log', None): self.log.close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()

    def rest(self, method:str, path:str, **kw) -> requests.Response:
        "A call to Orthanc's REST API, raising on an HTTP error."
        r = requests.request(method, f'{self.url}{path}', auth=self.auth, timeout=30, **kw)
        r.raise_for_status()
        return r

    def upload(self, paths) -> list[str]:
        "POST each file to /instances; the Orthanc ids of the stored instances."
        return [self.rest('POST', '/instances', data=Path(p).read_bytes()).json()['ID'] for p in paths]

    def delete(self, sop_uid:str):
        "Delete the instance with SOP Instance UID `sop_uid`."
        [oid] = self.rest('POST', '/tools/lookup', data=sop_uid).json()
        self.rest('DELETE', f"/instances/{oid['ID']}")


def started(tmpdir, **kw) -> OrthancServer:
    "A started `OrthancServer(tmpdir, **kw)`, or a pytest skip that says why there is none (not installed, or it did not start)."
    if not Path(ORTHANC).exists(): pytest.skip(f"Orthanc is not installed ({ORTHANC}): apt-get install orthanc orthanc-dicomweb")
    try: return OrthancServer(tmpdir, **kw).start()
    except (OSError, RuntimeError) as e: pytest.skip(f"Orthanc does not start: {e}")
