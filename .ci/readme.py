"""Write README.md from nbs/index.ipynb, and each page in docs/ from its notebook in nbs/docs/ (Quarto, which
`nbdev-readme` and `nbdev-docs` need, is not installable here).

    python .ci/readme.py            # write README.md and docs/*.md
    python .ci/readme.py --check    # fail if any of them is not what its notebook gives (CI)

Runs each notebook with execnb, drops `#| hide` cells, and writes markdown cells, code cells and their
outputs (markdown as is, plain text fenced).
"""
import os, re, sys
from pathlib import Path
from execnb.shell import CaptureShell, read_nb
from dicom_prep.faults import block_network   # the notebooks run offline, as nbdev-test runs them

ROOT = Path(__file__).resolve().parent.parent

def pages() -> dict:
    "Each generated markdown file (relative to the repository) and the notebook it is rendered from."
    docs = {f'docs/{p.stem}.md': p for p in sorted((ROOT/'nbs'/'docs').glob('*.ipynb'))}
    return {'README.md': ROOT/'nbs'/'index.ipynb', **docs}

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
    "Execute notebook `nb_path` and return its markdown."
    nb = read_nb(nb_path)
    block_network()
    cwd = os.getcwd()
    os.chdir(nb_path.parent)                     # run where nbdev-test runs notebooks
    try: CaptureShell(path=nb_path.parent).run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
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
    check, want = '--check' in sys.argv, pages()
    orphans = [f'docs/{p.name}' for p in sorted((ROOT/'docs').glob('*.md')) if f'docs/{p.name}' not in want]
    stale = list(orphans)                        # a page whose notebook is gone
    for name, nb_path in want.items():
        text, dest = render(nb_path), ROOT/name
        if check:
            if not dest.exists() or dest.read_text() != text: stale.append(name)
        else: dest.parent.mkdir(exist_ok=True); dest.write_text(text); print(f"wrote {name}")
    if not check:
        for name in orphans: (ROOT/name).unlink(); print(f"removed {name} (no nbs/docs/ notebook)")
    elif stale: sys.exit(f"stale: {', '.join(stale)}: run `python .ci/readme.py` and commit")
    else: print(f"README.md and the {len(want) - 1} pages in docs/ are current")
