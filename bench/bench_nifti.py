"""Benchmark `dicom_prep_nifti` (analysis + conversion) against dcm2niix and dicom2nifti on the same corpus, in the same run.

The corpus is synthesised once under bench/_work/nifti_corpus (≥ 2,000 slices in ≥ 20 series: axial, oblique and
sagittal CT-like stacks with smooth anatomy-like content and noise, so gzip behaves as on real data). Each tool
converts it from a cold start into a fresh output folder; the page cache is warm for all of them (the corpus was
just written or read). The tools run in turn, `--repeat` rounds (dicom2nifti, far slower, only in the first one);
reported per tool: the best wall time, slices/s and the CPU seconds it used (this process plus its children —
steadier than wall time on a shared machine), then the ratios the issue sets targets for (dicom_prep ≤ 2× dcm2niix;
dicom2nifti ≥ 2× dicom_prep) and the cost of a no-op rerun (everything up to date).

Usage: python bench/bench_nifti.py [--series 24] [--slices 100] [--size 256] [--repeat 2] [--skip-dicom2nifti]
"""
import argparse, json, os, platform, resource, shutil, subprocess, time
from pathlib import Path


from dicom_prep.nifti import dicom_to_nifti
from dicom_prep.synth import ct_phantom, oblique_orientation, synth_series

WORK = Path(__file__).resolve().parent/'_work'



def make_corpus(dest, n_series, n_slices, size) -> int:
    "Write the corpus (once); returns the number of slices."
    marker = dest/'corpus.json'
    spec = dict(series=n_series, slices=n_slices, size=size)
    if marker.exists() and json.loads(marker.read_text()) == spec: return n_series * n_slices
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    orientations = [(1, 0, 0, 0, 1, 0), oblique_orientation(0.25, 0.15), (0, 1, 0, 0, 0, -1)]
    for s in range(n_series):
        synth_series(dest/f'patient{s // 3:02d}'/f'series{s:02d}', n=n_slices, rows=size, cols=size, iop=orientations[s % 3],
                     step=1.25, spacing=(0.7, 0.7), series_number=s + 1, description=f'series {s}', slope=1, intercept=-1024,
                     seed=s, pixels=lambda k, s=s: ct_phantom(size, s, k) + 1024, PatientID=f'P{s // 3:02d}')
    marker.write_text(json.dumps(spec))
    print(f"corpus: {n_series * n_slices:,} slices in {n_series} series written in {time.perf_counter() - t0:.1f}s")
    return n_series * n_slices


def cpu_seconds() -> float:
    "User + system CPU seconds of this process and its finished children so far."
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def timed(fn) -> tuple[float, float]:
    "(wall seconds, CPU seconds) of `fn()`."
    t0, c0 = time.perf_counter(), cpu_seconds(); fn(); return time.perf_counter() - t0, cpu_seconds() - c0


def run_dcm2niix(src, out):
    out.mkdir(parents=True)
    subprocess.run(['dcm2niix', '-z', 'y', '-f', '%f_%s_%e', '-o', str(out), str(src)], check=True, capture_output=True)


def run_dicom2nifti(src, out):
    import dicom2nifti, logging
    logging.getLogger('dicom2nifti').setLevel(logging.ERROR)
    for series in sorted(p for p in src.glob('*/*') if p.is_dir()):   # one folder per series: its fixed names cannot collide
        dest = out/series.parent.name/series.name; dest.mkdir(parents=True)
        dicom2nifti.convert_directory(str(series), str(dest), compression=True, reorient=True)


def run_ours(src, out, workers):
    r = dicom_to_nifti(src, out, n_workers=workers, quiet=True)
    assert r.status == 'completed' and r.counts.get('error', 0) == 0, r.summary()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--series', type=int, default=24); ap.add_argument('--slices', type=int, default=100)
    ap.add_argument('--size', type=int, default=256); ap.add_argument('--repeat', type=int, default=2)
    ap.add_argument('--skip-dicom2nifti', action='store_true')
    a = ap.parse_args()
    src, outs = WORK/'nifti_corpus', WORK/'nifti_out'
    n = make_corpus(src, a.series, a.slices, a.size)
    shutil.rmtree(outs, ignore_errors=True)
    tools = {'dicom_prep 1 worker': lambda o: run_ours(src, o, 1), 'dicom_prep 2 workers': lambda o: run_ours(src, o, 2),
             'dcm2niix': lambda o: run_dcm2niix(src, o), **({} if a.skip_dicom2nifti else {'dicom2nifti': lambda o: run_dicom2nifti(src, o)})}
    runs = {name: [] for name in tools}
    for i in range(a.repeat):
        for name, fn in tools.items():
            if i and name == 'dicom2nifti': continue
            out = outs/name.replace(' ', '_'); shutil.rmtree(out, ignore_errors=True)
            runs[name].append(timed(lambda: fn(out)))
            print(f"round {i + 1} {name:>22}: {runs[name][-1][0]:7.2f}s wall, {runs[name][-1][1]:7.2f}s CPU", flush=True)
    print(f"\n{'':>22}  {'best wall':>9}  {'slices/s':>8}  {'CPU s':>7}")
    times = {}
    for name, rs in runs.items():
        wall, cpu = min(rs)
        times[name] = wall
        print(f"{name:>22}  {wall:8.2f}s  {n / wall:8.1f}  {cpu:7.2f}")
    rerun = timed(lambda: run_ours(src, outs/'dicom_prep_2_workers', 2))[0]
    counts = {p.name: len(list(p.rglob('*.nii.gz'))) for p in sorted(outs.iterdir())}
    d2x, o1, o2 = times['dcm2niix'], times['dicom_prep 1 worker'], times['dicom_prep 2 workers']
    print(f"\ncorpus: {n:,} slices, {a.series} series of {a.slices} × {a.size}² int16; {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}), Python {platform.python_version()}; volumes written: {counts}")
    print(f"dicom_prep / dcm2niix:   1 worker {o1 / d2x:.2f}×, 2 workers {o2 / d2x:.2f}×   (target ≤ 2×)")
    if 'dicom2nifti' in times:
        print(f"dicom2nifti / dicom_prep: 1 worker {times['dicom2nifti'] / o1:.2f}×, 2 workers {times['dicom2nifti'] / o2:.2f}×   (target ≥ 2×)")
    print(f"no-op rerun (everything up to date): {rerun:.2f}s")


if __name__ == '__main__': main()
