"""The header scanner (`tags.scan_header`) against pydicom on every real file we have: pydicom's and pydicom-data's
sample files, nibabel's, and ../shared/data (skipped when absent). Through the scanner, `header_record` must give the
record it gives through pydicom's parse; a fuzz corpus of cut and flipped real files must never make the scanner
raise anything but `ScanMiss`, nor return a record pydicom would not give."""
import gzip, random, sys, warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import nibabel as nib
import pytest
from pydicom import dcmread

from dicom_prep.read import read_dicom
from dicom_prep.series import HEADER_KEYWORDS, header_record, read_headers
from dicom_prep.sources import Found, sample_files
from dicom_prep.synth import synth_dicom
from dicom_prep.vendor import PRIVATE_GROUPS, PRIVATE_READS
from dicom_prep.tags import ScanMiss, keyword_tag, scan_header, values_unvalidated

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'
NIB_DATA = Path(nib.__file__).parent/'nicom'/'tests'/'data'
EXPLICIT_LE = '1.2.840.10008.1.2.1'
ALLOWED_MISSES = ('undefined length element', 'no explicit VR element', 'no DICM prefix', 'no standard element kept')   # fallbacks by design


def kept(tag) -> bool:
    "The scanner's choice in `read_header`: `HEADER_KEYWORDS` and the private groups vendor reads."
    return tag in {keyword_tag(k) for k in HEADER_KEYWORDS} or tag >> 16 in PRIVATE_GROUPS


@pytest.fixture(scope='module')
def corpora(tmp_path_factory) -> dict:
    "{name: files} of every real file at hand (nibabel's gzipped ones unpacked)."
    tmp = tmp_path_factory.mktemp('nib')
    def unpacked(p):
        if p.suffix != '.gz': return p
        (q := tmp/p.stem).write_bytes(gzip.decompress(p.read_bytes())); return q
    out = {'samples': sample_files('*'), 'nibabel': [unpacked(p) for p in sorted(NIB_DATA.iterdir()) if p.is_file()]}
    if SHARED.is_dir(): out['shared'] = sorted(p for p in SHARED.rglob('*') if p.is_file())
    return out


def record(read, path):
    "The header record `header_record` gives of `read(path)` as a dict, or the exception's type and words (pydicom's parse may fail)."
    try:
        with warnings.catch_warnings(), values_unvalidated():
            warnings.simplefilter('ignore')
            return asdict(header_record(read(path), path=str(path)))
    except ScanMiss: raise
    except Exception as e: return f"{type(e).__name__}: {e}"


def pydicom_record(path): return record(lambda p: read_dicom(p, headers_only=True), path)


def test_scanned_records_equal_pydicom(corpora):
    "Field by field, on every real file the scanner takes; explicit VR LE files take it unless they hold what it leaves to pydicom."
    for name, files in corpora.items():
        fast, explicit = 0, 0
        for path in files:
            want = pydicom_record(path)
            if isinstance(want, str): continue                              # pydicom cannot read it: nothing to compare
            is_explicit = want['ts'] == EXPLICIT_LE
            try: got = record(lambda p: scan_header(p, kept), path)
            except ScanMiss as e:
                assert not is_explicit or str(e).startswith(ALLOWED_MISSES), f"{path}: explicit VR LE, yet the scanner fell back: {e}"
                explicit += is_explicit; continue
            fast, explicit = fast + 1, explicit + is_explicit
            assert isinstance(got, dict), f"{path}: pydicom's parse gives a record, the scanner's: {got}"
            for field in want:
                assert got[field] == want[field], f"{path}: {field} is {got[field]!r} scanned, {want[field]!r} by pydicom"
        print(f"{name}: {fast} of {len(files)} files by the scanner ({explicit} explicit VR little endian)")
        assert fast > 0, f"{name}: no file took the scanner"


@pytest.mark.skipif(not (SHARED/'dcm_qa_nih'/'In').is_dir(), reason='dcm_qa_nih not found under ../shared/data')
def test_every_qa_file_is_scanned():
    "All 608 GE and Siemens files of dcm_qa_nih are explicit VR LE with nothing the scanner leaves to pydicom."
    files = [p for p in sorted((SHARED/'dcm_qa_nih'/'In').rglob('*')) if p.is_file() and p.suffix != '.txt']
    assert len(files) == 608 and all(scan_header(p, kept) is not None for p in files)


class Recording(dict):
    "A dataset's elements, noting every tag looked up."
    def __init__(self, *a):
        super().__init__(*a); self.asked = set()
    def get(self, tag, default=None): self.asked.add(tag); return super().get(tag, default)
    def __contains__(self, tag): self.asked.add(tag); return super().__contains__(tag)
    def __getitem__(self, tag): self.asked.add(tag); return super().__getitem__(tag)


def test_kept_tags_cover_what_header_record_reads(corpora):
    "Every top-level tag `header_record` (and what it calls) looks up, on every real file, is one the scanner keeps."
    missing, files = {}, 0
    for path in (p for fs in corpora.values() for p in fs):
        try: ds = read_dicom(path, headers_only=True)
        except Exception: continue
        ds._dict = Recording(ds._dict)
        if isinstance(record(lambda p, ds=ds: ds, path), dict): files += 1
        for tag in ds._dict.asked:
            if not kept(int(tag)): missing.setdefault(f"{int(tag):08X}", path)
    assert files > 500 and not missing, f"looked up but not kept by the scanner: {missing}"


