"End-to-end checks of `dicom_prep.sheet`: the `dicom_prep_sheet` CLI in a subprocess, read back from the DB."
import subprocess
from pathlib import Path

import numpy as np, pytest
from PIL import Image

from dicom_prep.db import open_db, set_meta
from conftest import console_script
from dicom_prep.sheet import (GAP, _WARN, caption, cell_height, contact_sheet, failures_sheet, header_height,
                              sample_images, tile_origin, write_sheets)

MODS, SPLITS, STUDIES = ('CT', 'MR', 'CR', None), ('train', 'val', 'test'), ('s1', 's2', 's3', 's4', 's5')
FAILURES = [('unreadable', 'not a DICOM file'), ('decode_error', 'JPEG-LS decoder missing'), ('timeout', 'took over 60 s'),
            ('crashed', 'worker died (signal 9)')] + [('decode_error', f'RLE segment {i} truncated') for i in range(20)]
N_IMAGES, N_CRASHED = 120, 4   # the files of images 0-3 were marked 'crashed' by a later run

def level(i): return 5 + 2 * (i % 120)   # a distinct grey per image: the tile's centre tells which PNG it shows

def spec(i):
    "Attributes of the i-th synthetic image."
    study = STUDIES[i % 5]
    fn = f"{study}/series{i % 2}/IM{i:04d}" if i % 7 else f"{study}/multi{i:04d}_frame{i % 3:04d}"
    return dict(filename=fn, study_id=study, study_uid=f"1.2.840.{i % 5}", modality=MODS[i % 4], split=SPLITS[i % 3],
                window=('default', 'lung')[i % 2], frame_number=i % 3, num_frames=3 if i % 7 == 0 else 1,
                photometric='MONOCHROME1' if i % 11 == 0 else 'MONOCHROME2', thumbnail_path=f"images/{fn}.png",
                source_path=f"/raw/{fn}.dcm")

NUMBER = {spec(i)['filename']: i for i in range(N_IMAGES)}

def png(i):
    "The i-th image: its grey level, some in 16-bit or RGB, in varied shapes."
    h, w = (64, 48) if i % 2 else (40, 80)
    a = np.full((h, w), level(i), np.uint8)
    a[:4] = 255
    if i % 13 == 0: return Image.fromarray(a.astype(np.uint16) * 257)
    if i % 17 == 0: return Image.fromarray(np.dstack([a] * 3))
    return Image.fromarray(a)

@pytest.fixture(scope='module')
def index(tmp_path_factory):
    "An output folder like dicom_prep_preprocess leaves: PNGs, and an index whose files table has failures."
    root = tmp_path_factory.mktemp('out')
    db = open_db(root/'dicom_prep.db')
    set_meta(db, 'output_dir', str(root))
    rows = [dict(spec(i), rows=png(i).height, columns=png(i).width) for i in range(N_IMAGES)]
    for i, r in enumerate(rows):
        (root/r['thumbnail_path']).parent.mkdir(parents=True, exist_ok=True)
        png(i).save(root/r['thumbnail_path'])
    files = [dict(path=r['source_path'], study_id=r['study_id'], size=100, status='crashed' if i < N_CRASHED else 'ok')
             for i, r in enumerate(rows)]
    files += [dict(path=f"/raw/bad/f{k:02d}.dcm", study_id=STUDIES[k % 5], size=k, status=s, error=e) for k, (s, e) in enumerate(FAILURES)]
    files += [dict(path='/raw/sr/report.dcm', study_id='s1', size=5, status='no_pixels')]
    db['images'].insert_all(rows)
    db['files'].insert_all(files)
    db.conn.commit()
    return root/'dicom_prep.db'

def cli(*args, cwd=None):
    "Run the dicom_prep_sheet console script (or the module) and capture its output."
    return subprocess.run(console_script('dicom_prep_sheet') + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)

