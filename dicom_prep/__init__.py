"""Raw DICOMs in; training-ready images, NIfTI volumes and a SQLite index out — parallel, idempotent, resumable.

Modules:

- `dicom_prep.db`: The SQLite index *is* the state: schema and migrations, corrupt-file recovery, the single-writer lock, runs, settings guard and hold-out splits.
- `dicom_prep.parallel`: Run a per-file function over many files, streaming results back as they complete; a worker that crashes or hangs costs only the file it was on. Locally on fastcore's process pool, or on Dask.
- `dicom_prep.preprocess`: The main pipeline: a DICOM tree in; one normalised PNG per frame, a row per image and a row per source file out. Parallel, idempotent, resumable after any crash.
- `dicom_prep.status`: `dicom_prep_status`: what the database says about a corpus and its runs — counts, failures and their reasons, the last runs — without touching it."""

__version__ = "0.0.1"