def test_read_headers_falls_back(tmp_path):
    "A file the scanner leaves to pydicom (implicit VR) and one no one can read both give pydicom's answer."
    implicit = next(p for p in sample_files('*.dcm') if isinstance(r := pydicom_record(p), dict) and r['ts'] == '1.2.840.10008.1.2')
    with pytest.raises(ScanMiss, match='transfer syntax'): scan_header(implicit, kept)
    assert asdict(read_headers(Found(implicit, 's', 0, 0))) == {**pydicom_record(implicit), 'study_id': 's', 'size': 0, 'mtime_ns': 0}
    (junk := tmp_path/'junk.dcm').write_bytes(b'not dicom' * 40)
    assert read_headers(Found(junk, 's', 0, 0)).error.startswith('empty dataset')
    with pytest.raises(Exception) as gone: read_dicom(tmp_path/'gone.dcm', headers_only=True)
    assert read_headers(Found(tmp_path/'gone.dcm', 's', 0, 0)).error == gone.value.reason        # the scanner's OSError: pydicom's words


def mutants(b:bytes, rng:random.Random, n:int):
    "`n` damaged copies of file bytes `b`, damaged in its header: cut short, a bit flipped, or a 32-bit word (a length, a VR) overwritten."
    pixels = b.rfind(b'\xe0\x7f\x10\x00')                               # the PixelData tag: where the header ends
    for _ in range(n):
        m, at = bytearray(b), rng.randrange(128, pixels + 12 if pixels > 128 else len(b))
        kind = rng.choice(('cut', 'flip', 'word'))
        if kind == 'cut': yield bytes(m[:at]); continue
        if kind == 'flip': m[at] ^= 1 << rng.randrange(8)
        else: m[at:at + 4] = rng.choice((0, 0xFFFFFFFF, 0xFFFF, rng.randrange(1 << 32))).to_bytes(4, 'little')
        yield bytes(m)


def test_fuzz_never_a_wrong_record(corpora, tmp_path):
    "Damaged explicit VR LE files: the scanner returns pydicom's record (or pydicom fails too), or says `ScanMiss`; never anything else."
    rng, seeds = random.Random(28), []
    for files in corpora.values():
        for p in files:
            try: scan_header(p, kept)
            except ScanMiss: continue
            if p.stat().st_size < 1 << 20: seeds.append(p)
    seeds = rng.sample(seeds, min(12, len(seeds)))
    scanned = missed = 0
    for k, seed in enumerate(seeds):
        for j, b in enumerate(mutants(seed.read_bytes(), rng, 30)):
            (path := tmp_path/f"m{k}_{j}.dcm").write_bytes(b)
            try: got = record(lambda p: scan_header(p, kept), path)
            except ScanMiss: missed += 1; continue
            scanned += 1
            want = pydicom_record(path)
            assert got == want or isinstance(want, str), f"{seed} mutant {j}: scanner and pydicom differ"
    print(f"{scanned + missed} mutants: {scanned} scanned, {missed} left to pydicom")
    assert scanned > 20 and missed > 20


@pytest.fixture
def vendor_reads(monkeypatch):
    "The tests above, run with the scanner as `read_header` calls it: of vendor's private groups only what vendor reads."
    monkeypatch.setattr(sys.modules[__name__], 'scan_header', partial(scan_header, private=PRIVATE_READS))


def test_vendor_reads_records_equal_pydicom(corpora, vendor_reads): test_scanned_records_equal_pydicom(corpora)
def test_vendor_reads_fuzz(corpora, tmp_path, vendor_reads): test_fuzz_never_a_wrong_record(corpora, tmp_path)


def test_private_filter(tmp_path):
    "Only the creators and the offsets asked for are kept; a block element whose creator has not come yet leaves the file to pydicom."
    ds = dcmread(synth_dicom(tmp_path/'plain.dcm', Manufacturer='GE MEDICAL SYSTEMS'))
    for name in ('OTHER', 'GEMS_PARM_01'): ds.private_block(0x0043, name, create=True).add_new(0x39, 'IS', '1')
    ds.private_block(0x0043, 'GEMS_PARM_01').add_new(0x40, 'IS', '2')
    ds.save_as(path := tmp_path/'ge.dcm')
    got = scan_header(path, lambda tag: tag >> 16 == 0x0008, {0x0043: {'GEMS_PARM_01': {0x39}}})
    assert sorted(f"{int(t):08X}" for t in got.keys() if t.group == 0x0043) == ['00430010', '00430011', '00431139']
    (orphan := tmp_path/'orphan.dcm').write_bytes(path.read_bytes().replace(b'\x43\x00\x39\x11', b'\x43\x00\x39\x12'))   # block 12: no creator
    with pytest.raises(ScanMiss, match='before its creator'): scan_header(orphan, lambda tag: True, {0x0043: {'GEMS_PARM_01': {0x39}}})
