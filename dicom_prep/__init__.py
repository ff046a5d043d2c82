"""Raw DICOMs in; training-ready images, NIfTI volumes and a SQLite index out — parallel, idempotent, resumable.

Modules:

- `dicom_prep.annotations`: What DICOM SEG and RTSTRUCT files declare (segments, references, frame of reference), and the image planes they land on.
- `dicom_prep.cli`: Console-script plumbing: parsers derived from the option dataclasses, grouped `--help` with an example, one error style, exit codes and start-up.
- `dicom_prep.console`: What a run shows: a progress bar with messages on lines of their own above it, the first warnings and a count of the rest, the SUMMARY, and the one line that says why a run achieved nothing.
- `dicom_prep.core`: Timing, naming, atomic writes and logging: the small pieces every layer of `dicom_prep` uses.
- `dicom_prep.dask_backend`: Beyond one machine: the same `preprocess` and `nifti` runs, with the per-file work spread over a `dask.distributed` cluster (a LocalCluster, Slurm/PBS through dask-jobqueue, Kubernetes, Coiled): the Dask backend of `parallel`'s driver loop.
- `dicom_prep.dataset`: The index as a training set: `DicomPrepDataset`, one split as `(image array, label)` pairs that torch's `DataLoader` takes as they are, with no torch import.
- `dicom_prep.db`: The SQLite index *is* the state: schema and migrations, corrupt-file recovery, the single-writer lock with write transactions that take the lock at their start, runs and the settings guard.
- `dicom_prep.export`: From the index to a training loop: the images or volumes as a DataFrame with your labels joined, CSV/Parquet manifests, and the `export` driver behind every dataset layout.
- `dicom_prep.faults`: Files that break things on purpose, and the offline guard every test runs under: decompression bombs made from real encoded frames, and `block_network`.
- `dicom_prep.guards`: Size checks before any decoding: what the DICOM header declares, and what each compressed frame's own codestream declares.
- `dicom_prep.label`: `dicom_prep_label`: label the prepared images in the browser, straight into the index.
- `dicom_prep.labels`: The `labels` table: class labels typed for images, series and studies, every change kept, undo as a new row, and one label per image by a documented rule.
- `dicom_prep.labelvolumes`: Label maps beside NIfTI volumes: each converted volume with annotations gets `<volume>_seg.nii.gz`, on exactly its grid and affine.
- `dicom_prep.layouts`: The dataset layouts an export writes (image folders, WebDataset shards, image/mask pairs, nnU-Net/MONAI with label volumes), incremental, recorded item by item in the index, and completed by a rerun if killed.
- `dicom_prep.masks`: SEG and RTSTRUCT → label maps on the exact grid of their images and volumes, with a verdict for every part left out.
- `dicom_prep.maskstage`: The masks stage both pipelines end with: annotations read once, segments numbered for good, and each image or volume's masks remade only when what they are made of changed.
- `dicom_prep.metadata`: The metadata columns of an image row: the tags training sets are filtered on, `--tags` and `--all-tags`, as JSON values; under `--pseudonymize` only what the positive list keeps.
- `dicom_prep.nifti`: Analyse every series into volumes, record the analysis in SQLite, convert the usable ones to `.nii.gz` exactly as dcm2niix would — tracked per volume and resumable.
- `dicom_prep.niftiwrite`: One volume → `.nii.gz` as dcm2niix writes it (grid order, scaling, header), its JSON sidecar, and safe, collision-free names.
- `dicom_prep.options`: Every flag defined once: frozen `ImageOptions` and `RunOptions` dataclasses, validated once; the console scripts' parsers and the guarded settings are derived from them; `--splits` and each patient's stable hold-out split.
- `dicom_prep.pacs`: Pull from a PACS: DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-FIND, C-GET) servers as sources, with timeouts and errors a run can act on.
- `dicom_prep.parallel`: Run a per-file function over many files, streaming results back as they complete; a worker that crashes or hangs costs only the file it was on. One driver loop over two backends: fastcore's process pool, or Dask.
- `dicom_prep.paths`: Where an index's outputs live: every path it stores is relative, every path read back is resolved strictly under its root, and each output folder names the index it belongs to.
- `dicom_prep.pixels`: One frame in, one uint8 image out: decode, modality LUT, VOI window, colour, resize, and an atomic PNG.
- `dicom_prep.preprocess`: The main pipeline: a DICOM tree in; one normalised PNG per frame, a row per image and a row per source file out. Parallel, idempotent, resumable after any crash.
- `dicom_prep.privacy`: What a shared index may hold: keyed pseudonyms, a private state for the source paths and the key, and a positive list of the attributes a pseudonymised index keeps.
- `dicom_prep.read`: Read a file with one clear error that names it and says why: not DICOM, cut short, or a deflate bomb.
- `dicom_prep.resampled`: `--resample`'s modes: a tilted or irregular stack on an equidistant grid instead of the acquired one (`yes`), or beside it as dcm2niix's `_Tilt`/`_Eq` copy (`both`).
- `dicom_prep.run`: The run skeleton every pipeline plugs into: lock, settings guard, run record, interrupts, results streamed into batched commits with progress, the summary, the resume hint and the console-script plumbing.
- `dicom_prep.series`: Headers → per-file records: every tag series analysis needs, looked up in one place and kept as small JSON-able dataclasses.
- `dicom_prep.sheet`: Look before you train: grid PNGs of a reproducible sample of the prepared images, and of the files that failed.
- `dicom_prep.sidecar`: A volume's BIDS-style JSON sidecar: dcm2niix's keys and values, read from the header of its first frame.
- `dicom_prep.sources`: Where DICOM files come from: a source lists its entries, each with a stable key and a change token, and opens their bytes.
- `dicom_prep.status`: `dicom_prep_status`: what the database says about a corpus and its runs — counts, failures and their reasons, the last runs — without touching it.
- `dicom_prep.stores`: Archives and object storage as sources: zip and tar files read in place, and s3://, gs:// and http(s):// prefixes listed and read through fsspec.
- `dicom_prep.synth`: Every well-formed synthetic DICOM the tests, docs and benchmarks use: single files, CT series, enhanced multi-frame, Siemens mosaic and UIH grids, in-memory datasets and fast bulk corpora.
- `dicom_prep.synth_labels`: Synthetic DICOM SEG (binary, fractional, label map) and RTSTRUCT over the synthetic series, in their patient geometry, plus the hostile ones and the masks benchmark's data.
- `dicom_prep.tags`: Every way to read a value from a dataset: quick keyword access, plain text and numbers from the raw bytes, a frame's functional groups, defensive parsers.
- `dicom_prep.vendor`: What scanner makers keep outside the standard tags: Siemens CSA headers and mosaics, GE, Philips and UIH private elements, in one place.
- `dicom_prep.volumes`: Records → volumes: which frames form one volume, its measured geometry, and a verdict from one table of rules."""

__version__ = "0.0.1"
