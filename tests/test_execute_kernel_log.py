"""A kernel's own log (IPKernelApp warnings, "KeyboardInterrupt caught in kernel" at shutdown) goes
to ``<output>.kernel.log``, not to the stderr of the process that runs the notebook: inside a
notebook that stderr is the calling cell's output (the pink boxes of a sweep run from a notebook)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nbformat


def _notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import sys\nprint('cell stderr', file=sys.stderr)\n"
            "from ipykernel.kernelapp import IPKernelApp\n"
            "IPKernelApp.instance().log.warning('A KERNEL LOG LINE')"),
    ]
    nbformat.write(nb, path)


def test_kernel_log_goes_to_a_file_next_to_the_output(tmp_path):
    _notebook(tmp_path / "t.ipynb")
    (tmp_path / "out").mkdir()
    script = textwrap.dedent(f"""
        from dmlnb.execute import run_notebook
        nb = run_notebook({str(tmp_path / 't.ipynb')!r}, {str(tmp_path / 'out' / 't.ipynb')!r},
                          {{"x": 2}}, cell_timeout=120, notebook_timeout=240, progress_bar=False)
        print("OUTPUTS", [o.get("text") for o in nb.cells[-1].outputs])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "A KERNEL LOG LINE" not in proc.stderr and "A KERNEL LOG LINE" not in proc.stdout
    assert "cell stderr" in proc.stdout  # the cell's own stderr stays in the notebook
    log = tmp_path / "out" / "t.kernel.log"
    assert "A KERNEL LOG LINE" in log.read_text()
