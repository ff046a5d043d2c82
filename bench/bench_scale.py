"""Scale envelope of dicom_prep on one machine: memory, cold and rerun times, DB size at 10k, 100k (and 1M) files.

    python bench/bench_scale.py [--sizes 10000,100000] [--million] [--size 64] [--workers 2] [--work DIR] [--keep]

For each size N it builds a corpus of N single-frame CT files (SIZE² pixels, series of 100 axial slices, N/1000 study
folders) with `synth_clones`, then measures, each in a fresh process:

- `preprocess` cold: wall time, the driver's peak RSS (RUSAGE_SELF), and the process tree's PSS sampled every 0.1 s
  (driver + workers, from /proc/*/smaps_rollup) with the largest private memory of one worker;
- the console script's unchanged rerun, and its rerun after one file is added (start-up included);
- `dicom_to_nifti` cold (the driver's peak RSS), its unchanged rerun and its rerun after one file is touched;
- the database's size.

Then, on the 10k corpus, the per-file overhead: a plain single-process loop (read, decode, min-max, PNG; the
interpreter's start-up counted) against the console script with the given workers, alternated three times (best of
each: the machine's speed drifts by tens of per cent from minute to minute). The console script is the one beside
this interpreter, as a virtualenv runs it, and dicom_prep is byte-compiled first, as an installed package is.

`--million` adds a 1,000,000-file corpus of 16² files (preprocess only: cold and unchanged rerun).

Bars of issue 13 are checked at the end (exit status 1 if one fails); ratios are measured within this run, because
the machine is shared and noisy:
- preprocess driver peak at 100k ≤ 120 MiB and ≤ 15 MiB above the 10k run's;
- tree PSS ≤ 2 × workers × one worker's private memory + the driver's;
- NIfTI driver peak at 100k ≤ 250 MiB; touching one file costs ≤ 3× an unchanged NIfTI rerun;
- a rerun after adding one file costs ≤ 1.5× an unchanged rerun;
- workers run ≥ 1.6× faster than the plain loop on 10k 64² files;
- (1M) the unchanged rerun takes ≤ 2% of the cold run.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from dicom_prep.synth import synth_clones

DRIVER = r'''
import json, os, resource, sys, threading, time
from pathlib import Path
kind, src, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def smaps(pid):
    "(Pss, private) bytes of process `pid`, or None."
    try: text = open(f'/proc/{pid}/smaps_rollup').read()
    except OSError: return None
    f = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in text.splitlines()[1:] if l.split()[-1] == 'kB'}
    return f['Pss'], f['Private_Clean'] + f['Private_Dirty']

def children(pid):
    "Pids of the descendants of `pid`."
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try: kids = [int(k) for t in os.listdir(f'/proc/{p}/task') for k in open(f'/proc/{p}/task/{t}/children').read().split()]
        except OSError: kids = []
        out += kids; todo += kids
    return out

peak = dict(tree_pss=0, worker_private=0, driver_pss=0)
def sample(stop):
    while not stop.is_set():
        me, kids = smaps(os.getpid()), [s for s in map(smaps, children(os.getpid())) if s]
        if me:
            peak['tree_pss'] = max(peak['tree_pss'], me[0] + sum(k[0] for k in kids))
            peak['driver_pss'] = max(peak['driver_pss'], me[0])
            peak['worker_private'] = max([peak['worker_private'], *(k[1] for k in kids)])
        time.sleep(0.1)
stop = threading.Event(); threading.Thread(target=sample, args=(stop,), daemon=True).start()
t = time.perf_counter()
if kind == 'preprocess':
    from dicom_prep.preprocess import preprocess
    r = preprocess(src, out, n_workers=workers, quiet=True); counts = r.counts
else:
    from dicom_prep.nifti import dicom_to_nifti
    r = dicom_to_nifti(src, out, n_workers=workers, quiet=True); counts = r.verdicts
secs = time.perf_counter() - t
stop.set()
print(json.dumps(dict(seconds=secs, status=r.status, counts=counts, summary=r.summary(),
                      driver_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **{k: v / 2**20 for k, v in peak.items()})))
'''

NAIVE = r'''
import sys, time, numpy as np, pydicom
from pathlib import Path
from PIL import Image
src, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for p in sorted(src.rglob('*.dcm')):
    a = pydicom.dcmread(p).pixel_array.astype(np.float32); lo, hi = a.min(), a.max()
    Image.fromarray(((a - lo) / max(hi - lo, 1) * 255).astype(np.uint8)).save(out/f'{p.parent.name}_{p.stem}.png')
'''

def drive(kind, src, out, workers) -> dict:
    "Run a pipeline in a fresh driver process; its timing, counts and memory."
    t = time.perf_counter()
    p = subprocess.run([sys.executable, '-c', DRIVER, kind, str(src), str(out), str(workers)], capture_output=True, text=True)
    if p.returncode: sys.exit(f"{kind} driver failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res['wall'] = time.perf_counter() - t
    return res

def wall(*cmd) -> float:
    "Wall-clock seconds of a command (must succeed)."
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode: sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t

def script(name) -> str:
    "Console script `name` beside this interpreter (as a virtualenv runs it, with no launcher shim in between), else on PATH."
    beside = Path(sys.executable).parent/name
    return str(beside) if beside.is_file() else shutil.which(name) or sys.exit(f'{name} not on PATH: pip install -e .')

def add_one(src, size) -> Path:
    "Add one more file to the corpus (a clone written beside the others)."
    extra = synth_clones(src.parent/'extra', 1, studies=1, size=size)
    dest = src/'study_000'/'added.dcm'; shutil.move(next(extra.rglob('*.dcm')), dest); shutil.rmtree(extra)
    return dest

def corpus(work, n, size) -> Path:
    "The corpus of `n` files (built once)."
    src = work/f'src_{n}'
    if not src.exists(): synth_clones(src, n, studies=max(n // 1000, 1), size=size, slices=100)
    return src

def measure(work, n, size, workers, nifti=True) -> dict:
    "Every figure of one corpus size."
    t = time.perf_counter(); src = corpus(work, n, size)
    m = dict(files=n, size=size, build=time.perf_counter() - t)
    pre = script('dicom_prep_preprocess'); out = work/f'out_{n}'
    cold = drive('preprocess', src, out, workers)
    m.update(cold=cold['seconds'], cold_wall=cold['wall'], driver_mib=cold['driver_maxrss_mib'], tree_pss_mib=cold['tree_pss'],
             worker_private_mib=cold['worker_private'], driver_pss_mib=cold['driver_pss'], summary=cold['summary'])
    args = ['--dicom-dir', src, '--output-dir', out, '--workers', workers]
    m['rerun'] = min(wall(pre, *args) for _ in range(2))
    added = add_one(src, size)
    m['rerun_added'] = wall(pre, *args); m['rerun_after'] = wall(pre, *args)     # the second: unchanged again, for the ratio
    m['db_mib'] = (out/'dicom_prep.db').stat().st_size / 2**20
    added.unlink()
    if nifti:
        nout = work/f'nifti_{n}'
        nc = drive('nifti', src, nout, workers)
        m.update(nifti_cold=nc['seconds'], nifti_driver_mib=nc['driver_maxrss_mib'])
        nargs = [script('dicom_prep_nifti'), '--dicom-dir', src, '--output-dir', nout, '--workers', workers]
        m['nifti_rerun'] = min(wall(*nargs) for _ in range(2))
        os.utime(next((src/'study_000').glob('*.dcm')))
        m['nifti_touched'] = wall(*nargs)
    return m

def overhead(work, src, workers, rounds:int=3) -> dict:
    """The plain single-process loop against the console script on the same files, from cold processes, alternated (best of `rounds`).

    Each run writes a folder of its own, and all are deleted after the last round. Deleting the previous round's output
    just before a run would slow its file creation: ext4 without a journal (as on this machine) skips inodes freed in the
    last 30 s, scanning past each one, and two workers creating files in one folder then spin on its lock."""
    naive, cli, outs = [], [], [work/f'{kind}_out_{r}' for r in range(rounds) for kind in ('naive', 'overhead')]
    for d in outs: shutil.rmtree(d, ignore_errors=True)      # a killed earlier bench's (with --work)
    for r in range(rounds):
        quiet_disk(); naive.append(wall(sys.executable, '-c', NAIVE, src, work/f'naive_out_{r}'))
        quiet_disk(); cli.append(wall(script('dicom_prep_preprocess'), '--dicom-dir', src, '--output-dir', work/f'overhead_out_{r}', '--workers', workers))
    for d in outs: shutil.rmtree(d)
    return dict(naive=min(naive), cli=min(cli), speedup=min(naive) / min(cli), rounds=list(zip(naive, cli)))

def byte_compile():
    """Compile dicom_prep to bytecode, as pip does when it installs a package. An editable install run under
    PYTHONDONTWRITEBYTECODE (as on this machine) would otherwise compile its modules at every start-up (about 0.2 s),
    while the plain loop's numpy, pydicom and Pillow come compiled."""
    import compileall, dicom_prep
    if not compileall.compile_dir(Path(dicom_prep.__file__).parent, quiet=1): sys.exit('could not byte-compile dicom_prep')

