"""Per-frame decode speed of long YBR JPEG cines: dicom_prep's libjpeg path against pydicom's default path.

pydicom converts YCbCr to RGB in numpy after decoding (pydicom#2226); for YBR JPEG dicom_prep hands each
frame's bytes to Pillow, whose libjpeg does the transform in C. Both are timed in the same run, best of 3,
and the ratio is printed (target: pydicom / dicom_prep >= 1.5).

    python bench/bench_pixels.py
"""
import time
import pydicom
from dicom_prep.sources import sample_file
from pydicom.pixels import pixel_array
from dicom_prep.pixels import decode_frame

def per_frame(fn, ds, n) -> float:
    "Seconds per frame to decode all `n` frames of `ds` with `fn`."
    start = time.perf_counter()
    for i in range(n): fn(ds, i)
    return (time.perf_counter() - start) / n

def main():
    ds = pydicom.dcmread(sample_file('examples_ybr_color.dcm'))
    n = int(ds.get('NumberOfFrames', 1))
    ours = min(per_frame(decode_frame, ds, n) for _ in range(3))
    theirs = min(per_frame(lambda d, i: pixel_array(d, index=i), ds, n) for _ in range(3))
    print(f"examples_ybr_color.dcm: {n} frames {ds.Rows}x{ds.Columns} YBR JPEG")
    print(f"  pydicom default path: {theirs * 1e3:.2f} ms/frame")
    print(f"  dicom_prep          : {ours * 1e3:.2f} ms/frame")
    print(f"  ratio pydicom / dicom_prep = {theirs / ours:.2f} (target >= 1.5)")

if __name__ == '__main__': main()
