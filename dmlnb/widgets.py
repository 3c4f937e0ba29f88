"""ipywidgets explorers: move the transformation strength and watch the image and its embedding.

- :class:`ViewProbe` is the logic (no widgets): one image, one set of families, one fixed random
  *direction* (:func:`dmlnb.views.sample_direction`), so the view moves smoothly with the
  strength t in [0, 1] (:func:`dmlnb.views.apply_view`; t = 0 is the image itself). With a
  model it reads out where the view's embedding lies: cosine similarity to the original's
  metric and SSR embeddings, to the centre of the image's class, and the rank of the true class
  among all class centres.
- :class:`ViewExplorer` puts a strength slider, a family selector, an image picker and a
  "new direction" button around a probe, and shows original | view, the read-out, and a small
  plot of similarity against strength with the current strength marked (drawn with Pillow into
  an ``ipywidgets.Image``, so it updates live without any browser extension).
- :func:`figure_slider`: a slider that redraws a plotly figure (e.g. the trajectories of views
  through a UMAP map drawn up to the chosen strength).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_range
from dmlnb.defaults import SSR_FAMILIES

__all__ = [
    "PAPER_FAMILIES",
    "ViewExplorer",
    "ViewProbe",
    "class_centres",
    "figure_slider",
    "line_plot_png",
    "side_by_side_png",
]

PAPER_FAMILIES = "paper: " + " + ".join(SSR_FAMILIES)  # the selector's entry for the composition


def class_centres(embeddings: Any, labels: Any, n_classes: int | None = None) -> torch.Tensor:
    """L2-normalised mean embedding of every class, ``[n_classes, d]`` (vectorised, index_add).

    A class without items gets a zero row."""
    z = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = int(y.max()) + 1 if n_classes is None else n_classes
    sums = torch.zeros(k, z.shape[1]).index_add_(0, y, z)
    return torch.nn.functional.normalize(sums, dim=1)


def _families(family: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(family, str):
        return tuple(SSR_FAMILIES) if family == PAPER_FAMILIES else (family,)
    return tuple(family)


class ViewProbe:
    """Views of one image at any strength, and (given a model) where their embeddings lie.

    Parameters
    ----------
    image : tensor ``[C, H, W]`` in [0, 1] (un-normalised).
    family : str or sequence of str
        A family of :data:`dmlnb.views.FAMILIES`, several (composed), or
        :data:`PAPER_FAMILIES` for the paper's composition.
    seed : int
        Seed of the direction (the random part of the view), so a slider moves one view.
    model : :class:`dmlnb.model.EmbeddingNet`, optional
        In eval mode; with ``ssr=True`` forward passes it gives both embeddings.
    centres : tensor ``[K, d]``, optional
        Class centres in the metric embedding (:func:`class_centres`), with ``label`` the image's
        class, for the class read-out.
    """

    def __init__(
        self,
        image: torch.Tensor,
        family: str | Sequence[str] = PAPER_FAMILIES,
        seed: int = 0,
        model: torch.nn.Module | None = None,
        centres: torch.Tensor | None = None,
        label: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        from dmlnb.views import sample_direction

        self.image = torch.as_tensor(image, dtype=torch.float32)
        self.families = _families(family)
        self.direction = sample_direction(self.families, generator=int(seed))
        self.model = model
        self.centres = centres
        self.label = label
        self.class_names = class_names
        self._origin = self._embed(self.image[None]) if model is not None else None

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        z, s = self.model(x.to(device), ssr=True)
        return z.float().cpu(), s.float().cpu()

    def view(self, strength: float) -> torch.Tensor:
        """The view ``[C, H, W]`` at ``strength`` t in [0, 1]."""
        from dmlnb.views import apply_view

        check_range("strength", strength, 0.0, 1.0)
        return apply_view(self.image, self.families, float(strength), self.direction)

    def readouts(self, strengths: Sequence[float]) -> dict[str, np.ndarray]:
        """Read-outs at several strengths, views embedded in one batch.

        Keys: ``strength``; ``pixel_rmse`` (root mean squared pixel difference to the original);
        with a model ``cos_original`` and ``cos_original_ssr`` (cosine similarity of the view's
        metric / SSR embedding to the original's); with centres ``cos_class_centre`` and
        ``class_rank`` (1 = the true class's centre is the nearest), ``nearest_class``.
        """
        s = np.asarray(strengths, dtype=float).reshape(-1)
        views = torch.stack([self.view(float(t)) for t in s])  # a handful of strengths
        out: dict[str, np.ndarray] = {
            "strength": s,
            "pixel_rmse": (views - self.image).pow(2).flatten(1).mean(1).sqrt().numpy(),
        }
        if self.model is None:
            return out
        z, zs = self._embed(views)
        out["cos_original"] = (z @ self._origin[0][0]).numpy()
        out["cos_original_ssr"] = (zs @ self._origin[1][0]).numpy()
        if self.centres is not None and self.label is not None:
            sims = z @ self.centres.T  # [S, K]
            own = sims[:, self.label]
            out["cos_class_centre"] = own.numpy()
            out["class_rank"] = (1 + (sims > own[:, None]).sum(1)).numpy()
            out["nearest_class"] = sims.argmax(1).numpy()
        return out

    def readout(self, strength: float) -> dict[str, float]:
        """:meth:`readouts` at one strength, as plain floats (and the nearest class's name)."""
        r = self.readouts([strength])
        out: dict[str, Any] = {k: float(v[0]) for k, v in r.items() if k != "nearest_class"}
        if "nearest_class" in r:
            idx = int(r["nearest_class"][0])
            out["nearest_class"] = self.class_names[idx] if self.class_names else idx
            out["class_rank"] = int(out["class_rank"])
        return out


# --- small pictures drawn with Pillow (live updates need no plotly round trip) --------------------
def side_by_side_png(images: Sequence[Any], scale: int = 5, gap: int = 6) -> bytes:
    """PNG of images next to each other (see :func:`dmlnb.viz.mosaic`), enlarged ``scale`` times."""
    from dmlnb.viz import image_png, mosaic

    return image_png(mosaic([list(images)], pad=gap // 2, border=1, borders=[[(160, 160, 160)] * len(images)]),
                     scale=scale)


def _font(image_font: Any, size: int) -> Any:
    """DejaVu Sans when the system has it (spaces render at small sizes), else Pillow's default."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return image_font.truetype(name, size)
        except OSError:
            continue
    try:
        return image_font.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # pragma: no cover - older Pillow: the small bitmap font
        return image_font.load_default()


_LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def line_plot_png(
    x: Sequence[float],
    ys: dict[str, Sequence[float]],
    marker: float | None = None,
    width: int = 360,
    height: int = 220,
    y_range: tuple[float, float] | None = None,
    x_label: str = "strength t",
) -> bytes:
    """A small line chart as PNG bytes (Pillow): one line per entry of ``ys``, a legend, axes with
    end labels, and a vertical line at ``marker`` (with the lines' values there as dots)."""
    from PIL import Image, ImageDraw, ImageFont

    x = np.asarray(x, dtype=float)
    series = {k: np.asarray(v, dtype=float) for k, v in ys.items()}
    allv = np.concatenate([v[np.isfinite(v)] for v in series.values()] or [np.zeros(1)])
    lo, hi = y_range if y_range is not None else (float(allv.min()), float(allv.max()))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    if y_range is None:  # a little air above and below the lines
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    font = _font(ImageFont, 11)
    left, right, top, bottom = 44, 10, 10 + 14 * len(series), 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, x1 = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1.0

    def px(xv: float, yv: float) -> tuple[float, float]:
        u = left + (xv - x0) / (x1 - x0) * (width - left - right)
        v = height - bottom - (yv - lo) / (hi - lo) * (height - top - bottom)
        return u, v

    d.rectangle([left, top, width - right, height - bottom], outline=(150, 150, 150))
    for yv in (lo, hi):
        u, v = px(x0, yv)
        d.text((4, v - 6), f"{yv:.2f}", fill=(80, 80, 80), font=font)
    d.text((left, height - bottom + 4), f"{x0:g}", fill=(80, 80, 80), font=font)
    d.text((width - right - 18, height - bottom + 4), f"{x1:g}", fill=(80, 80, 80), font=font)
    d.text(((width - len(x_label) * 6) // 2, height - bottom + 14), x_label, fill=(80, 80, 80), font=font)
    if marker is not None:
        u, _ = px(marker, lo)
        d.line([(u, top), (u, height - bottom)], fill=(120, 120, 120), width=1)
    for i, (name, v) in enumerate(series.items()):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        pts = [px(a, b) for a, b in zip(x, v, strict=True) if np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.line([(left + 6, 8 + 14 * i), (left + 22, 8 + 14 * i)], fill=colour, width=2)
        d.text((left + 26, 2 + 14 * i), name, fill=(40, 40, 40), font=font)
        if marker is not None and np.isfinite(v).any():
            yv = float(np.interp(marker, x, v))
            u, w = px(marker, yv)
            d.ellipse([u - 4, w - 4, u + 4, w + 4], fill=colour, outline="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- the explorer --------------------------------------------------------------------------------
class ViewExplorer:
    """Strength slider, family selector and image picker around a :class:`ViewProbe`.

    Parameters
    ----------
    dataset
        A dmlnb dataset (items ``(image, label)``, ``classes``, optional ``metadata``).
    indices : sequence of int
        The images the picker offers.
    model : optional
        :class:`dmlnb.model.EmbeddingNet` in eval mode; ``None`` shows the pixel read-out only.
    centres : tensor ``[K, d]``, optional
        Class centres of ``dataset`` in the metric embedding (:func:`class_centres`).
    families : sequence of str
        Families the selector offers (the paper's composition first).
    seed : int
        Seed of the first direction; "new direction" adds 1.
    curve_points : int
        Strengths at which the similarity curve is drawn (0..1).

    Attributes
    ----------
    strength, family, picker, new_direction, image, readout, plot, widget
        The ipywidgets (``widget`` is the whole explorer, displayed by ``display(explorer)``).
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        model: torch.nn.Module | None = None,
        centres: torch.Tensor | None = None,
        families: Sequence[str] | None = None,
        seed: int = 0,
        curve_points: int = 21,
    ) -> None:
        import ipywidgets as W

        from dmlnb.views import FAMILIES

        if len(indices) == 0:
            raise ValueError("indices must name at least one image of the dataset")
        self.dataset, self.model, self.centres = dataset, model, centres
        self.seed = int(seed)
        self.curve_x = np.linspace(0.0, 1.0, curve_points)
        meta = getattr(dataset, "metadata", None)
        options = []
        for i in indices:
            label = dataset.classes[int(dataset.labels[i])]
            extra = ""
            if meta is not None and "family" in meta.columns:
                row = meta.iloc[int(i)]
                extra = f" · {row['family']}" + (f" {row['subfamily']}" if "subfamily" in meta.columns else "")
            options.append((f"{label}{extra} (#{int(i)})", int(i)))
        fam_options = [PAPER_FAMILIES] + list(families or FAMILIES)
        self.strength = W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="strength",
                                      continuous_update=True, readout_format=".2f")
        self.family = W.Dropdown(options=fam_options, value=fam_options[0], description="family")
        self.picker = W.Dropdown(options=options, value=options[0][1], description="image")
        self.new_direction = W.Button(description="new direction", icon="random")
        self.image = W.Image(format="png")
        self.readout = W.HTML()
        self.plot = W.Image(format="png")
        self.image.add_class("dmlnb-view-image")
        self.readout.add_class("dmlnb-readout")
        self.plot.add_class("dmlnb-similarity-plot")
        self._probe: ViewProbe | None = None
        self._curve: dict[str, np.ndarray] | None = None
        self.strength.observe(lambda _: self.update(), names="value")
        self.family.observe(lambda _: self.rebuild(), names="value")
        self.picker.observe(lambda _: self.rebuild(), names="value")
        self.new_direction.on_click(self._on_new_direction)
        controls = W.VBox([self.strength, self.family, self.picker, self.new_direction])
        right = W.VBox([self.readout, self.plot])
        # flex-start: the picture keeps its own size instead of stretching to the read-out's height
        self.widget = W.VBox([controls, W.HBox([self.image, right], layout=W.Layout(align_items="flex-start"))])
        self.rebuild()

    def _on_new_direction(self, _button: Any = None) -> None:
        self.seed += 1
        self.rebuild()

    def rebuild(self) -> None:
        """New probe (image, family or direction changed): recompute the curve, then redraw."""
        idx = int(self.picker.value)
        image, label = self.dataset[idx]
        self._probe = ViewProbe(image, self.family.value, seed=self.seed, model=self.model,
                                centres=self.centres, label=int(label),
                                class_names=list(self.dataset.classes))
        self._curve = self._probe.readouts(self.curve_x)
        self.update()

    def update(self) -> None:
        """Redraw the view, the read-out and the plot at the slider's strength."""
        t = float(self.strength.value)
        probe = self._probe
        self.image.value = side_by_side_png([probe.image, probe.view(t)])
        r = probe.readout(t)
        rows = [("strength t", f"{t:.2f}"), ("pixel RMSE to original", f"{r['pixel_rmse']:.3f}")]
        if "cos_original" in r:
            rows += [("cos(view, original), metric head", f"{r['cos_original']:.3f}"),
                     ("cos(view, original), SSR head", f"{r['cos_original_ssr']:.3f}")]
        if "cos_class_centre" in r:
            true = self.dataset.classes[probe.label]
            rows += [(f"cos(view, centre of class '{true}')", f"{r['cos_class_centre']:.3f}"),
                     ("nearest class centre", f"'{r['nearest_class']}' (true class rank "
                      f"{r['class_rank']})")]
        if self.model is None:
            rows.append(("embedding", "no model: give run_dir (or quick_train_steps) for the "
                                      "embedding read-out"))
        self.readout.value = (
            "<table class='dmlnb-readout-table'>"
            + "".join(f"<tr><td>{k}</td><td><b>{v}</b></td></tr>" for k, v in rows)
            + "</table>"
        )
        c = self._curve
        if "cos_original" in c:
            ys = {"metric: cos to original": c["cos_original"],
                  "SSR: cos to original": c["cos_original_ssr"]}
            if "cos_class_centre" in c:
                ys["metric: cos to class centre"] = c["cos_class_centre"]
            self.plot.value = line_plot_png(self.curve_x, ys, marker=t)
        else:
            self.plot.value = line_plot_png(self.curve_x, {"pixel RMSE": c["pixel_rmse"]}, marker=t)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def display_bundle(obj: Any) -> dict[str, Any]:
    """``obj`` as one ``display_data`` output (its MIME bundle), as an ``Output`` widget stores it."""
    data: Any = None
    metadata: Any = {}
    repr_bundle = getattr(obj, "_repr_mimebundle_", None)
    if callable(repr_bundle):  # plotly figures (under the renderer set by dmlnb.notebook.setup)
        data = repr_bundle(include=None, exclude=None)
        if isinstance(data, tuple):
            data, metadata = data
    if not data:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and not hasattr(obj, "_ipython_display_"):
            data, metadata = shell.display_formatter.format(obj)
    if not data:
        data = {"text/plain": repr(obj)}
    return {"output_type": "display_data", "data": dict(data), "metadata": dict(metadata or {})}


def figure_slider(
    make_figure: Callable[[float], Any],
    values: Sequence[float],
    description: str = "strength",
    value: float | None = None,
) -> Any:
    """A slider over ``values`` that redraws ``make_figure(value)`` (a plotly figure) below it.

    Returns an ``ipywidgets.VBox`` (slider, output); its ``.slider`` and ``.output`` attributes
    are the parts. The figure is drawn once at creation, so a headless run keeps it (in the
    notebook's widget state).

    The figure is put into the ``Output`` widget by setting its ``outputs`` from the kernel, not by
    capturing a ``display`` in ``with output:``. A capture makes a headless executor that stands in
    for the front end (nbclient, under papermill) send the captured output back to the kernel on
    the shell channel while it waits there for the cell's reply, which can leave it waiting forever
    (see :mod:`dmlnb.execute`); setting the state sends nothing back, and in JupyterLab it looks the
    same (one update, so no flicker either).
    """
    import ipywidgets as W

    values = [float(v) for v in values]
    slider = W.SelectionSlider(options=[(f"{v:.2f}", v) for v in values],
                               value=values[-1] if value is None else value,
                               description=description, continuous_update=False)
    output = W.Output()

    def draw(_: Any = None) -> None:
        output.outputs = (display_bundle(make_figure(slider.value)),)

    slider.observe(draw, names="value")
    draw()
    box = W.VBox([slider, output])
    box.slider, box.output = slider, output
    return box
