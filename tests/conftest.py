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


# ---------------------------------------------------------------------------------------------------- stand-in for the masks stage

STAND_IN_SEGMENTS = {2: 'liver', 5: 'tumour', 300: 'vessel'}   # segment id -> label: gaps on purpose, and one past 255
_name = lambda i: STAND_IN_SEGMENTS.get(i, f'organ {i}')


def stand_in_masks(out, kind:str='preprocess', ids=(2, 5), skip:int=3, seed:int=0) -> dict:
    """STAND-IN FOR THE MASKS STAGE (issue 23 item 2): annotate a preprocess or NIfTI run's output `out` exactly as
    schema 7 says that stage does, with the gaps in segment ids and the sizes the tests need and no SEG/RTSTRUCT to
    make. Swap a call for the real stage (a run over SEG/RTSTRUCT files) where real data serves; the assertions stay.

    - preprocess: a mask PNG `masks/<filename>.png` (relative to the output folder) of the image PNG's size, mode 'L',
      or 'I;16' when a segment id > 255, in `images.mask_path`;
    - nifti: a label volume `<volume>_seg.nii.gz` beside each volume, on its first 3 dims and its affine, in `volumes.seg_path`;
    - the segments `ids` in `segments` (labels from `STAND_IN_SEGMENTS`).
    Every `skip`-th image or volume is left without a mask. Returns {filename or volume id: the label map written}."""
    import nibabel as nib
    import numpy as np
    from PIL import Image
    rng, out, written = np.random.default_rng(seed), Path(out), {}
    with closing(sqlite3.connect(db_path(out))) as c, c:
        c.executemany("insert into segments (id, key, label, category, type, colour, added_at) values (?, ?, ?, 'T-D0050', 'T-62000', '#ff0000', 'now')",
                      [(i, f'{_name(i)}|SCT', _name(i)) for i in ids])
        table, key, col = ('images', 'filename', 'thumbnail_path') if kind == 'preprocess' else ('volumes', 'id', 'output_path')
        rows = c.execute(f"select {key}, {col} from {table} where {col} is not null order by {key}").fetchall()
        for k, (name, rel) in enumerate(rows):
            if k % skip == 0: continue
            if kind == 'preprocess':
                with Image.open(out/rel) as im: shape = im.size[::-1]
                mask_rel, img = f'masks/{name}.png', None
            else:
                img = nib.load(out/rel); shape = img.shape[:3]
                mask_rel = rel.removesuffix('.nii.gz') + '_seg.nii.gz'
            a = rng.choice(np.array([0, *ids], np.uint16 if max(ids) > 255 else np.uint8), size=shape)
            (out/mask_rel).parent.mkdir(parents=True, exist_ok=True)
            if img is None: Image.fromarray(a).save(out/mask_rel)
            else: nib.save(nib.Nifti1Image(a, img.affine), out/mask_rel)
            c.execute(f"update {table} set {'mask_path' if img is None else 'seg_path'} = ? where {key} = ?", [mask_rel, name])
            written[name] = a
    return written
