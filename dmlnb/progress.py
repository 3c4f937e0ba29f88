"""Progress bars that read well live and stored: :func:`progress_bar`, where the package makes them.

``tqdm.auto`` draws an ipywidgets bar in a notebook kernel. An executed notebook stores that
widget's view and, for the renderers that show no widgets (GitHub, nbviewer, nbconvert's static
HTML), the plain text the bar had when it was displayed: the bar at 0 %. A bar made here is
displayed under a display id instead, live as tqdm draws it, and closing it replaces that one
output by plain text:

- ``leave=True`` (tqdm's default), or a bar closed before its total (an error, an early stop):
  the bar's final line, e.g. ``train: 100%|██████████| 60/60 [00:09<00:00,  6.4it/s, loss=0.21]``,
  the same in JupyterLab, GitHub, nbviewer and nbconvert's HTML (an output that kept the widget
  view would still show the widget to nbconvert, which draws it from the stored widget state with
  JavaScript from a CDN, or nothing offline);
- ``leave=False``, finished: an empty ``text/plain`` (tqdm hides such a bar; the stored notebook
  then shows nothing either, instead of a stale 0 % line).

Outside a notebook kernel (a terminal, a log file) this is ``tqdm.auto.tqdm`` unchanged: its text
bar already ends on its final state. Bars with ``delay > 0`` or ``display=False`` are tqdm's own.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["final_text", "progress_bar"]

_CLASSES: dict[type, type] = {}  # tqdm.auto's notebook class -> its subclass here


def final_text(bar: Any) -> str:
    """The bar's state as one line of text (unicode blocks, the default bar width)."""
    d = dict(bar.format_dict)
    d.update(ncols=None, ascii=False)  # a notebook bar's ncols is a CSS width ("100%")
    return bar.format_meter(**d)


def _notebook_class(base: type) -> type:
    """``base`` (tqdm.auto's class in a notebook kernel) with its output updated on close."""
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls

    class StoredProgressBar(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._dmlnb_handle = None
            own = bool(kwargs.get("display", True)) and not (kwargs.get("delay") or 0) > 0
            if own:
                kwargs["display"] = False  # displayed below, under a display id
            super().__init__(*args, **kwargs)
            if own and not self.disable and hasattr(self, "container"):
                from IPython.display import display

                self._dmlnb_handle = display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            was_open = not self.disable
            super().close()
            handle, self._dmlnb_handle = getattr(self, "_dmlnb_handle", None), None
            if not was_open or handle is None:
                return
            unfinished = bool(self.total) and self.n < self.total
            text = final_text(self) if self.leave or unfinished else ""  # tqdm's leave=False: hidden
            try:
                handle.update({"text/plain": text}, raw=True)
            except Exception:  # closed by the garbage collector as the kernel shuts down
                pass

    StoredProgressBar.__qualname__ = f"StoredProgressBar[{base.__name__}]"
    _CLASSES[base] = StoredProgressBar
    return StoredProgressBar


def progress_bar(*args: Any, **kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm`` bar (same arguments) whose stored notebook output ends on its final
    line (module docstring). Use it as tqdm: ``for x in progress_bar(items, desc=...)``, or
    ``bar = progress_bar(total=n)`` ... ``bar.update()`` ... ``bar.close()``."""
    from tqdm.auto import tqdm

    notebook = sys.modules.get("tqdm.notebook")
    if notebook is not None and issubclass(tqdm, notebook.tqdm_notebook):
        return _notebook_class(tqdm)(*args, **kwargs)
    return tqdm(*args, **kwargs)