def quiet_disk():
    "Let the kernel write back what earlier steps left dirty, so that no timed run pays for another's writes."
    os.sync(); time.sleep(1)

def bars(res, ov, workers) -> list:
    "(bar, measured, passed) of each bar of issue 13 that this run measured."
    out, by = [], {m['files']: m for m in res}
    if 100_000 in by and 10_000 in by:
        d, s = by[100_000], by[10_000]
        out += [('preprocess driver peak at 100k <= 120 MiB', f"{d['driver_mib']:.0f} MiB", d['driver_mib'] <= 120),
                ('... and <= 15 MiB above 10k', f"+{d['driver_mib'] - s['driver_mib']:.1f} MiB", d['driver_mib'] - s['driver_mib'] <= 15)]
        if 'nifti_driver_mib' in d: out.append(('nifti driver peak at 100k <= 250 MiB', f"{d['nifti_driver_mib']:.0f} MiB", d['nifti_driver_mib'] <= 250))
    for m in res:
        lim = 2 * workers * m['worker_private_mib'] + m['driver_pss_mib']
        out.append((f"{m['files']:,}: tree PSS <= 2 x workers x worker private + driver", f"{m['tree_pss_mib']:.0f} <= {lim:.0f} MiB", m['tree_pss_mib'] <= lim))
        out.append((f"{m['files']:,}: rerun after adding one file <= 1.5 x unchanged", f"{m['rerun_added'] / m['rerun_after']:.2f}x",
                    m['rerun_added'] <= 1.5 * m['rerun_after']))
        if 'nifti_touched' in m:
            out.append((f"{m['files']:,}: nifti, one file touched <= 3 x unchanged", f"{m['nifti_touched'] / m['nifti_rerun']:.2f}x",
                        m['nifti_touched'] <= 3 * m['nifti_rerun']))
        if m['files'] >= 1_000_000:
            out.append(('1M: unchanged rerun <= 2% of cold', f"{100 * m['rerun'] / m['cold_wall']:.2f}%", m['rerun'] <= 0.02 * m['cold_wall']))
    if ov: out.append((f"{workers} workers >= 1.6 x a plain loop on 10k 64x64 files", f"{ov['speedup']:.2f}x", ov['speedup'] >= 1.6))
    return out

