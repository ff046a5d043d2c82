"""Write README.md from nbs/index.ipynb (Quarto, which `nbdev-readme` needs, is not installable here).

Runs the notebook with execnb, drops `#| hide` cells, and writes markdown cells, code cells and their
outputs (markdown as is, plain text fenced). `--check` fails if README.md is not what the notebook gives.
"""
import os, re, sys
from pathlib import Path
from execnb.shell import CaptureShell, read_nb
from dicom_prep.faults import block_network   # the index notebook runs offline, as nbdev-test runs it

ROOT = Path(__file__).resolve().parent.parent

def _directives(src): return re.findall(r'^#\|\s*(.+)$', src, flags=re.M)

def _outputs(cell):
    "Markdown of one code cell's outputs."
    parts = []
    for o in cell.get('outputs', []):
        data = o.get('data', {})
        if 'text/markdown' in data: parts.append(''.join(data['text/markdown']))
        elif o.get('output_type') == 'stream': parts.append(f"```\n{''.join(o['text']).rstrip()}\n```")
        elif 'text/plain' in data: parts.append(f"```\n{''.join(data['text/plain']).rstrip()}\n```")
    return parts

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    "Execute the index notebook and return README markdown."
    nb = read_nb(nb_path)
    block_network()
    os.chdir(nb_path.parent)                     # run where nbdev-test runs notebooks
    CaptureShell(path=nb_path.parent).run_all(nb, exc_stop=True)
    out = []
    for c in nb.cells:
        src = ''.join(c.source)
        if c.cell_type == 'markdown': out.append(src); continue
        dirs = _directives(src)
        body = re.sub(r'^#\|.*\n?', '', src, flags=re.M).strip()
        if 'hide' not in dirs and 'echo: false' not in dirs and body: out.append(f"```python\n{body}\n```")
        if 'hide' not in dirs: out += _outputs(c)
    return '\n\n'.join(p.strip() for p in out if p.strip()) + '\n'

if __name__ == '__main__':
    text, dest = render(), ROOT/'README.md'
    if '--check' in sys.argv:
        if dest.read_text() != text: sys.exit("README.md is stale: run `python .ci/readme.py` and commit it")
        print("README.md is current")
    else: dest.write_text(text); print(f"wrote {dest}")