def matches(i, **filters):
    "Whether synthetic image i matches `filters`, decided in Python without SQL."
    s = spec(i)
    values = dict(modality=s['modality'] or '', split=s['split'], window=s['window'], status='crashed' if i < N_CRASHED else 'ok')
    return all(v in (s['study_id'], s['study_uid']) if k == 'study' else v == values[k] for k, v in filters.items() if v is not None)

# --- dimensions --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cols,n,tile', [(8, 64, 160), (5, 12, 100), (3, 3, 64), (1, 2, 120), (10, 100, 48)])
def test_dimensions_follow_cols_n_tile(index, tmp_path, cols, n, tile):
    s = contact_sheet(index, n=n, cols=cols, tile=tile, out_path=tmp_path/'s.png')
    w, h = Image.open(s.pages[0]).size
    assert w == cols * tile + (cols + 1) * GAP
    assert h == header_height() + -(-n // cols) * (cell_height(tile) + GAP)
    assert cell_height(tile) > tile   # room for the caption under each picture

def test_one_more_tile_row_adds_one_cell_height(index, tmp_path):
    size = lambda n: Image.open(contact_sheet(index, n=n, cols=4, tile=80, out_path=tmp_path/f"{n}.png").pages[0]).size
    assert size(8) == size(5)
    assert size(9)[1] - size(8)[1] == size(13)[1] - size(9)[1] > 80
    assert size(9)[0] == size(8)[0]

def test_pagination_via_cli(index, tmp_path):
    r = cli('--db', index, '--out', tmp_path/'p.png', '--n', 25, '--per-page', 10, '--cols', 5, '--tile', 64)
    assert r.returncode == 0, r.stderr
    pages = [Path(l) for l in r.stdout.split()]
    assert [p.name for p in pages] == ['p.png', 'p_002.png', 'p_003.png']
    assert [Image.open(p).size[1] for p in pages][:2] == [Image.open(pages[0]).size[1]] * 2
    assert Image.open(pages[2]).size[1] < Image.open(pages[0]).size[1]   # 5 tiles: one row instead of two
    assert cli('--db', index, '--out', tmp_path/'p.png', '--n', 5, '--per-page', 10).returncode == 0
    assert sorted(p.name for p in tmp_path.glob('p*.png')) == ['p.png']   # old extra pages are gone

# --- captions match the sampled rows ----------------------------------------------------------------------------

def test_tiles_show_the_image_their_caption_names(index, tmp_path):
    db = open_db(index)
    s = contact_sheet(index, n=40, cols=7, tile=90, per_page=25, out_path=tmp_path/'c.png')
    assert sum(map(len, s.captions)) == 40
    for path, rows, caps in zip(s.pages, s.rows, s.captions, strict=True):
        page = Image.open(path).convert('RGB')
        for k, (drawn, cap) in enumerate(zip(rows, caps, strict=True)):
            row = db['images'].get(drawn['filename'])   # the tile's row is a row of the index ...
            assert cap == caption(row)
            x, y = tile_origin(k, 7, 90)
            centre = page.getpixel((x + 45, y + 50))
            assert max(abs(c - level(NUMBER[row['filename']])) for c in centre) <= 1, cap   # ... whose PNG is shown
            band = page.crop((x, y + 90, x + 90, y + cell_height(90)))
            assert max(max(c) for _, c in band.getcolors(90 * 90)) > 200   # and the caption text is drawn under it

def test_header_says_what_was_sampled_from_how_many(index, tmp_path):
    s = contact_sheet(index, modality='CT', split='train', n=4, out_path=tmp_path/'h.png')
    n_match = sum(matches(i, modality='CT', split='train') for i in range(N_IMAGES))
    assert s.header == f"modality=CT · split=train · 4 sampled of {n_match} files (seed 0)"
    assert s.total == n_match

def test_missing_and_unreadable_pngs_become_note_tiles(index, tmp_path):
    root = index.parent
    moved = [root/r['thumbnail_path'] for r in sample_images(index, n=2, study='s3')[0]]
    moved[0].rename(tmp_path/'gone.png')
    bytes1 = moved[1].read_bytes(); moved[1].write_bytes(b'\x89PNG garbage')
    try:
        s = contact_sheet(index, n=2, study='s3', cols=2, tile=100, out_path=tmp_path/'m.png')
        page = Image.open(s.pages[0]).convert('RGB')
        for k in range(2):
            x, y = tile_origin(k, 2, 100)
            assert _WARN in {c for _, c in page.crop((x, y, x + 100, y + 100)).getcolors(100 * 100)}
    finally:
        (tmp_path/'gone.png').rename(moved[0]); moved[1].write_bytes(bytes1)

# --- reproducible sampling ---------------------------------------------------------------------------------------

def test_same_seed_same_sheet_across_processes(index, tmp_path):
    outs = []
    for k, seed in enumerate([7, 7, 8]):
        r = cli('--db', index, '--out', tmp_path/f"{k}.png", '--n', 12, '--seed', seed, '--modality', 'CT')
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path/f"{k}.png").read_bytes())
    assert outs[0] == outs[1]   # each process salts hash() differently: the sample must not depend on it
    assert outs[0] != outs[2]