def report(res, ov, workers):
    "Print the envelope table, the overhead ratio and the bars."
    print(f"\n{'files':>10} {'px':>4} {'cold s':>8} {'rerun s':>8} {'+1 file s':>9} {'driver MiB':>10} {'tree PSS':>9} "
          f"{'worker priv':>11} {'DB MiB':>7} {'nifti cold':>10} {'nifti MiB':>9} {'nifti rerun':>11} {'touch 1':>8}")
    for m in res:
        nf = (f"{m['nifti_cold']:>10.1f} {m['nifti_driver_mib']:>9.0f} {m['nifti_rerun']:>11.2f} {m['nifti_touched']:>8.2f}"
              if 'nifti_cold' in m else f"{'-':>10} {'-':>9} {'-':>11} {'-':>8}")
        print(f"{m['files']:>10,} {m['size']:>4} {m['cold_wall']:>8.1f} {m['rerun']:>8.2f} {m['rerun_added']:>9.2f} {m['driver_mib']:>10.0f} "
              f"{m['tree_pss_mib']:>9.0f} {m['worker_private_mib']:>11.0f} {m['db_mib']:>7.1f} {nf}")
    if ov: print(f"\nper-file overhead on 10k files, best of {len(ov['rounds'])} alternated rounds: plain loop {ov['naive']:.1f}s, console script "
                 f"({workers} workers) {ov['cli']:.1f}s: {ov['speedup']:.2f}x the loop's speed (rounds: "
                 + ', '.join(f"{a:.1f}/{b:.1f}s" for a, b in ov['rounds']) + ")")
    print(f"\nSUMMARY of the largest cold run:\n{res[-1]['summary']}\n")
    failed = 0
    for bar, got, ok in bars(res, ov, workers):
        print(f"{'PASS' if ok else 'FAIL'}  {bar}: {got}"); failed += not ok
    return failed

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='10000,100000', help='corpus sizes, comma-separated')
    ap.add_argument('--million', action='store_true', help='also a 1,000,000-file run of 16x16 files (preprocess only)')
    ap.add_argument('--size', type=int, default=64, help='rows and columns of the files')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--work', type=Path, default=None, help='work folder [default: a temporary one]')
    ap.add_argument('--keep', action='store_true', help='keep the work folder')
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix='bench_scale_')); work.mkdir(parents=True, exist_ok=True)
    byte_compile()
    try:
        res, sizes = [], [int(x) for x in a.sizes.split(',') if x]
        ov = overhead(work, corpus(work, 10_000, 64), a.workers) if 10_000 in sizes and a.size == 64 else None    # first: an idle disk
        for n in sizes:
            res.append(measure(work, n, a.size, a.workers)); print(json.dumps({k: v for k, v in res[-1].items() if k != 'summary'}), flush=True)
        if a.million:
            res.append(measure(work, 1_000_000, 16, a.workers, nifti=False)); print(json.dumps({k: v for k, v in res[-1].items() if k != 'summary'}), flush=True)
        sys.exit(1 if report(res, ov, a.workers) else 0)
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
