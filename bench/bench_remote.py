"""Pulling from a PACS, and reading an archive in place (issue 27), against the paths users take today.

1,000 CT instances (512², 16-bit) go into a real Orthanc on loopback (Debian's, with its DICOMweb plugin; started as the
tests start it, `tests/orthanc.py`). Timed as whole runs, in the same process of this benchmark, on the same machine:
- `dicom_prep_preprocess` from DICOMweb (`dicomweb+http://…`) and from DIMSE (`dimse://…`), 2 workers, a cold cache;
- the baseline users write today: a plain loop of dicomweb-client `retrieve_instance` + pydicom + a PNG per instance;
- Orthanc's own zip download of the study, unzipped, then a local `dicom_prep_preprocess` run;
- `dicom_prep_preprocess` on that zip, read in place, against the same run on the extracted folder.
Targets: ≥ 2× the plain loop; ≤ 1.2× the download-then-process path; the zip ≤ 1.1× the extracted folder.

    python bench/bench_remote.py [--n 1000] [--size 512] [--workers 2] [--dir /tmp/bench_remote]
"""
import argparse, shutil, subprocess, sys, time, zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'tests'))
from orthanc import OrthancServer          # noqa: E402  (the tests' own Orthanc launcher)
from dicom_prep.synth import synth_series  # noqa: E402

CLI = shutil.which('dicom_prep_preprocess')

def timed(f) -> tuple[float, object]:
    t = time.perf_counter(); r = f(); return time.perf_counter() - t, r

def preprocess(src, out:Path, cache:Path, workers:int) -> float:
    "Wall time of a fresh `dicom_prep_preprocess` run of `src` (a cold cache)."
    shutil.rmtree(out, ignore_errors=True); shutil.rmtree(cache, ignore_errors=True)
    cmd = [CLI, '--dicom-dir', str(src), '--output-dir', str(out), '--cache-dir', str(cache), '--workers', str(workers)]
    t, r = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if r.returncode: sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return t

def plain_loop(url:str, out:Path) -> float:
    "The loop users write: QIDO the instances, then WADO each, decode, window to 8 bits and save a PNG."
    from dicomweb_client.api import DICOMwebClient
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    def loop():
        client = DICOMwebClient(url)
        for inst in client.search_for_instances(search_filters={}, get_remaining=True):
            uid = lambda tag, inst=inst: inst[tag]['Value'][0]
            ds = client.retrieve_instance(uid('0020000D'), uid('0020000E'), uid('00080018'))
            a = ds.pixel_array.astype(np.float32) * float(ds.get('RescaleSlope', 1)) + float(ds.get('RescaleIntercept', 0))
            lo, hi = a.min(), a.max()
            Image.fromarray(((a - lo) / max(hi - lo, 1) * 255).astype(np.uint8)).save(out/f"{ds.SOPInstanceUID}.png")
    return timed(loop)[0]

def download_then_process(orthanc:OrthancServer, study:str, tmp:Path, workers:int) -> tuple[float, Path, Path]:
    "Orthanc's zip of the study, unzipped, then a local run; returns (total wall time, the zip, the folder)."
    zp, folder = tmp/'study.zip', tmp/'unzipped'
    shutil.rmtree(folder, ignore_errors=True)
    def fetch():
        zp.write_bytes(orthanc.rest('GET', f'/studies/{study}/archive').content)
        with zipfile.ZipFile(zp) as z: z.extractall(folder)
    t_fetch = timed(fetch)[0]
    return t_fetch + preprocess(folder, tmp/'out_unzipped', tmp/'cache_unzipped', workers), zp, folder

def load(orthanc:OrthancServer, n:int, size:int, tmp:Path) -> str:
    "Synthesise `n` CT slices, upload them; the study's Orthanc id."
    rng = np.random.default_rng(0)
    paths = synth_series(tmp/'ct', n=n, rows=size, cols=size, intercept=-1024,
                         pixels=lambda k: (rng.random((size, size)) * 2000 + 24).astype(np.uint16))
    for i in range(0, len(paths), 50): orthanc.upload(paths[i:i + 50])
    return orthanc.rest('GET', '/studies').json()[0]

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=1000); p.add_argument('--size', type=int, default=512)
    p.add_argument('--workers', type=int, default=2); p.add_argument('--dir', type=Path, default=Path('/tmp/bench_remote'))
    a = p.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True); a.dir.mkdir(parents=True)
    with OrthancServer(a.dir/'orthanc') as orthanc:
        t_load, study = timed(lambda: load(orthanc, a.n, a.size, a.dir))
        print(f"{a.n:,} CT instances of {a.size}² loaded into Orthanc in {t_load:.1f} s; {a.workers} workers\n")
        t = dict(dicomweb=preprocess(orthanc.dicomweb_url, a.dir/'out_web', a.dir/'cache_web', a.workers),
                 dimse=preprocess(orthanc.dimse_url, a.dir/'out_dimse', a.dir/'cache_dimse', a.workers),
                 loop=plain_loop(orthanc.dicomweb_url.removeprefix('dicomweb+'), a.dir/'out_loop'))
        t['download'], zp, folder = download_then_process(orthanc, study, a.dir, a.workers)
    t['zip'] = preprocess(zp, a.dir/'out_zip', a.dir/'cache_zip', a.workers)
    t['folder'] = preprocess(folder, a.dir/'out_folder', a.dir/'cache_folder', a.workers)
    for k, v in t.items(): print(f"{k:>9}: {v:7.1f} s  ({a.n / v:6.1f} instances/s)")
    print(f"\nDICOMweb vs the plain loop:            {t['loop'] / t['dicomweb']:.2f}× faster   (target ≥ 2×)")
    print(f"DIMSE vs the plain loop:               {t['loop'] / t['dimse']:.2f}× faster")
    print(f"DICOMweb vs download-then-process:     {t['dicomweb'] / t['download']:.2f}× the time (target ≤ 1.2×)")
    print(f"the zip in place vs its folder:        {t['zip'] / t['folder']:.2f}× the time (target ≤ 1.1×)")

if __name__ == '__main__': main()
