"""The package's embedded data files (``dmlnb/data/_assets``) and how they are written.

:func:`write_npz` writes a compressed ``.npz`` with fixed timestamps, so that two builds of a
data set from the same sources are byte-identical.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["ASSETS", "write_npz"]

ASSETS = Path(__file__).with_name("_assets")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a compressed ``.npz`` with fixed timestamps (byte-identical reruns)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