def test_seed_changes_the_sample_not_its_size(index):
    samples = [{r['filename'] for r in sample_images(index, n=10, seed=s)[0]} for s in range(5)]
    assert all(len(s) == 10 for s in samples)
    assert len({frozenset(s) for s in samples}) == 5

def test_growing_n_keeps_the_smaller_sample(index):
    small = {r['filename'] for r in sample_images(index, n=10, seed=3)[0]}
    big = {r['filename'] for r in sample_images(index, n=30, seed=3)[0]}
    assert small < big

# --- filters -----------------------------------------------------------------------------------------------------

FILTER_CASES = [dict(modality='CT'), dict(split='val'), dict(study='s2'), dict(study='1.2.840.3'), dict(window='lung'),
                dict(status='crashed'), dict(modality='MR', split='test'), dict(modality=''), dict(split='train', study='s1', window='default')]

@pytest.mark.parametrize('filters', FILTER_CASES)
def test_filters_select_exactly_the_matching_rows(index, filters):
    rows, total = sample_images(index, n=0, **filters)
    expected = {spec(i)['filename'] for i in range(N_IMAGES) if matches(i, **filters)}
    assert expected and {r['filename'] for r in rows} == expected and total == len(expected)

def test_cli_filters(index, tmp_path):
    r = cli('--db', index, '--out', tmp_path/'f.png', '--split', 'val', '--modality', 'MR', '--n', 0)
    assert r.returncode == 0, r.stderr
    n_match = sum(matches(i, split='val', modality='MR') for i in range(N_IMAGES))
    cols = 8
    assert Image.open(tmp_path/'f.png').size[1] == header_height() + -(-n_match // cols) * (cell_height(160) + GAP)

# --- empty selections and bad input ------------------------------------------------------------------------------

def test_empty_selection_is_a_clear_message(index, tmp_path):
    "Values the index has, that no image has together (issue 29: an unknown split is an error of its own, below)."
    r = cli('--db', index, '--out', tmp_path/'e.png', '--split', 'val', '--modality', 'CT', '--status', 'crashed')
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip() == (f"dicom_prep_sheet: error: No images match modality=CT · split=val · status=crashed in {index.resolve()} "
                                f"({N_IMAGES} images in total)")
    assert not (tmp_path/'e.png').exists()

def test_an_unknown_split_lists_the_splits_there_are(index, tmp_path):
    r = cli('--db', index, '--out', tmp_path/'e.png', '--split', 'holdout')
    assert r.returncode == 2 and r.stderr.strip() == f"dicom_prep_sheet: error: no split 'holdout' in {index.resolve()}; it has test (40), train (40), val (40)"
    assert not (tmp_path/'e.png').exists()

@pytest.mark.parametrize('flag,asked,found', [('split', 'valid', 'val'), ('split', 'VAL', 'val'), ('modality', 'ct', 'CT')])
def test_other_names_and_cases_find_a_split_or_modality(index, tmp_path, flag, asked, found):
    "The index calls its split 'val': `valid` finds it (and `val` a 'valid' one: a real run's, below); a modality is found in any case."
    r = cli('--db', index, '--out', tmp_path/'v.png', '--n', 0, f'--{flag}', asked)
    assert r.returncode == 0, r.stderr
    n_match = sum(matches(i, **{flag: found}) for i in range(N_IMAGES))
    assert Image.open(tmp_path/'v.png').size[1] == header_height() + -(-n_match // 8) * (cell_height(160) + GAP)
    assert contact_sheet(index, n=0, out_path=tmp_path/'w.png', **{flag: asked}).header.startswith(f"{flag}={found} · {n_match} sampled")

def test_help_names_the_splits_a_run_writes():
    r = cli('--help')
    assert 'train/valid/test' in ' '.join(r.stdout.split()) and 'train/val/' not in r.stdout

@pytest.mark.parametrize('args,msg,code', [(['--db', 'nope.db'], 'No dicom_prep database at nope.db', 2),          # unusable arguments
                                           (['--failures', '--modality', 'CT'], 'do not apply to --failures', 2),
                                           (['--modality', 'CT', '--split', 'test', '--status', 'crashed'], 'No images match', 1)])  # nothing matched
def test_cli_errors_are_one_line(index, tmp_path, args, msg, code):
    "One style for every console script: `PROGRAM: error: reason` on one line; 2 for unusable arguments, 1 for nothing to draw."
    args = args if args[:1] == ['--db'] else ['--db', index, *args]
    r = cli(*args, '--out', tmp_path/'x.png', cwd=tmp_path)
    assert r.returncode == code and r.stderr.startswith('dicom_prep_sheet: error: ') and msg in r.stderr
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1

# --- failures sheet and write_sheets ------------------------------------------------------------------------------

def test_failures_sheet_shows_every_kind_of_failure(index, tmp_path):
    s = failures_sheet(index, n=5, out_path=tmp_path/'sheet_failures.png')
    assert {r['status'] for r in s.rows[0]} == {k for k, _ in FAILURES}   # 21 decode_errors do not crowd out the rare kinds
    assert s.header.startswith(f"failures · 5 sampled of {len(FAILURES) + N_CRASHED} failed files (seed 0) · decode_error 21 · crashed 5")
    assert 'no_pixels' not in s.header and 'ok' not in s.header
    errors = {f"/raw/bad/f{k:02d}.dcm": e for k, (_, e) in enumerate(FAILURES)} | {spec(i)['source_path']: None for i in range(N_CRASHED)}
    assert all(r['error'] == errors[r['path']] and c[0] == r['path'] for r, c in zip(s.rows[0], s.captions[0], strict=True))

def test_no_failures_is_a_message_not_an_error(index, tmp_path):
    "No failed file to draw is good news: one line on stdout, exit 0, no sheet."
    r = cli('--db', index, '--failures', '--status', 'too_large', '--out', tmp_path/'x.png')
    assert r.returncode == 0 and r.stderr == '' and not (tmp_path/'x.png').exists()
    assert r.stdout.strip() == f"No failed files match status=too_large in {index.resolve()} ({len(FAILURES) + N_IMAGES + 1} files in total): nothing to draw"

def test_failures_via_cli(index, tmp_path):
    r = cli('--db', index, '--failures', '--status', 'decode_error', '--n', 0, '--per-page', 8, '--out', tmp_path/'fail.png')
    assert r.returncode == 0, r.stderr
    assert [Path(l).name for l in r.stdout.split()] == ['fail.png', 'fail_002.png', 'fail_003.png']   # 21 at 8 a page

def test_write_sheets_one_per_modality_plus_failures(index, tmp_path):
    paths = write_sheets(index, tmp_path, n=16, tile=64)
    assert [p.name for p in paths] == ['sheet_unknown.png', 'sheet_CR.png', 'sheet_CT.png', 'sheet_MR.png', 'sheet_failures.png']
    assert all(p.parent == tmp_path and Image.open(p).size[0] == 8 * 64 + 9 * GAP for p in paths)

# --- with the real pipeline ---------------------------------------------------------------------------------------

def test_sheets_of_a_real_preprocess_run(tmp_path):
    from dicom_prep.preprocess import preprocess
    from dicom_prep.synth import synth_dicom
    raw = tmp_path/'raw'
    for i in range(5): synth_dicom(raw/f"study_{i % 2}/im{i}.dcm", modality=('CT', 'MR')[i % 2], seed=i, frames=3 if i == 4 else 1)
    (raw/'study_0/bad.dcm').write_bytes(b'not a dicom' * 20)
    r = preprocess(raw, tmp_path/'out', n_workers=0)
    res = cli('--db', r.db_path, '--modality', 'CT', '--n', 0, '--out', tmp_path/'ct.png')
    assert res.returncode == 0, res.stderr
    s = contact_sheet(r.db_path, modality='CT', n=0, out_path=tmp_path/'ct2.png')
    assert [row['filename'] for row in s.rows[0]] == ['study_0/im0', 'study_0/im2', 'study_0/im4_frame0001']   # a file, its middle frame
    page = Image.open(tmp_path/'ct.png').convert('RGB')
    for k in range(3):   # every PNG was found through meta.output_dir: pictures, not 'missing PNG' notes
        x, y = tile_origin(k, 8, 160)
        assert _WARN not in {c for _, c in page.crop((x, y, x + 160, y + 160)).getcolors(160 * 160)}
    paths = write_sheets(r.db_path, tmp_path/'out/sheets')
    assert [p.name for p in paths] == ['sheet_CT.png', 'sheet_MR.png', 'sheet_failures.png']
    f = failures_sheet(r.db_path, out_path=tmp_path/'f.png')
    assert [(row['path'], row['status']) for row in f.rows[0]] == [('study_0/bad.dcm', 'unreadable')]   # relative to the source root


def test_a_cine_is_one_tile_and_captions_name_series_pseudonymised_where_the_index_is(tmp_path):
    "A 30-frame cine among three CT slices: four tiles, one each; captions give series number and description, and a pseudonymised index's give neither description nor a raw UID."
    from dicom_prep.preprocess import preprocess
    from dicom_prep.synth import synth_cine, synth_series
    raw = tmp_path/'raw'
    synth_cine(raw/'s1/cine.dcm', frames=30, syntax=None)
    paths = synth_series(raw/'s1/ct', n=3, series_number=2, description='AX LUNG', series_uid='1.2.826.0.1.3680043.8.498.777')
    for out, kw in (('plain', {}), ('pseudo', dict(pseudonymize=True))):
        preprocess(raw, tmp_path/out, n_workers=0, quiet=True, splits='valid:1', **kw)
    s = contact_sheet(tmp_path/'plain/dicom_prep.db', n=4, out_path=tmp_path/'p.png')
    assert sorted(r['source_path'] for r in s.rows[0]) == sorted(['s1/cine.dcm'] + [p.relative_to(raw).as_posix() for p in paths])
    cine = next(r for r in s.rows[0] if r['source_path'] == 's1/cine.dcm')
    assert cine['frame_number'] == 14 and s.header.endswith('4 sampled of 4 files (seed 0)')
    assert [c[0] for c in s.captions[0] if c[0] != 's1 · cine_frame0014'] == ['s1 · series 2 · AX LUNG'] * 3
    r = cli('--db', tmp_path/'plain/dicom_prep.db', '--split', 'val', '--per', 'series', '--out', tmp_path/'v.png')   # the run's split is 'valid'
    assert r.returncode == 0 and r.stdout.split() == [str(tmp_path/'v.png')], r.stderr
    p = contact_sheet(tmp_path/'pseudo/dicom_prep.db', n=0, out_path=tmp_path/'q.png', per='series')
    assert len(p.rows[0]) == 2 and sum(c[0].startswith('study_') and c[0].endswith(' · series 2') for c in p.captions[0]) == 1
    assert not any('AX LUNG' in c[0] or '777' in c[0] or 'cine' in c[0] for c in p.captions[0]), p.captions
