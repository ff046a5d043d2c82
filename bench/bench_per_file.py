"""Per-file work of the preprocess worker against a plain loop: instructions (noise-free) and CPU time (interleaved).

    python bench/bench_per_file.py [--size 64] [--files 50,250] [--cpu-files 500] [--rounds 6]

Wall-clock ratios on a shared 2-core machine drift by tens of per cent from minute to minute (see bench_scale.py),
which hides changes of 10-20% in the work a worker does per file. This benchmark measures the two loops two ways:

- `plain loop`: read, decode, min-max, PNG (the loop issue 13 compares with, as in bench_scale.py);
- `process_dicom`: the worker's whole per-file job (checks, metadata row, windowing, atomic PNG write).

1. Instructions: each loop runs under valgrind's callgrind at two file counts, and the difference per file is reported,
   so start-up and imports cancel out. Counts are user-space instructions (the kernel's file-system work is not
   counted, nor are cache misses). Skipped when valgrind is absent (`apt-get install valgrind`).
2. CPU time: both loops run in one process, alternated over the same files for several rounds (a fresh output folder
   each), and the best round of each is reported: user + system time, so the kernel's file creation and the cache
   misses count too, while the drift of the machine hits both loops alike.

The ratio `process_dicom / plain loop` is the figure to watch: with 2 workers, 1.6x the loop's speed needs it near 1.0
once the driver's share is added.
"""
import argparse, re, shutil, subprocess, sys, tempfile
from pathlib import Path

from dicom_prep.synth import synth_clones

STEPS = r'''
import sys, time
from pathlib import Path
import numpy as np, pydicom
from PIL import Image
from dicom_prep.preprocess import process_dicom
def plain(p, d):
    a = pydicom.dcmread(p).pixel_array.astype(np.float32); lo, hi = a.min(), a.max()
    Image.fromarray(((a - lo) / max(hi - lo, 1) * 255).astype(np.uint8)).save(d/f'{p.parent.name}_{p.stem}.png')
def worker(p, d): process_dicom(p, 'study', d, stem=p.stem)
'''   # the two per-file jobs, shared by both measures (imports cancel out of callgrind's difference of two file counts)

LOOP = STEPS + r'''
mode, src, out, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
for p in sorted(src.rglob('*.dcm'))[:n]: (worker if mode == 'process_dicom' else plain)(p, out)
'''

INTERLEAVED = STEPS + r'''
src, out, n, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = sorted(src.rglob('*.dcm'))[:n]
best = {}
for r in range(-1, rounds):                                  # round -1 warms both up
    for name, fn in (('plain', plain), ('worker', worker)):
        d = out/f'{name}_{r + 1}'; d.mkdir(parents=True)
        t = time.process_time()
        for p in files: fn(p, d)
        if r >= 0: best[name] = min(best.get(name, 1e9), (time.process_time() - t) / len(files))
print(best['plain'], best['worker'])
'''

def cpu_per_file(src:Path, out:Path, n:int, rounds:int) -> tuple[float, float]:
    "(plain loop, process_dicom) CPU seconds per file: the best of `rounds` alternated rounds in one process."
    p = subprocess.run([sys.executable, '-c', INTERLEAVED, src, out, str(n), str(rounds)], capture_output=True, text=True)
    if p.returncode: sys.exit(f"interleaved loops failed:\n{p.stderr[-3000:]}")
    return tuple(map(float, p.stdout.split()))

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
    ap.add_argument('--files', default='50,250', help='the two file counts whose difference callgrind measures')
    ap.add_argument('--cpu-files', type=int, default=500, help='files per round of the CPU-time measure')
    ap.add_argument('--rounds', type=int, default=6, help='alternated rounds of the CPU-time measure')
    a = ap.parse_args()
    counts = tuple(int(x) for x in a.files.split(','))
    work = Path(tempfile.mkdtemp(prefix='bench_per_file_'))
    try:
        src = synth_clones(work/'src', max(*counts, a.cpu_files), studies=1, size=a.size, slices=100)
        if shutil.which('valgrind'):
            res = {mode: per_file(mode, src, work/'out', counts) for mode in ('plain loop', 'process_dicom')}
            for mode, v in res.items(): print(f"{mode:14s} {v / 1e6:6.2f} M instructions per {a.size}x{a.size} file")
            print(f"process_dicom / plain loop: {res['process_dicom'] / res['plain loop']:.2f}x in instructions")
        else: print('valgrind not found (apt-get install valgrind): instructions not counted')
        plain, worker = cpu_per_file(src, work/'cpu', a.cpu_files, a.rounds)
        print(f"CPU time per file, best of {a.rounds} alternated rounds: plain loop {plain * 1e3:.3f} ms, process_dicom {worker * 1e3:.3f} ms")
        print(f"process_dicom / plain loop: {worker / plain:.2f}x in CPU time")
    finally: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
