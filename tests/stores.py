"Servers for the archive and object-storage sources' tests, all on loopback: a folder over http, a server that never answers, moto's S3."
import contextlib, functools, io, tarfile, threading, zipfile
import socket
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.request import Request, urlopen


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@contextlib.contextmanager
def http_folder(folder):
    "The URL of `folder` served by Python's http.server, in a thread on 127.0.0.1."
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try: yield f'http://127.0.0.1:{server.server_port}/'
    finally: server.shutdown(); server.server_close()


@contextlib.contextmanager
def silent_server():
    "The URL of a server that accepts connections (the kernel completes them) and never answers."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(64)
        yield f'http://127.0.0.1:{s.getsockname()[1]}/'


@contextlib.contextmanager
def moto_s3():
    "The endpoint URL of moto's standalone S3 server, in a thread on 127.0.0.1."
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try: yield f'http://{host}:{port}'
    finally: server.stop()


@contextlib.contextmanager
def s3_auth_enforced(endpoint:str):
    "Make moto's server check every request's credentials against its IAM users (it has none: all are refused)."
    def reset(count:bytes): urlopen(Request(f'{endpoint}/moto-api/reset-auth', data=count, method='POST', headers={'Content-Type': 'text/plain'}), timeout=10).read()
    reset(b'0')
    try: yield
    finally: reset(b'inf')


def make_zip(path, files:dict, extra:dict|None=None, compression:int=zipfile.ZIP_DEFLATED):
    "A zip of {name: bytes} `files` (and `extra` members, written as named, '..' and all)."
    with zipfile.ZipFile(path, 'w', compression) as z:
        for n, b in {**files, **(extra or {})}.items(): z.writestr(n, b)
    return path


def make_tar(path, files:dict, extra:dict|None=None, mode:str='w', mtime:int=1_700_000_000, mtimes:dict|None=None):
    "A tar (compressed as `mode` says: 'w', 'w:gz', 'w:bz2', 'w:xz') of {name: bytes}, members dated `mtime` or as `mtimes` says."
    with tarfile.open(path, mode) as t:
        for n, b in {**files, **(extra or {})}.items():
            ti = tarfile.TarInfo(n); ti.size, ti.mtime = len(b), (mtimes or {}).get(n, mtime)
            t.addfile(ti, io.BytesIO(b))
    return path
