"""Masks from a 300-slice 512×512 CT with a 100-segment binary SEG and a 50-ROI RTSTRUCT: dicom_prep against highdicom
and rt-utils, measured in the same run (issue 23: at most 1.0× highdicom's time, 0.5× rt-utils', and a peak memory of at
most 2× the largest output array).

Each reader makes the label volume of the whole series: highdicom with `Segmentation.get_volume(combine_segments=True)`,
rt-utils with `get_roi_mask_by_name` per ROI, dicom_prep with `annotations.image_planes` on the CT headers and
`masks.paint_target` into one (slices, rows, cols) array. Times are the best of `--repeat` rounds; memory is tracemalloc's
peak during one more round of dicom_prep's.

    python bench/bench_masks.py [--slices 300] [--size 512] [--segments 100] [--rois 50] [--repeat 3]
"""
import argparse, tempfile, time, tracemalloc, warnings
from pathlib import Path

import numpy as np
import pydicom

from dicom_prep.annotations import describe_annotation, image_planes
from dicom_prep.masks import paint_target
from dicom_prep.synth_labels import synth_bench_annotated


def ours(images, path) -> np.ndarray:
    "dicom_prep's label volume of annotation `path` on the CT `images`."
    planes = [p for f in images for p in image_planes(pydicom.dcmread(f, stop_before_pixels=True))]
    a = describe_annotation(pydicom.dcmread(path, stop_before_pixels=True))
    stack = np.zeros((len(planes), planes[0].rows, planes[0].cols), np.uint8)
    paint_target([(path, a)], planes, {s.key: n for n, s in enumerate(a.segments, 1)}, 'last', stack=stack)
    return stack

def highdicom_volume(path) -> np.ndarray:
    import highdicom as hd
    return hd.seg.segread(path).get_volume(combine_segments=True, skip_overlap_checks=True).array

def rt_utils_volume(series_dir, path) -> np.ndarray:
    from rt_utils import RTStructBuilder
    rts = RTStructBuilder.create_from(str(series_dir), str(path))
    out = None
    for n, name in enumerate(rts.get_roi_names(), 1):
        m = rts.get_roi_mask_by_name(name)
        out = np.zeros(m.shape, np.uint8) if out is None else out
        out[m] = n
    return out

def best(fn, repeat:int) -> float:
    "The shortest of `repeat` timed calls of `fn`."
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

def peak(fn) -> tuple[int, int]:
    "(peak bytes tracemalloc saw during `fn`, bytes of its result)."
    tracemalloc.start(); r = fn(); p = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    return p, r.nbytes

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--slices', type=int, default=300); ap.add_argument('--size', type=int, default=512)
    ap.add_argument('--segments', type=int, default=100); ap.add_argument('--rois', type=int, default=50)
    ap.add_argument('--repeat', type=int, default=3)
    a = ap.parse_args()
    warnings.simplefilter('ignore')
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = synth_bench_annotated(Path(tmp), a.slices, a.size, a.segments, a.rois)
        print(f"data: {a.slices} slices of {a.size}², {a.segments} segments, {a.rois} ROIs, written in {time.perf_counter() - t:.1f} s")
        rows = [('SEG', 'highdicom', lambda: ours(data.images, data.seg), lambda: highdicom_volume(data.seg), 1.0),
                ('RTSTRUCT', 'rt-utils', lambda: ours(data.images, data.rtstruct), lambda: rt_utils_volume(Path(data.images[0]).parent, data.rtstruct), 0.5)]
        for what, ref, mine, theirs, target in rows:
            t_ref, t_ours = best(theirs, a.repeat), best(mine, a.repeat)
            p, size = peak(mine)
            print(f"{what:9s} dicom_prep {t_ours:6.2f} s  {ref} {t_ref:6.2f} s  ratio {t_ours / t_ref:4.2f}x (target <= {target}x)  "
                  f"peak memory {p / size:4.2f}x the label volume ({size >> 20} MiB; target <= 2x)")

if __name__ == '__main__': main()
