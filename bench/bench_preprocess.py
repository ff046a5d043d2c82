"""Throughput of `dicom_prep_preprocess` against a naive reference and the decode limit, from one run.

Builds a corpus (single-frame CT 512², a few long multi-frame files, some compressed), then times:
  - dicom_prep_preprocess with 1 and 2 workers (the console script, start-up included);
  - a naive reference: read → decode → per-frame re-read → PNG, one SELECT + INSERT per row;
  - the decode limit: read once + decode every frame, one process, no output.
Prints ratios against baselines measured in this same run (the machines are shared and noisy).

    python bench/bench_preprocess.py [--ct 200] [--multi 4] [--frames 120] [--compressed 20] [--png-level 6]
                                     [--cine 3] [--cine-frames 150]

A second, multi-frame-heavy corpus (RLE-compressed cine, like ultrasound) shows the cost the naive design
pays for re-reading and re-decoding the whole file for every frame.
"""
import argparse, os, shutil, sqlite3, subprocess, tempfile, time
from pathlib import Path
import numpy as np, pydicom
from PIL import Image
from pydicom.uid import RLELossless, JPEG2000Lossless
from dicom_prep.synth import synth_cine, synth_ct, synth_dicom
from dicom_prep.sources import find_dicoms
from dicom_prep.guards import frame_count

def build(root, n_ct, n_multi, frames, n_comp):
    "Write the corpus under `root`; return (files, frames)."
    for i in range(n_ct): synth_ct(root/f'study_{i % 10:03d}/ct_{i:05d}.dcm', 512, seed=i)
    for i in range(n_multi): synth_dicom(root/f'cine/cine_{i}.dcm', rows=256, cols=256, frames=frames, modality='US', patient=f'C{i}', seed=i)
    for i in range(n_comp):
        p = synth_ct(root/f'comp/c_{i:03d}.dcm', 512, seed=1000 + i)
        ds = pydicom.dcmread(p); ds.compress(RLELossless if i % 2 else JPEG2000Lossless); ds.save_as(p, enforce_file_format=True)
    return n_ct + n_multi + n_comp, n_ct + n_multi*frames + n_comp

def run_cli(src, workers, png_level):
    "Seconds for one cold `dicom_prep_preprocess` run."
    out = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    subprocess.run(['dicom_prep_preprocess', '--dicom-dir', src, '--output-dir', out, '--workers', str(workers),
                    '--png-level', str(png_level)], check=True, capture_output=True)
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt

def naive(src, png_level):
    "The naive design: re-read and fully decode the file for every frame; SELECT + INSERT per row."
    out = Path(tempfile.mkdtemp())
    conn = sqlite3.connect(out/'naive.db'); conn.execute('create table images (filename text, path text)')
    t = time.perf_counter()
    for path, study in find_dicoms(src):
        n = frame_count(pydicom.dcmread(path))
        for i in range(n):
            ds = pydicom.dcmread(path)                      # per-frame re-read
            arr = ds.pixel_array                            # decodes every frame, every time
            frame = arr[i] if n > 1 else arr
            lo, hi = np.percentile(frame, (0.5, 99.5))
            img = Image.fromarray((np.clip((frame - lo) / max(hi - lo, 1), 0, 1) * 255).astype('uint8'))
            img.thumbnail((256, 256), Image.LANCZOS)
            name = f"{study}_{Path(path).stem}_{i}"
            img.save(out/f"{name}.png", compress_level=png_level)
            if not conn.execute('select 1 from images where filename=?', [name]).fetchone():
                conn.execute('insert into images values (?, ?)', [name, str(path)]); conn.commit()
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt

def decode_limit(src):
    "Read once and decode every frame, one process, no output."
    t = time.perf_counter()
    for path, _ in find_dicoms(src):
        ds = pydicom.dcmread(path)
        for _ in pydicom.pixels.iter_pixels(ds): pass
    return time.perf_counter() - t

def startup():
    "Seconds for the console script to start and exit (--help)."
    t = time.perf_counter(); subprocess.run(['dicom_prep_preprocess', '--help'], check=True, capture_output=True)
    return time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--ct', type=int, default=200); ap.add_argument('--multi', type=int, default=4)
    ap.add_argument('--frames', type=int, default=120); ap.add_argument('--compressed', type=int, default=20)
    ap.add_argument('--png-level', type=int, default=6)
    ap.add_argument('--cine', type=int, default=3); ap.add_argument('--cine-frames', type=int, default=150)
    a = ap.parse_args()
    src = Path(tempfile.mkdtemp())/'corpus'
    n_files, n_frames = build(src, a.ct, a.multi, a.frames, a.compressed)
    print(f"corpus: {n_files} files, {n_frames} frames ({a.ct} CT 512², {a.multi}×{a.frames}-frame 256² cine, "
          f"{a.compressed} compressed RLE/J2K); PNG level {a.png_level}; {os.cpu_count()} CPUs")
    t_start, t_dec = startup(), decode_limit(src)
    t1, t2 = run_cli(src, 1, a.png_level), run_cli(src, 2, a.png_level)
    t_naive = naive(src, a.png_level)
    report(n_files, n_frames, [('decode limit (1 proc, no output)', t_dec), ('naive reference', t_naive),
                               ('dicom_prep 1 worker', t1), ('dicom_prep 2 workers', t2)])
    print(f"  start-up (--help)                  {t_start:7.2f}s")
    print("ratios (mixed corpus):")
    print(f"  naive / dicom_prep(2 workers)      {t_naive/t2:7.1f}x")
    print(f"  1 worker / 2 workers               {t1/t2:7.2f}x   (target >= 1.8x; start-up included)")
    print(f"  1 worker / 2 workers, no start-up  {(t1 - t_start)/(t2 - t_start):7.2f}x")
    print(f"  2 workers / (decode limit / 2)     {(t2 - t_start)/(t_dec/2):7.2f}    (target <= 1.3; PNG encoding is not in the decode limit)")
    csrc = src.parent/'cine'
    for i in range(a.cine): synth_cine(csrc/f'us_{i}.dcm', a.cine_frames, 256, seed=i)
    n_cf = a.cine * a.cine_frames
    print(f"\nmulti-frame-heavy corpus: {a.cine} RLE cine files × {a.cine_frames} frames 256²")
    c_dec, c2, c_naive = decode_limit(csrc), run_cli(csrc, 2, a.png_level), naive(csrc, a.png_level)
    report(a.cine, n_cf, [('decode limit (1 proc, no output)', c_dec), ('naive reference', c_naive), ('dicom_prep 2 workers', c2)])
    print(f"  naive / dicom_prep(2 workers)      {c_naive/c2:7.1f}x   (target >= 30x on multi-frame-heavy corpora)")

def report(n_files, n_frames, rows):
    "Print time and throughput per row."
    for name, t in rows: print(f"  {name:34s} {t:7.2f}s  {n_files/t:8.1f} files/s  {n_frames/t:8.1f} frames/s")

if __name__ == '__main__': main()
