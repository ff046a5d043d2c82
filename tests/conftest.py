"Helpers shared by the test files: the console scripts and read-only access to a run's database. Tests run offline."
import json, shutil, sqlite3, sys
from contextlib import closing
from pathlib import Path

from dicom_prep.faults import block_network

block_network()     # any look-up or connection beyond loopback raises NetworkBlocked at once (nbs/01a_faults.ipynb)


def console_script(name:str, module:str|None=None) -> list[str]:
    "The installed console script `name` (or its module's `main` through this interpreter)."
    exe = shutil.which(name)
    module = module or f"dicom_prep.{name.removeprefix('dicom_prep_')}"
    return [exe] if exe else [sys.executable, '-c', f'from {module} import main; main()']


def db_path(out) -> Path:
    "The database of a run: `out` itself when it is a file, else OUTPUT_DIR/dicom_prep.db."
    out = Path(out)
    return out if out.suffix == '.db' else out/'dicom_prep.db'


def ro(out) -> sqlite3.Connection:
    "A read-only connection (rows as `sqlite3.Row`) to a run's database; safe while a run writes (WAL)."
    conn = sqlite3.connect(f"file:{db_path(out)}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def query(out, sql:str, args=()) -> list:
    "Rows of `sql` on a run's database, as tuples."
    with closing(ro(out)) as c: return [tuple(r) for r in c.execute(sql, args)]


def source_file(out, rel:str, kind:str='preprocess') -> Path:
    "The source file that a run's index records as `rel` (source paths are stored relative to the recorded source root)."
    [(root,)] = query(out, 'select value from meta where key = ?', [f'{kind}_source_root'])
    return Path(json.loads(root))/rel
