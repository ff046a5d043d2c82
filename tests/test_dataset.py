"End-to-end: `DicomPrepDataset` over a real preprocess run, with each source of labels, as a DataLoader's worker would use it."
import pickle, sqlite3
import numpy as np, pandas as pd, pytest
from dicom_prep.dataset import DicomPrepDataset
from dicom_prep.labels import set_label
from dicom_prep.preprocess import preprocess
from dicom_prep.synth import synth_dicom


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "Six patients, one 8-bit image each, all in the train split."
    tmp = tmp_path_factory.mktemp('ds')
    for i in range(6): synth_dicom(tmp/f'src/p{i}/im.dcm', 40, 30, patient=f'P{i}', seed=i)
    return tmp, preprocess(tmp/'src', tmp/'out', n_workers=0, quiet=True, splits='train:1')


def test_typed_labels_become_class_indices_and_the_dataset_survives_pickling(run):
    tmp, r = run
    with sqlite3.connect(r.db_path) as conn:
        names = [f for (f,) in conn.execute('select filename from images order by filename')]
        for k, f in enumerate(names[:4]): set_label(conn, 'image', f, ('cat', 'dog')[k % 2], 'me')
    ds = DicomPrepDataset(r.db_path, 'train', labels='db')
    assert len(ds) == 4 and ds.classes == ['cat', 'dog'] and [ds[i][1] for i in range(4)] == [0, 1, 0, 1]   # unlabelled images left out
    copy = pickle.loads(pickle.dumps(ds))             # what a DataLoader worker gets
    assert all(np.array_equal(copy[i][0], ds[i][0]) and copy[i][1] == ds[i][1] for i in range(4))
    batch = np.stack([ds[i][0] for i in range(4)])    # what default_collate does with numpy images
    assert batch.dtype == np.uint8 and batch.shape[0] == 4
    with pytest.raises(ValueError, match='preprocess with --bit-depth 16'): DicomPrepDataset(r.db_path, 'train', hu=True)


def test_several_label_columns_are_a_multi_hot_vector(run):
    tmp, r = run
    pd.DataFrame(dict(patient_id=[f'P{i}' for i in range(6)], edema=[1, 0, 1, 0, 1, 0], effusion=[0, 0, 1, 1, 0, 0])).to_csv(tmp/'l.csv', index=False)
    ds = DicomPrepDataset(r.db_path, 'train', labels=tmp/'l.csv', on='patient_id', label_col='edema,effusion')
    assert ds.classes == ['edema', 'effusion'] and len(ds) == 6
    got = {ds.df['patient_id'][i]: ds[i][1] for i in range(6)}
    assert got['P2'].dtype == np.float32 and got['P2'].tolist() == [1., 1.] and got['P1'].tolist() == [0., 0.]
