"""Per-file CPU work of the preprocess worker against a plain loop, counted in instructions (noise-free).

    python bench/bench_per_file.py [--size 64] [--files 50,250]

Wall-clock ratios on a shared 2-core machine drift by tens of per cent from minute to minute (see bench_scale.py),
which hides changes of 10-20% in the work a worker does per file. This benchmark counts instead: it runs each loop
under valgrind's callgrind at two file counts and reports the difference per file, so start-up and imports cancel out.

- `plain loop`: read, decode, min-max, PNG (the loop issue 13 compares with, as in bench_scale.py);
- `process_dicom`: the worker's whole per-file job (checks, metadata row, windowing, atomic PNG write).

Counts are user-space instructions of the Python process (the kernel's file-system work is not counted). The ratio
`process_dicom / plain loop` is the figure to watch: with 2 workers, 1.6x the loop's speed needs it near 1.0 once the
driver's share is added. Needs valgrind (`apt-get install valgrind`).
"""
import argparse, re, shutil, subprocess, sys, tempfile
from pathlib import Path

from dicom_prep.synth import synth_clones

LOOP = r'''
import sys
from pathlib import Path
mode, src, out, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
files = sorted(src.rglob('*.dcm'))[:n]
if mode == 'process_dicom':
    from dicom_prep.preprocess import process_dicom
    for f in files: process_dicom(f, 'study', out, stem=f.stem)
else:
    import numpy as np, pydicom
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    for p in files:
        a = pydicom.dcmread(p).pixel_array.astype(np.float32); lo, hi = a.min(), a.max()
        Image.fromarray(((a - lo) / max(hi - lo, 1) * 255).astype(np.uint8)).save(out/f'{p.parent.name}_{p.stem}.png')
'''

def instructions(mode:str, src:Path, out:Path, n:int) -> int:
    "Instructions callgrind counts for `mode` over the first `n` files (a fresh output folder)."
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run(['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null', sys.executable, '-c', LOOP, mode, src, out, str(n)],
                       capture_output=True, text=True)
    if p.returncode or not (m := re.search(r'Collected : (\d+)', p.stderr)): sys.exit(f"{mode} under callgrind failed:\n{p.stderr[-3000:]}")
    return int(m.group(1))

def per_file(mode:str, src:Path, out:Path, counts:tuple) -> float:
    "Instructions per file: the difference between two file counts, so that start-up cancels out."
    lo, hi = (instructions(mode, src, out, n) for n in counts)
    return (hi - lo) / (counts[1] - counts[0])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=64, help='rows and columns of the files')
    ap.add_argument('--files', default='50,250', help='the two file counts whose difference is measured')
    a = ap.parse_args()
    if not shutil.which('valgrind'): sys.exit('valgrind not found: apt-get install valgrind')
    counts = tuple(int(x) for x in a.files.split(','))
    work = Path(tempfile.mkdtemp(prefix='bench_per_file_'))
    try:
        src = synth_clones(work/'src', max(counts), studies=1, size=a.size, slices=100)
        res = {mode: per_file(mode, src, work/'out', counts) for mode in ('plain loop', 'process_dicom')}
        for mode, v in res.items(): print(f"{mode:14s} {v / 1e6:6.2f} M instructions per {a.size}x{a.size} file")
        print(f"process_dicom / plain loop: {res['process_dicom'] / res['plain loop']:.2f}x")
    finally: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
