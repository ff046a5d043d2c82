"""Benchmark for issue 25: the fixed cost every run pays, against `python -c 'import pydicom'` measured in the same run.

    python bench/bench_startup.py [--files 600] [--rounds 7] [--work DIR]

Targets: `dicom_prep_preprocess --help` <= 1.3x `import pydicom` (`dicom_prep_nifti --help` is shown beside it); an unchanged rerun on 600 files <= 0.35 s wall
(the issue's machine, where `import pydicom` took 0.28 s: so also <= 1.25x `import pydicom` on a slower one).
Each figure is the best of `--rounds` wall-clock runs of a fresh process, the commands taking turns, with bytecode
caching on as in an installed package (this machine sets PYTHONDONTWRITEBYTECODE, which would recompile every module
of ours at each start); the heavy optional modules a run imports are listed so a regression names its cause.
"""
import argparse, os, shutil, subprocess, sys, sysconfig, tempfile, time
from pathlib import Path

from dicom_prep.synth import synth_clones

ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}   # as installed: modules load from bytecode, not source
HEAVY = ('pandas', 'dask', 'distributed', 'nibabel', 'scipy', 'filelock', 'openpyxl', 'pyarrow', 'requests', 'fasthtml', 'charset_normalizer')

def seconds(cmd:list) -> float:
    "Wall-clock seconds of one run of `cmd` (it must succeed)."
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if p.returncode: sys.exit(f"{cmd[:3]} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return time.perf_counter() - t

def best(cmds:list, rounds:int) -> list[float]:
    "Best wall-clock seconds of each of `cmds` over `rounds` rounds, the commands taking turns (so drift hits all alike)."
    times = [[seconds(c) for c in cmds] for _ in range(rounds)]
    return [min(col) for col in zip(*times)]

def script_path(name:str) -> str:
    "The console script `name` of this interpreter's environment (not a shim on PATH, such as pyenv's, which adds its own start-up)."
    p = Path(sysconfig.get_path('scripts'))/name
    return str(p) if p.exists() else shutil.which(name) or sys.exit(f'{name} not installed: pip install -e .')

def heavy_imports(script:str, args:list) -> list:
    "The heavy optional modules that running console script `script` with `args` imports."
    exe = script_path(script)
    code = (f"import sys, atexit; atexit.register(lambda: print('\\nMODULES', *sorted(m for m in {HEAVY!r} if m in sys.modules)));"
            f"sys.argv = [{script!r}] + {args!r}; exec(open({exe!r}).read())")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if l.startswith('MODULES')][-1].split()[1:]

def verdict(ratio:float, bar:float) -> str: return 'PASS' if ratio <= bar else 'FAIL'

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=600)
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--work', type=Path, default=None, help='work folder [default: a temporary one]')
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix='bench_startup_'))
    exe, nifti = script_path('dicom_prep_preprocess'), script_path('dicom_prep_nifti')
    try:
        src, out = synth_clones(work/'src', a.files), work/'out'
        run = [exe, '--dicom-dir', str(src), '--output-dir', str(out)]
        seconds(run)
        base, help_s, rerun_s, nifti_s = best([[sys.executable, '-c', 'import pydicom'], [exe, '--help'], run, [nifti, '--help']], a.rounds)
        print(f"import pydicom: {base:.3f} s (baseline, best of {a.rounds})")
        print(f"preprocess --help: {help_s:.3f} s = {help_s/base:.2f}x  (bar 1.3x: {verdict(help_s/base, 1.3)});"
              f" heavy modules: {heavy_imports('dicom_prep_preprocess', ['--help']) or 'none'}")
        print(f"unchanged rerun, {a.files} files: {rerun_s:.3f} s = {rerun_s/base:.2f}x  (bar 0.35 s on the issue's machine,"
              f" 1.25x here: {verdict(rerun_s/base, 1.25)}); heavy modules: {heavy_imports('dicom_prep_preprocess', run[1:]) or 'none'}")
        print(f"nifti --help: {nifti_s:.3f} s = {nifti_s/base:.2f}x; heavy modules: {heavy_imports('dicom_prep_nifti', ['--help']) or 'none'}")
    finally:
        if not a.work: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
