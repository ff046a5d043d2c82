"""Export speed against the disk, and the cost of --all-tags, each measured beside its baseline in the same run.

1. Export of N prepared images as `webdataset` and `imagefolder`, beside `cp -r` of the same PNGs on the
   same disk (target: each >= 80% of cp's speed, i.e. time ratio cp/export >= 0.8). The page cache is warmed
   first so that all three read the same cached PNGs.
2. Cold `preprocess` of a CT corpus (256² slices, `--ct` files) with and without `--all-tags` (target: <= 15% more time).

    python bench/bench_export.py [--n 100000] [--ct 2000] [--workdir bench/_work/export]
"""
import argparse, shutil, subprocess, time
from pathlib import Path

from dicom_prep.export import export
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_clones, synth_ct


def timed(fn) -> float:
    "Seconds `fn()` takes."
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def cold_preprocess(src, out, **kw) -> float:
    "Seconds for a fresh preprocess run of `src` into `out`."
    shutil.rmtree(out, ignore_errors=True)
    return timed(lambda: preprocess(src, out, n_workers=2, quiet=True, **kw))


def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--ct', type=int, default=2000); ap.add_argument('--workdir', default='bench/_work/export'); a = ap.parse_args()
    work = Path(a.workdir); shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
    ct = work/'ct'
    for i in range(a.ct): synth_ct(ct/f'study_{i % 20:02d}/im{i:05d}.dcm', 256, seed=i)
    t_plain, t_all = cold_preprocess(ct, work/'ct_plain'), cold_preprocess(ct, work/'ct_all', all_tags=True)
    print(f"preprocess {a.ct:,} CT files: {t_plain:.1f}s plain, {t_all:.1f}s with --all-tags: ratio {t_all / t_plain:.3f} (target <= 1.15)")
    src = synth_clones(work/'src', a.n, studies=200, size=32)
    cold_preprocess(src, work/'plain')
    db, images = work/'plain/dicom_prep.db', work/'plain/images'
    subprocess.run(['cp', '-r', str(images), str(work/'warm')], check=True); shutil.rmtree(work/'warm')      # warm the page cache
    t_cp = timed(lambda: subprocess.run(['cp', '-r', str(images), str(work/'cp')], check=True))
    size = sum(p.stat().st_size for p in images.rglob('*.png')) / 1e6
    print(f"cp -r of {a.n:,} PNGs ({size:.0f} MB): {t_cp:.2f}s")
    for fmt in ('webdataset', 'imagefolder'):
        t = timed(lambda: export(db, work/fmt, fmt, label_col='modality', shard_size=100))
        print(f"export {fmt}: {t:.2f}s: speed ratio to cp -r = {t_cp / t:.2f} (target >= 0.80)")
    t_again = timed(lambda: export(db, work/'webdataset', 'webdataset', label_col='modality'))
    print(f"unchanged re-export (webdataset): {t_again:.2f}s")


if __name__ == '__main__': main()
