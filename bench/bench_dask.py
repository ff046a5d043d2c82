"""Benchmark: the same `preprocess` run on fastcore.parallel (2 workers) and on a Dask LocalCluster (2 worker processes).

Prints the throughput ratio Dask / fastcore (target >= 0.85), the scheduler overhead per file, the cluster start-up
time (reported, not counted per file), and the per-task cost of a no-op through `run_tasks` on each executor.

    python bench/bench_dask.py [--files 300] [--size 512] [--repeats 3] [--corpus DIR]
"""
import argparse, shutil, statistics, tempfile, time
from pathlib import Path


from dicom_prep.parallel import run_tasks
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_ct

def make_corpus(root:Path, n:int, size:int) -> Path:
    "`n` CT-like `size`² slices, 10 studies of a few series each."
    for i in range(n):
        synth_ct(root/f"study_{i % 10:02d}/series{i % 3}/IM{i:05d}.dcm", size, seed=i, patient=f"P{i % 10}")
    return root

def timed_run(src, out, scheduler=None) -> float:
    "Seconds for one fresh `preprocess` run into `out`."
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = preprocess(src, out, n_workers=2, scheduler=scheduler, quiet=True)
    dt = time.perf_counter() - t
    assert r.status == 'completed' and set(r.counts) == {'ok'}, r.counts
    return dt

def per_task_ms(n=2000, **kw) -> float:
    "Milliseconds per no-op task through `run_tasks`."
    t = time.perf_counter()
    assert sum(1 for _ in run_tasks(abs, range(n), workers=2, **kw)) == n
    return (time.perf_counter() - t) / n * 1e3

def _warm(): pass   # workers import the pipeline once, before anything is timed

def bench(src, n, repeats, work):
    from distributed import Client, LocalCluster
    fc = [timed_run(src, work/'fastcore') for _ in range(repeats)]
    t = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=':0') as cl, Client(cl) as client:
        client.run(_warm)
        startup = time.perf_counter() - t
        dk = [timed_run(src, work/'dask', cl.scheduler_address) for _ in range(repeats)]
        noop_dask = per_task_ms(scheduler=cl.scheduler_address)
    local = timed_run(src, work/'dask_local', 'local')
    noop_fc = per_task_ms()
    f, d = statistics.median(fc), statistics.median(dk)
    print(f"corpus: {n} files ({src}); {repeats} runs each, medians")
    print(f"fastcore.parallel, 2 workers : {f:6.2f} s  {n/f:6.1f} files/s   runs {', '.join(f'{x:.2f}' for x in fc)}")
    print(f"Dask LocalCluster, 2 workers : {d:6.2f} s  {n/d:6.1f} files/s   runs {', '.join(f'{x:.2f}' for x in dk)}")
    print(f"throughput ratio Dask/fastcore: {f/d:.2f}   (target >= 0.85)")
    print(f"scheduler overhead per file   : {(d - f)/n*1e3:+.1f} ms")
    print(f"LocalCluster start-up         : {startup:.2f} s (not counted above)")
    print(f"--scheduler local end to end  : {local:.2f} s (start-up included)")
    print(f"no-op task through run_tasks  : Dask {noop_dask:.2f} ms, fastcore {noop_fc:.2f} ms")

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=300)
    ap.add_argument('--size', type=int, default=512)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--corpus', type=Path, help='reuse (or create) the corpus here')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = a.corpus or Path(tmp)/'corpus'
        if not src.exists(): make_corpus(src, a.files, a.size)
        n = sum(1 for _ in src.rglob('*.dcm'))
        bench(src, n, a.repeats, Path(tmp))
