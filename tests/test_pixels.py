"Cross-checks of `dicom_prep.pixels` against pydicom on every bundled sample file (slow-ish; run with pytest)."

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

import dicom_prep.pixels
from dicom_prep.sources import sample_data_dirs, sample_file
from dicom_prep.pixels import PixelDecodeError, decode_frame, frame_image, save_png, to_uint8

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')   # pydicom warns about the odd files on purpose


SAMPLES = sorted((p for d in sample_data_dirs() for p in d.iterdir() if p.is_file()), key=lambda p: p.name)


def _sample(name):
    "Path of a bundled sample file (local only, never downloaded); skip when pydicom-data is not installed."
    try: return sample_file(name)
    except FileNotFoundError: pytest.skip(f'{name} needs pydicom-data')


def _read(path):
    "The dataset at `path` if it holds pixel data, else skip the test."
    try: ds = pydicom.dcmread(path)
    except Exception as e: pytest.skip(f'not readable DICOM: {e}')
    if not any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')): pytest.skip('no pixel data')
    return ds


def _pydicom_frame(ds, index):
    "pydicom's own decoding of frame `index`, or None when pydicom cannot decode it."
    try: return pixel_array(ds, index=index)
    except Exception: return None


def _n_frames(ds):
    try: return int(ds.get('NumberOfFrames') or 1)
    except ValueError: return 1


@pytest.mark.parametrize('path', SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_file(path):
    "Frames that pydicom decodes become small uint8 L/RGB images; frames it cannot decode raise PixelDecodeError."
    ds = _read(path)
    last = _n_frames(ds) - 1
    ref = _pydicom_frame(ds, 0)
    if ref is None:
        with pytest.raises(PixelDecodeError): decode_frame(ds, 0)
        return
    for index in sorted({0, last}):
        img, label = frame_image(ds, index)
        assert img.mode in ('L', 'RGB') and max(img.size) <= 256 and label
        assert np.asarray(img).dtype == np.uint8
        if ds.get('PhotometricInterpretation', '').startswith('MONOCHROME'):
            assert img.mode == 'L' and label.startswith(('file:', 'voi_lut', 'p0.5'))
        else: assert img.mode == 'RGB' and label in ('rgb', 'palette')
    ours = decode_frame(ds, 0)
    if ds.get('PhotometricInterpretation') == 'PALETTE COLOR': ref = (apply_color_lut(ref, ds)[..., :3] >> 8).astype(np.uint8)
    assert ours.shape == ref.shape
    # JPEG decoders may differ by an IDCT rounding step; lossless paths must agree exactly
    assert np.abs(ours.astype(np.float64) - ref).mean() <= (1 if ds.file_meta.TransferSyntaxUID.is_compressed else 0)


YBR_JPEG = ['SC_rgb_jpeg_dcmtk.dcm', 'SC_rgb_jpeg_lossy_gdcm.dcm', 'SC_rgb_small_odd_jpeg.dcm', 'SC_rgb_dcmtk_+eb+cy+n1.dcm',
            'SC_rgb_dcmtk_+eb+cy+n2.dcm', 'SC_rgb_dcmtk_+eb+cy+np.dcm', 'SC_rgb_dcmtk_+eb+cy+s2.dcm', 'SC_rgb_dcmtk_+eb+cy+s4.dcm',
            'examples_ybr_color.dcm']
RGB_JPEG = ['SC_rgb_jpeg.dcm', 'SC_jpeg_no_color_transform.dcm', 'SC_jpeg_no_color_transform_2.dcm',
            'SC_rgb_jpeg_app14_dcmd.dcm', 'SC_rgb_dcmtk_+eb+cr.dcm']


@pytest.mark.parametrize('name', YBR_JPEG + RGB_JPEG)
def test_jpeg_colour_matches_pydicom(name):
    "Our colour JPEG decoding (libjpeg's own YCbCr→RGB) matches pydicom's RGB reference, frame by frame."
    ds = _read(_sample(name))
    for index in sorted({0, _n_frames(ds) - 1}):
        ref, ours = _pydicom_frame(ds, index), decode_frame(ds, index)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - ref).mean() < 1.5


def test_ybr_jpeg_uncompressed_reference():
    "The dcmtk YBR JPEGs decode to the RGB image they were made from (the *_dcmd.dcm uncompressed versions)."
    pairs = {'SC_rgb_dcmtk_+eb+cy+np.dcm': 'SC_rgb_dcmtk_ebcynp_dcmd.dcm', 'SC_rgb_dcmtk_+eb+cy+s2.dcm': 'SC_rgb_dcmtk_ebcys2_dcmd.dcm'}
    for jpeg, raw in pairs.items():
        ref = _read(_sample(raw)).pixel_array
        assert np.abs(decode_frame(_read(_sample(jpeg)), 0).astype(int) - ref).mean() < 1.5


def test_ybr_jpeg_cine_takes_the_libjpeg_path():
    "A long YBR JPEG cine goes through libjpeg's own colour transform (the fast path; speed is in bench/bench_pixels.py), frame for frame as pydicom."
    ds = _read(_sample('examples_ybr_color.dcm'))
    assert dicom_prep.pixels._is_ybr_jpeg(ds)
    for i in range(_n_frames(ds)):
        assert np.abs(decode_frame(ds, i).astype(int) - _pydicom_frame(ds, i).astype(int)).mean() < 1.5, i


def test_rgb_bit_depths_agree():
    "8, 16 and 32-bit versions of the same RGB image give the same 8-bit image."
    names = ['SC_rgb_rle.dcm', 'SC_rgb_rle_16bit.dcm', 'SC_rgb_rle_32bit.dcm']
    outs = [to_uint8(ds, decode_frame(ds, 0))[0] for ds in (_read(_sample(n)) for n in names)]
    for o in outs[1:]: np.testing.assert_array_equal(o, outs[0])


def test_monochrome1_inverted_against_monochrome2():
    "An X-ray stored MONOCHROME1 renders as the inverse of the same data labelled MONOCHROME2."
    ds = _read(_sample('RG1_UNCI.dcm'))
    arr = decode_frame(ds, 0)
    m1 = to_uint8(ds, arr, 'minmax')[0]
    ds.PhotometricInterpretation = 'MONOCHROME2'
    np.testing.assert_array_equal(m1, 255 - to_uint8(ds, arr, 'minmax')[0])


def test_enhanced_ct_uses_functional_groups(tmp_path):
    "An enhanced CT's shared rescale and window are used per frame (pydicom ignores functional groups)."
    ds = _read(_sample('eCT_Supplemental.dcm'))
    img, label = frame_image(ds, 1)
    assert label == 'file:49/102'
    save_png(img, tmp_path / 'f.png', compress_level=1)
    with Image.open(tmp_path / 'f.png') as back: assert back.mode == 'L' and back.size == (256, 256)
