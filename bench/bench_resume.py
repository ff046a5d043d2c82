"""Benchmark for issue 3: an unchanged rerun costs <= 2% of the cold run; the driver's memory stays flat.

    python bench/bench_resume.py [--files 20000] [--small 5000] [--workers 2] [--work DIR] [--keep]

Builds corpora of tiny (16x16) DICOMs, then for each size runs `preprocess` cold (2 workers) in a fresh
driver process, and for the big one an unchanged rerun, twice: in a fresh driver process (time spent in
`preprocess`) and through the `dicom_prep_preprocess` console script (wall clock, interpreter start included).
Peak RSS is the driver's own (`RUSAGE_SELF` in the driver process; the pool workers are separate processes and
reported apart).
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from dicom_prep.synth import synth_clones as make_corpus

DRIVER = '''
import json, resource, sys, time
from dicom_prep.preprocess import preprocess
src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
r = preprocess(src, out, n_workers=workers, quiet=True)
secs = time.perf_counter() - t
ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps(dict(seconds=secs, status=r.status, counts=r.counts, n_images=r.n_images,
                      driver_maxrss_mib=ru_self.ru_maxrss / 1024, workers_maxrss_mib=ru_kids.ru_maxrss / 1024)))
'''

def drive(src, out, workers) -> dict:
    "Run `preprocess` in a fresh driver process; its timing, counts and peak RSS."
    t = time.perf_counter()
    p = subprocess.run([sys.executable, '-c', DRIVER, str(src), str(out), str(workers)], capture_output=True, text=True)
    if p.returncode: sys.exit(f"driver failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res['wall'] = time.perf_counter() - t
    return res

def cli(src, out, workers) -> float:
    "Wall-clock seconds of the console script on `src` (must succeed)."
    exe = shutil.which('dicom_prep_preprocess') or sys.exit('dicom_prep_preprocess not on PATH: pip install -e .')
    t = time.perf_counter()
    p = subprocess.run([exe, '--dicom-dir', str(src), '--output-dir', str(out), '--workers', str(workers)], capture_output=True, text=True)
    if p.returncode: sys.exit(f"CLI failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=20_000)
    ap.add_argument('--small', type=int, default=5_000)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--work', type=Path, default=None, help='work folder [default: a temporary one]')
    ap.add_argument('--keep', action='store_true', help='keep the work folder')
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix='bench_resume_'))
    if work.exists() and any(work.iterdir()): sys.exit(f"{work} is not empty")
    try:
        t = time.perf_counter()
        big, small = make_corpus(work/'src_big', a.files), make_corpus(work/'src_small', a.small)
        print(f"corpora: {a.files:,} + {a.small:,} files of 16x16 in {time.perf_counter() - t:.1f}s", flush=True)
        s_cold = drive(small, work/'out_small', a.workers)
        print(f"cold {a.small:,}: {s_cold}", flush=True)
        cold = drive(big, work/'out_big', a.workers)
        print(f"cold {a.files:,}: {cold}", flush=True)
        warm = drive(big, work/'out_big', a.workers)
        print(f"rerun {a.files:,}: {warm}", flush=True)
        odd = [f"cold run counts {cold['counts']} (expected ok {a.files:,})"] if cold['counts'] != {'ok': a.files} else []
        if set(warm['counts']) != {'unchanged'} or cold['status'] != 'completed': sys.exit(f"unexpected runs: {cold} {warm}")
        warm_cli = cli(big, work/'out_big', a.workers)
        ratio, ratio_wall = warm['seconds'] / cold['seconds'], warm['wall'] / cold['wall']
        bar = '=' * 72
        print('\n'.join([bar, f"bench_resume: {a.files:,} files, {a.workers} workers, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} (other processes skew the cold run)", bar,
            f"  cold run ({a.files:,} files):           {cold['seconds']:8.2f} s in preprocess, {cold['wall']:.2f} s wall "
            f"({a.files / cold['seconds']:,.0f} files/s)",
            f"  unchanged rerun:                  {warm['seconds']:8.2f} s in preprocess, {warm['wall']:.2f} s wall",
            f"  unchanged rerun via the CLI:      {warm_cli:8.2f} s wall (interpreter start and imports included)",
            f"  ratio rerun/cold:                 {ratio:8.4f}  (target <= 0.02: {'PASS' if ratio <= 0.02 else 'FAIL'})",
            f"  ratio rerun/cold, process wall:   {ratio_wall:8.4f}",
            f"  ratio rerun/cold, CLI wall:       {warm_cli / cold['wall']:8.4f}",
            f"  driver peak RSS, cold {a.small:>6,} files: {s_cold['driver_maxrss_mib']:7.1f} MiB",
            f"  driver peak RSS, cold {a.files:>6,} files: {cold['driver_maxrss_mib']:7.1f} MiB "
            f"(+{cold['driver_maxrss_mib'] - s_cold['driver_maxrss_mib']:.1f} MiB for {a.files - a.small:,} more files, "
            f"{1024 * (cold['driver_maxrss_mib'] - s_cold['driver_maxrss_mib']) / (a.files - a.small):.2f} KiB/file)",
            f"  driver peak RSS, rerun {a.files:,} files: {warm['driver_maxrss_mib']:7.1f} MiB",
            f"  largest worker peak RSS (cold {a.files:,}): {cold['workers_maxrss_mib']:.1f} MiB",
            *(f"  NOTE: {o}" for o in odd), bar]))
    finally:
        if not a.keep and not a.work: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
