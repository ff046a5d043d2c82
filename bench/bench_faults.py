"""What the fault guards cost: cold `preprocess` runs with every guard on vs off, in the same run.

The guards: the deflate check in `read_dicom` (a walk of the file meta group per file, `file_meta_bytes`; a whole
read without pixel data is also checked for being cut short), the codestream checks in `check_size` and
`decode_frame` (compressed files only), the umask mode set on every output (`atomic_path`), the parent-death signal
and the memory cap (`default_worker_memory`) of each pool worker. "Off" runs the same code with those monkeypatched
away in the driver (the workers fork from it, so they inherit the patches); "on" runs it as shipped, plus the memory
cap that `--worker-memory` will pass. Runs alternate on/off so that drift on a shared machine hits both alike; the
medians and their ratio are printed, then the per-file cost of each guard measured on its own.

    python bench/bench_faults.py [--files 3000] [--jpeg 300] [--size 64] [--repeats 3] [--drop-caches]
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path

RUNNER = r'''
import os, sys, tempfile
from contextlib import contextmanager
from functools import partial
import pydicom
import dicom_prep.core, dicom_prep.guards, dicom_prep.parallel, dicom_prep.pixels, dicom_prep.read, dicom_prep.run
mode = sys.argv.pop(1)
if mode == 'on':
    memory = dicom_prep.parallel.default_worker_memory(2)
    dicom_prep.run.run_tasks = partial(dicom_prep.parallel.run_tasks, memory=memory)
else:
    @contextmanager
    def atomic_path(dest):                                       # the old one: mkstemp's 0600, no chmod
        dest = dicom_prep.core.Path(dest); dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name[:40]}.', suffix=''.join(dest.suffixes[-2:]) or '.tmp')
        os.close(fd)
        try: yield dicom_prep.core.Path(tmp); os.replace(tmp, dest)
        except BaseException: dicom_prep.core.Path(tmp).unlink(missing_ok=True); raise
    dicom_prep.pixels.atomic_path = atomic_path
    dicom_prep.read._dcmread = lambda path, headers_only, max_pixels: pydicom.dcmread(path, stop_before_pixels=headers_only, force=True)
    dicom_prep.guards._encapsulated = lambda ds: False               # check_size: the header's product only
    dicom_prep.pixels.check_frame = lambda ds, index=0, max_pixels=0: None
    dicom_prep.parallel.die_with_parent = lambda parent, pdeathsig=True: None
from dicom_prep.preprocess import main
main()
'''

def build(root:Path, n:int, n_jpeg:int, size:int) -> int:
    "`n` native files of size² (synth_clones) and `n_jpeg` baseline-JPEG colour files; returns the file count."
    from pydicom import dcmread
    from dicom_prep.sources import sample_file
    from pydicom.uid import generate_uid
    from dicom_prep.synth import synth_clones
    synth_clones(root/'native', n, size=size)
    jpeg = dcmread(sample_file('SC_rgb_jpeg_dcmtk.dcm'))
    for i in range(n_jpeg):
        jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        (root/'jpeg'/f'study_{i % 10}').mkdir(parents=True, exist_ok=True)
        jpeg.save_as(root/'jpeg'/f'study_{i % 10}'/f'j{i:05d}.dcm')
    return n + n_jpeg

def cold_run(runner:Path, src:Path, mode:str, drop:bool) -> float:
    "Seconds for one cold preprocess run (fresh output folder) with the guards `mode` ('on'/'off')."
    out = Path(tempfile.mkdtemp())
    if drop: subprocess.run(['sh', '-c', 'sync; echo 3 > /proc/sys/vm/drop_caches'], check=False)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(runner), mode, '--dicom-dir', str(src), '--output-dir', str(out), '--workers', '2'],
                   check=True, capture_output=True)
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt

def per_call(fn, n:int=2000) -> float:
    "Microseconds per call of `fn()` (best of three rounds)."
    best = float('inf')
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6

def guard_costs(src:Path):
    "Print the per-file cost of each guard, measured on its own, next to what it guards."
    import pydicom
    from dicom_prep.sources import sample_file
    import dicom_prep.guards as guards, dicom_prep.read as read
    from dicom_prep.core import atomic_path
    from dicom_prep.parallel import die_with_parent
    native = next(p for p in (src/'native').rglob('*') if p.is_file())
    ds, jpeg = pydicom.dcmread(native), pydicom.dcmread(sample_file('SC_rgb_jpeg_dcmtk.dcm'))
    rows = [('read (with the deflate check)', lambda: read._dcmread(native, False, guards.MAX_PIXELS)),
            ('read (pydicom.dcmread alone)', lambda: pydicom.dcmread(native, force=True)),
            ('check_size, native file', lambda: guards.check_size(ds)),
            ('check_size, JPEG (codestream too)', lambda: guards.check_size(jpeg))]
    for name, fn in rows: print(f"  {name:36s} {per_call(fn, 500):8.1f} µs")
    real, guards._encapsulated = guards._encapsulated, lambda ds: False
    print(f"  {'check_size, JPEG (header only)':36s} {per_call(lambda: guards.check_size(jpeg), 500):8.1f} µs")
    guards._encapsulated = real
    d = Path(tempfile.mkdtemp())
    def write():
        with atomic_path(d/'x.png') as p: p.write_bytes(b'x')
    print(f"  {'atomic_path write (with its chmod)':36s} {per_call(write, 500):8.1f} µs")
    print(f"  {'   of which the chmod':36s} {per_call(lambda: os.chmod(d/'x.png', 0o644), 500):8.1f} µs")
    print(f"  {'die_with_parent (once per worker)':36s} {per_call(lambda: die_with_parent(os.getppid()), 200):8.1f} µs")
    shutil.rmtree(d)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=3000); ap.add_argument('--jpeg', type=int, default=300)
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--drop-caches', action='store_true', help='drop the page cache before each run (root)')
    a = ap.parse_args()
    warnings.simplefilter('ignore')
    tmp = Path(tempfile.mkdtemp())
    n = build(tmp/'corpus', a.files, a.jpeg, a.size)
    runner = tmp/'runner.py'; runner.write_text(RUNNER)
    print(f"corpus: {a.files} native {a.size}² + {a.jpeg} JPEG files; 2 workers; {os.cpu_count()} CPUs; "
          f"{a.repeats} cold runs each way, alternating{' (page cache dropped before each)' if a.drop_caches else ''}")
    times = {'on': [], 'off': []}
    cold_run(runner, tmp/'corpus', 'on', a.drop_caches)             # warm the interpreter's own files once
    for i in range(a.repeats):
        for mode in (('on', 'off') if i % 2 == 0 else ('off', 'on')): times[mode].append(cold_run(runner, tmp/'corpus', mode, a.drop_caches))
    on, off = statistics.median(times['on']), statistics.median(times['off'])
    for mode, ts in times.items(): print(f"  guards {mode:3s}: median {statistics.median(ts):6.2f}s  ({', '.join(f'{t:.2f}' for t in ts)})  {n / statistics.median(ts):6.0f} files/s")
    print(f"  on / off: {on / off:.3f}  ({100 * (on / off - 1):+.1f}%; target <= +3%)   {1e6 * (on - off) / n:+.0f} µs per file")
    print("per-file cost of each guard, on its own:")
    guard_costs(tmp/'corpus')
    shutil.rmtree(tmp)

if __name__ == '__main__': main()
