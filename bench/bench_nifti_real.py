"""Benchmark `dicom_prep_nifti` against dcm2niix as whole processes on small folders (issue 28), in the same run.

Three folders: dcm_qa_nih (608 files in ../shared: GE EPI and Siemens mosaics; skipped when absent), a synthesised Philips
DWI series (--volumes × --slices single-frame 112² files, 51 × 54 = 2,754 by default) and a 5-file folder (5 enhanced
multi-frame MR files of 24 frames of 64²); the last two are written once under bench/_work. Each round runs, in turns and
each into a fresh output folder: `dicom_prep_nifti --sidecar` with 1 and 2 workers, `dcm2niix -z y -b y`, and
`dcm2niix -z y -1 -b y` (gzip level 1: the effort dicom_prep spends), dcm2niix being the program itself (not pip's console
script, a Python that starts it, nor a shim found in PATH); and, as the floor, a Python that only imports pydicom. A ratio is
dicom_prep's wall time over dcm2niix's in
the same round (interleaved pairs, so the shared machine's drift hits both); the median over --rounds is printed against
the issue's targets for 1 worker and `-z y`: dcm_qa_nih ≤ 1.5×, Philips ≤ 1.0×, the 5-file folder ≤ 3×.

Usage: python bench/bench_nifti_real.py [--rounds 5] [--volumes 51] [--slices 54] [--folders dcm_qa_nih,Philips,5 files]
       [--baseline SCRIPT]   (another `dicom_prep_nifti` console script, e.g. an older checkout's, timed in the same rounds)
"""
import argparse, json, os, platform, shutil, statistics, subprocess, sys, sysconfig, time
from pathlib import Path

from pydicom.uid import generate_uid
from dicom_prep.synth import item, synth_enhanced, synth_series

WORK = Path(__file__).resolve().parent/'_work'
QA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'dcm_qa_nih'/'In'
TARGETS = {'dcm_qa_nih': 1.5, 'Philips': 1.0, '5 files': 3.0}   # dicom_prep 1 worker / dcm2niix -z y
FLOOR = "import sys; sys.modules.update(requests=None, tqdm=None); import pydicom"   # the least a console script reading DICOM with pydicom pays (ours hold these two out too)
ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}   # as installed: our modules load from bytecode


def written_once(dest:Path, spec:dict, write) -> Path:
    "`dest`, filled by `write(dest)` unless a previous run wrote it with the same `spec`."
    marker = dest/'corpus.json'
    if marker.exists() and json.loads(marker.read_text()) == spec: return dest
    shutil.rmtree(dest, ignore_errors=True); t0 = time.perf_counter()
    write(dest); marker.write_text(json.dumps(spec))
    print(f"{dest.name}: written in {time.perf_counter() - t0:.1f}s", flush=True)
    return dest


def philips_dwi(dest:Path, volumes:int, slices:int):
    "A classic Philips DWI series: `volumes` × `slices` single-frame 112² slices, b=0 then b=1000 along rotating axes."
    uid, study = generate_uid(), generate_uid()
    for t in range(volumes):
        g = [0., 0., 0.] if t == 0 else [float(t % 3 == k) for k in range(3)]
        synth_series(dest/'dwi', n=slices, rows=112, cols=112, modality='MR', series_uid=uid, study_uid=study, first_instance=1 + t*slices,
                     seed=t, description='dwi', Manufacturer='Philips Medical Systems', EchoTime='80', RepetitionTime='3000',
                     DiffusionBValue=0 if t == 0 else 1000, DiffusionGradientDirectionSequence=[item(DiffusionGradientOrientation=g)])


def five_enhanced(dest:Path):
    "5 enhanced multi-frame MR files, one series each: 24 frames of 64²."
    for i in range(5): synth_enhanced(dest/f'enh{i}.dcm', n=24, rows=64, cols=64, seed=i, SeriesNumber=i + 1)


def dcm2niix_program() -> str:
    "dcm2niix itself: the binary pip's `dcm2niix` package ships (its console script is a Python that starts it), else the one in PATH."
    try: import dcm2niix; return str(dcm2niix.bin)
    except (ImportError, AttributeError): return shutil.which('dcm2niix') or 'dcm2niix'


