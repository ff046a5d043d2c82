"""Execute notebooks in place and keep their outputs, so they read as documentation on GitHub.

    python .ci/execute_nbs.py                 # every notebook in nbs/
    python .ci/execute_nbs.py nbs/01_synth.ipynb ...
    python .ci/execute_nbs.py --check         # fail if a notebook with code cells has no outputs (CI)

Cells run in the notebook's folder, as nbdev-test runs them; a failing cell stops with its traceback.
"""
import os, sys
from pathlib import Path
from fastcore.nbio import read_nb, write_nb
from nbdev.test import _skip_cell      # the cells nbdev-test skips (`#| eval: false`) are skipped here too
from execnb.shell import CaptureShell
from dicom_prep.faults import block_network   # notebooks run offline, as nbdev-test runs them

ROOT = Path(__file__).resolve().parent.parent

def execute(path:Path):
    "Run every cell of notebook `path` and write it back with its outputs."
    nb = read_nb(path)
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(path.parent); sys.argv = ['dicom_prep']      # console-script lines in the outputs name the program, not this runner
    try: CaptureShell(path=path.parent).run_all(nb, exc_stop=True, preproc=_skip_cell(nb))
    finally: os.chdir(cwd); sys.argv = argv
    write_nb(nb, path)

def missing_outputs(path:Path) -> bool:
    "True if notebook `path` has code cells but not one stored output."
    cells = [c for c in read_nb(path).cells if c.cell_type == 'code']
    return bool(cells) and not any(c.get('outputs') for c in cells)

if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    paths = [Path(a).resolve() for a in args] or sorted((ROOT/'nbs').glob('*.ipynb'))
    if '--check' in sys.argv:
        bad = [p.name for p in paths if missing_outputs(p)]
        if bad: sys.exit(f"notebooks without outputs (run python .ci/execute_nbs.py and commit): {', '.join(bad)}")
        print(f"{len(paths)} notebooks have stored outputs")
    else:
        block_network()
        for p in paths: print(f"executing {p.name}", flush=True); execute(p)
