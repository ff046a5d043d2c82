"End-to-end: `--splits` that cannot mean what was typed is refused, and a split a small cohort leaves empty is named."
import subprocess
from conftest import console_script, query
from dicom_prep.options import assign_split, empty_split_warnings, parse_splits
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom

PATIENTS_SQL = "select split, count(distinct coalesce(nullif(patient_id, ''), study_id)) from images group by split"   # what a run's end counts


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(console_script('dicom_prep_preprocess') + [str(a) for a in args], capture_output=True, text=True, timeout=120)


def test_fractions_that_do_not_add_up_are_refused_but_two_are_a_ratio(tmp_path):
    synth_dicom(tmp_path/'src/a.dcm')
    r = _run('--dicom-dir', tmp_path/'src', '--output-dir', tmp_path/'o', '--workers', 0, '--splits', '70/20/5')
    assert r.returncode == 2 and "add up to 95, not 1 or 100" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path/'o/images').exists()
    r = _run('--dicom-dir', tmp_path/'src', '--output-dir', tmp_path/'o2', '--workers', 0, '--splits', '70/20')
    assert r.returncode == 0, r.stderr
    assert {s for (s,) in query(tmp_path/'o2', 'select split from images')} <= {'train', 'valid'}


def test_every_split_a_small_cohort_leaves_empty_is_warned(tmp_path):
    "Ten patients at 80/10/10, chosen (by the stable hash) so that no test patient is drawn: the warning names 'test' and where they went."
    fr = parse_splits('80/10/10')
    names = [p for p in (f'P{i}' for i in range(200)) if assign_split(p, fr) != 'test'][:10]
    for i, p in enumerate(names): synth_dicom(tmp_path/f'src/{p}/im.dcm', patient=p, seed=i)
    r = preprocess(tmp_path/'src', tmp_path/'out', n_workers=0, quiet=True)
    assert "Split 'test' (10%) is empty" in r.summary()                  # the run's own summary says so
    patients = dict(query(tmp_path/'out', PATIENTS_SQL))
    assert sum(patients.values()) == 10 and 'test' not in patients
    [w] = empty_split_warnings(fr, patients)
    assert w.startswith("Split 'test' (10%) is empty: 10 patients went to train ")