def commands(script:str, baseline:str|None) -> dict:
    "name → argument list before `(src, out)` are placed: dicom_prep with 1 and 2 workers (and the baseline's), dcm2niix twice."
    ours = lambda s, w: [s, '--sidecar', '--workers', str(w), '--dicom-dir', '{src}', '--output-dir', '{out}']
    cmds = {'dicom_prep 1 worker': ours(script, 1), 'dicom_prep 2 workers': ours(script, 2),
            'import pydicom': [sys.executable, '-c', FLOOR]}
    if baseline: cmds |= {'baseline 1 worker': ours(baseline, 1), 'baseline 2 workers': ours(baseline, 2)}
    d2n = dcm2niix_program()
    return cmds | {'dcm2niix -z y': [d2n, '-z', 'y', '-b', 'y', '-o', '{out}', '{src}'],
                   'dcm2niix -z y -1': [d2n, '-z', 'y', '-1', '-b', 'y', '-o', '{out}', '{src}']}


def timed(cmd:list, src:Path, out:Path) -> tuple[float, int]:
    "Wall seconds of one run of `cmd` from `src` into a fresh `out`, and the .nii.gz files it wrote (it must succeed)."
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    args = [a.format(src=src, out=out) for a in cmd]
    t0 = time.perf_counter(); p = subprocess.run(args, capture_output=True, text=True, env=ENV); dt = time.perf_counter() - t0
    if p.returncode: sys.exit(f"{args[:4]} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    return dt, len(list(out.rglob('*.nii.gz')))


def rounds(src:Path, cmds:dict, n:int) -> tuple[dict, dict]:
    "Times of each command over `n` rounds, commands taking turns within a round; and the volumes each wrote."
    times, vols = {k: [] for k in cmds}, {}
    for _ in range(n):
        for name, cmd in cmds.items():
            dt, vols[name] = timed(cmd, src, WORK/'nifti_real_out'/name.replace(' ', '_'))
            times[name].append(dt)
    return times, vols


def report(label:str, times:dict, vols:dict):
    "Median time per command, and the median of the per-round ratios of each dicom_prep command to each dcm2niix one."
    print(f"\n{label}")
    for name, ts in times.items(): print(f"  {name:>22}: median {statistics.median(ts):6.3f}s  best {min(ts):6.3f}s  ({vols[name]} volumes)")
    for ours in [k for k in times if not k.startswith('dcm2niix')]:
        r = {d: statistics.median(a / b for a, b in zip(times[ours], times[d], strict=True)) for d in ('dcm2niix -z y', 'dcm2niix -z y -1')}
        bar = f"  (target ≤ {TARGETS[label]}×: {'PASS' if r['dcm2niix -z y'] <= TARGETS[label] else 'MISS'})" if ours == 'dicom_prep 1 worker' else ''
        print(f"  {ours:>22} / dcm2niix: {r['dcm2niix -z y']:5.2f}× vs -z y, {r['dcm2niix -z y -1']:5.2f}× vs -z y -1{bar}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=5); ap.add_argument('--volumes', type=int, default=51)
    ap.add_argument('--slices', type=int, default=54); ap.add_argument('--baseline', default=None)
    ap.add_argument('--folders', default=','.join(TARGETS), help='which folders, comma-separated')
    a = ap.parse_args()
    script = str(Path(sysconfig.get_path('scripts'))/'dicom_prep_nifti')
    folders = {'Philips': written_once(WORK/'philips_corpus', dict(volumes=a.volumes, slices=a.slices), lambda d: philips_dwi(d, a.volumes, a.slices)),
               '5 files': written_once(WORK/'five_enhanced', dict(files=5, frames=24), five_enhanced)}
    if QA.is_dir(): folders = {'dcm_qa_nih': QA, **folders}
    else: print(f"dcm_qa_nih not found at {QA}: skipped")
    cmds, folders = commands(script, a.baseline), {k: v for k, v in folders.items() if k in a.folders.split(',')}
    for label, src in folders.items(): report(label, *rounds(src, cmds, a.rounds))
    print(f"\n{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), Python {platform.python_version()}, "
          f"{subprocess.run([dcm2niix_program(), '-v'], capture_output=True, text=True).stdout.split(chr(10))[0]}")


if __name__ == '__main__': main()
